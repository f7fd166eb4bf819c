"""The model's compiled loss and metrics, computed as Keras 2's ``evaluate`` computes them, on fresh objects.

Per batch, as Keras 2's ``test_step``: ``compiled_loss(y, y_pred, sample_weight,
regularization_losses=model.losses)`` (its ``Mean`` named ``loss`` weighted by the batch size,
``<output>_loss`` per output, loss weights, ``add_loss`` and regularization included), then
``compiled_metrics.update_state(y, y_pred, sample_weight)``. The results come out under the
keys and in the order ``evaluate(return_dict=True)`` uses (``model.metrics``: the loss
container's, then the metrics container's). Each mode gets fresh ``LossesContainer`` /
``MetricsContainer`` objects built from what the model was compiled with (Keras's own metric
objects re-created from their config), so the model's own metric state is never touched; when
the model's containers are already built (after fit or evaluate), the fresh metrics take the
names Keras gave them (per-output prefixes, ``weighted_``). A custom metric object (its config
may miss constructor arguments) is used itself: reset for each mode, its state and name put back
afterwards (:meth:`TfKerasMetrics.close`); under a ``tf.distribute`` strategy it is updated as its
first replica. A metric whose result is not one number (``F1Score()``) is left out with a note.
Metrics added in ``call`` with ``add_metric`` are not measured (the passes make
``add_metric`` do nothing, so that it cannot change the model); the report says so, and that an
overridden ``test_step`` (which ``evaluate`` runs) may make ``evaluate`` differ from E. An overridden
``compute_loss`` needs nothing: Keras 2's ``evaluate`` reports the compiled loss's tracker, not its value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from .._keras_common import check_class_indices, classifier_defaults, ignored_labels, label_classes, metric_copies, one_number_results, overrides, sum_over_workers, test_step_note, unique
from ..engine import Batch, Collective, tree_map
from ..errors import ModelError
from .distributed import local_variables
from .layers import keras, walk


def _numpy(t: Any) -> np.ndarray:
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def _tensors(tree: Any) -> Any:
    return tree_map(lambda a: a if isinstance(a, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(a), tree)


class TfKerasMetrics:
    """:class:`evalgap.engine.Metrics` from a compiled Keras 2 model (module docstring)."""

    def __init__(self, model, batch: Batch, outputs: Any, collective: Collective | None = None):
        self.collective = collective
        compiled = bool(getattr(model, "_is_compiled", False))
        losses = getattr(model, "compiled_loss", None) if compiled else None
        self.model_metrics = getattr(model, "compiled_metrics", None) if compiled else None
        self.notes: list[str] = []
        self.given: list[str] = []
        self.output_names = getattr(model, "output_names", None)  # as compile passes them (None: named at build)
        self.loss = (None, None) if losses is None else (losses._user_losses, losses._user_loss_weights)
        m = self.model_metrics
        self.metrics = None if m is None else (m._user_metrics, m._user_weighted_metrics, getattr(m, "_from_serialized", False))
        if not compiled:
            loss, metrics = classifier_defaults(batch.targets, outputs[0], keras.losses.SparseCategoricalCrossentropy, keras.losses.CategoricalCrossentropy, ModelError)
            self.loss, self.metrics = (loss, None), (metrics, None, False)
            self.notes.append("the model is not compiled: measured with cross-entropy and accuracy; compile it to measure your own.")
        added = [m.name for layer in [model, *(layer for _, layer in walk(model))] for m in getattr(layer, "_metrics", None) or []]
        if added:
            self.notes.append(
                f"metrics added with add_metric ({', '.join(added)}) are not measured: evalgap's passes leave the model's "
                "metric state alone, so evaluate reports them and diagnose does not."
            )
        if overrides(model, "test_step"):
            self.notes.append(test_step_note(model))
        self.borrowed: list = []
        self._saved = None
        self._borrowed_as: dict[int, tuple[Any, str, Any]] = {}  # id -> (metric, its name, its own update_state)
        self.classes = label_classes(outputs[0], self.loss, self.metrics[:2] if self.metrics else None)  # None: the targets are not checked
        self.ignored = ignored_labels(self.loss, self.metrics[:2] if self.metrics else None)
        self.names: list[str] = []
        self.left_out: dict[str, str] = {}  # metrics that are not one number: why, and the fix

    def new(self) -> "_State":
        with local_variables():  # this process's own metric state (summed over workers in result())
            return self._new()

    def _new(self) -> "_State":
        from_compile = _compile_utils()
        borrowed: list = []
        loss = from_compile.LossesContainer(self.loss[0], self.loss[1], output_names=self.output_names)
        metrics = None
        if self.metrics is not None:
            user, weighted, serialized = self.metrics
            user, weighted = metric_copies(user, keras.metrics.Metric, borrowed), metric_copies(weighted, keras.metrics.Metric, borrowed)
            if borrowed and self._saved is None:
                self._saved = [(v, np.array(v.numpy())) for m in borrowed for v in m.variables]
                self._borrowed_as = {id(m): (m, m._name, m.__dict__.get("update_state")) for m in borrowed}
                for m in borrowed:
                    _as_first_replica(m)
            for m, name, _ in self._borrowed_as.values():
                m._name = name  # a container renames the metrics it builds (per-output prefixes, weighted_)
            metrics = from_compile.MetricsContainer(user, weighted, output_names=self.output_names, from_serialized=serialized)
        for m in borrowed:
            m.reset_state()
        self.borrowed = borrowed
        return _State(self, loss, metrics)

    def close(self) -> None:
        """Put back the state, name and ``update_state`` of borrowed metric objects."""
        for v, value in self._saved or []:
            v.assign(value)
        for m, name, update in self._borrowed_as.values():
            m._name = name
            if update is not None:
                m.update_state = update
            else:
                m.__dict__.pop("update_state", None)
        self._saved, self._borrowed_as = None, {}


def _as_first_replica(metric: Any) -> None:
    """A metric created under a ``tf.distribute`` strategy holds replica-local variables that refuse ``assign_add``
    outside a replica: its updates run as the first replica's (its reads sum the replicas; the others stay reset)."""
    strategy = next((getattr(v, "distribute_strategy", None) for v in metric.variables if isinstance(v, tf.distribute.DistributedValues)), None)
    if strategy is None:
        return
    update = metric.update_state

    def update_state(*args: Any, **kwargs: Any) -> Any:
        with tf.distribute.ReplicaContext(strategy, replica_id_in_sync_group=0):
            return update(*args, **kwargs)

    metric.update_state = update_state


def _compile_utils():
    """Keras 2's ``compile_utils`` module (the containers ``compile`` creates), beside ``training``."""
    import importlib

    return importlib.import_module(keras.Model.__module__.rsplit(".", 1)[0] + ".compile_utils")


class _State:
    def __init__(self, spec: TfKerasMetrics, loss, metrics):
        self.spec, self.loss, self.metrics = spec, loss, metrics
        self._named = False
        self._combined = False

    def update(self, batch: Batch, outputs: Any) -> None:
        with local_variables():  # the containers build their metrics at the first update
            self._update(batch, outputs)

    def _update(self, batch: Batch, outputs: Any) -> None:
        y_pred, losses = outputs
        y, w = batch.targets, batch.weights
        check_class_indices(y, y_pred, self.spec.classes, self.spec.ignored, _numpy)
        y, w = _tensors(y), _tensors(w)
        self.loss(y, y_pred, w, regularization_losses=losses)
        if self.metrics is not None:
            self.metrics.update_state(y, y_pred, w)
            if not self._named:
                _take_names(self.metrics, self.spec.model_metrics, {i: name for i, (_, name, _) in self.spec._borrowed_as.items()})
                self._named = True

    def result(self) -> dict[str, float]:
        objects = list(self.loss.metrics)
        if self.metrics is not None and self.metrics.built:
            objects += list(self.metrics.metrics)
        if not self._combined:  # every worker's state, once (MultiWorkerMirroredStrategy)
            sum_over_workers(unique(v for m in objects for v in m.variables), self.spec.collective, lambda v: v.numpy(),
                             lambda v, value: v.assign(tf.cast(value, v.dtype)))
            self._combined = True
        out: dict[str, Any] = {}
        for m in objects:
            value = m.result()
            out.update(value) if isinstance(value, dict) else out.__setitem__(m.name, value)
        values = one_number_results(out, self.spec)
        self.spec.names = list(values)
        return values


def _take_names(fresh, model_container, borrowed_names: dict[int, str]) -> None:
    """The names Keras gave the model's built metrics (per-output prefixes, ``weighted_``), in the same order (a
    borrowed metric's, which building ``fresh`` renamed, as it was before)."""
    if model_container is None or not getattr(model_container, "_built", False):
        return
    ours, theirs = list(fresh.metrics), list(model_container.metrics)
    if len(ours) == len(theirs):
        for mine, given in zip(ours, theirs):
            mine._name = borrowed_names.get(id(given), given.name)
