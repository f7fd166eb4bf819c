"""The model's compiled loss and metrics, computed as ``evaluate`` computes them, on fresh objects.

Per batch, as Keras's ``test_step``: ``loss = CompileLoss(y, y_pred, sample_weight)`` plus
each of the model's losses (regularization, ``add_loss``) summed, tracked by a ``Mean``
weighted by the batch size; ``CompileMetrics.update_state(y, y_pred, sample_weight)``; per
output losses tracked by the ``CompileLoss`` itself. The results come out under the keys
and in the order ``evaluate(return_dict=True)`` uses. Each mode gets fresh
``CompileLoss``/``CompileMetrics`` objects built from what the model was compiled with (Keras's
own metric objects re-created from their config), so the model's own metric state is never touched;
a custom metric object (its config may miss constructor arguments) is used itself, reset for each
mode and its state put back afterwards (:meth:`KerasMetrics.close`). Targets and sample weights
reach the loss and metrics as backend tensors, as ``evaluate``'s data adapter gives them. A metric
whose result is not one number (``F1Score()``, ``Recall(thresholds=[0.3, 0.7])``) is left out with a
note; the direction a Keras metric states (``_direction``) is the report's for its key.

A model that overrides ``compute_loss`` gets its loss from that method in every mode, called as
``test_step`` calls it (``training=False``) inside a ``StatelessScope`` (nothing it assigns is
kept), with the call's losses as ``model.losses``. A model that overrides ``test_step`` gets a note:
``evaluate`` runs that code, diagnose the compiled loss and metrics.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from .._keras_common import check_class_indices, classifier_defaults, ignored_labels, label_classes, metric_copies, one_number_results, overrides, sum_over_workers, test_step_note, unique
from ..engine import Batch, Collective, tree_map
from ..errors import ModelError
from .distributed import local_variables


class KerasMetrics:
    """:class:`evalgap.engine.Metrics` from a compiled Keras model (module docstring)."""

    def __init__(self, model, batch: Batch, outputs: Any, collective: Collective | None = None):
        self.collective = collective
        compiled_loss = getattr(model, "_compile_loss", None)
        compiled_metrics = getattr(model, "_compile_metrics", None)
        self.notes: list[str] = []
        self.given: list[str] = []
        self.output_names = getattr(compiled_loss or compiled_metrics, "output_names", None)
        self.loss = None if compiled_loss is None else (compiled_loss._user_loss, compiled_loss._user_loss_weights)
        self.metrics = None if compiled_metrics is None else (compiled_metrics._user_metrics, compiled_metrics._user_weighted_metrics)
        if self.loss is None and not getattr(model, "compiled", False):
            loss, metrics = classifier_defaults(
                batch.targets, np.asarray(ops.convert_to_numpy(outputs[0])), keras.losses.SparseCategoricalCrossentropy,
                keras.losses.CategoricalCrossentropy, ModelError,
            )
            self.loss, self.metrics = (loss, None), (metrics, None)
            self.notes.append("the model is not compiled: measured with cross-entropy and accuracy; compile it to measure your own.")
        self.model = model if overrides(model, "compute_loss") else None
        if self.model is not None:
            self.notes.append(f"{type(model).__name__} overrides compute_loss: every mode's loss is its compute_loss("
                              "training=False), as evaluate computes it.")
        if overrides(model, "test_step"):
            self.notes.append(test_step_note(model))
        self.borrowed: list = []
        self._saved = None
        self.classes = label_classes(outputs[0], self.loss, self.metrics)  # None: the targets are not checked
        self.ignored = ignored_labels(self.loss, self.metrics)
        self.names: list[str] = []
        self.left_out: dict[str, str] = {}  # metrics that are not one number: why, and the fix
        self.higher_is_better: dict[str, bool] = {}  # keys whose metric states its direction

    def new(self) -> "_State":
        with local_variables():  # this process's own metric state (summed over workers in result())
            return self._new()

    def _new(self) -> "_State":
        borrowed: list = []
        loss = None
        if self.loss is not None:
            from keras.src.trainers.compile_utils import CompileLoss

            loss = CompileLoss(self.loss[0], self.loss[1], output_names=self.output_names)
        metrics = None
        if self.metrics is not None:
            from keras.src.trainers.compile_utils import CompileMetrics

            metrics = CompileMetrics(metric_copies(self.metrics[0], keras.metrics.Metric, borrowed), metric_copies(self.metrics[1], keras.metrics.Metric, borrowed), output_names=self.output_names)
        if borrowed and self._saved is None:
            self._saved = [(v, np.array(v.numpy())) for m in borrowed for v in m.variables]
        for m in borrowed:
            m.reset_state()
        self.borrowed = borrowed
        return _State(self, loss, metrics)

    def close(self) -> None:
        """Put back the state of borrowed metric objects."""
        for v, value in self._saved or []:
            v.assign(value)
        self._saved = None


def _compute_loss(model, x, y, y_pred, w, losses) -> Any:
    """``model.compute_loss`` as ``test_step`` calls it, in a ``StatelessScope`` (no variable is assigned), with the
    forward's losses (``add_loss``, regularization) as ``model.losses``, as Keras's JAX trainer passes them."""
    saved = model._losses_override
    model._losses_override = list(losses)
    try:
        with keras.StatelessScope():
            return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=w, training=False)
    finally:
        model._losses_override = saved


def _tensors(tree: Any) -> Any:
    """Targets or weights as the backend's tensors, as Keras's data adapters give them to ``test_step``."""
    return tree_map(lambda a: a if ops.is_tensor(a) else ops.convert_to_tensor(a), tree)


class _State:
    def __init__(self, spec: KerasMetrics, loss, metrics):
        self.spec, self.loss, self.metrics = spec, loss, metrics
        self.tracker = keras.metrics.Mean(name="loss")
        self._combined = False

    def update(self, batch: Batch, outputs: Any) -> None:
        with local_variables():  # the containers build their metrics at the first update
            self._update(batch, outputs)

    def _update(self, batch: Batch, outputs: Any) -> None:
        y_pred, losses = outputs
        y, w = batch.targets, batch.weights
        check_class_indices(y, y_pred, self.spec.classes, self.spec.ignored, ops.convert_to_numpy)
        y, w = _tensors(y), _tensors(w)
        parts = []
        if self.loss is not None:
            value = self.loss(y, y_pred, w)  # also the per-output losses
            if value is not None:
                parts.append(value)
        if self.spec.model is not None:
            value = _compute_loss(self.spec.model, _tensors(batch.inputs), y, y_pred, w, losses)
            parts, losses = ([] if value is None else [value]), []
        for extra in losses:
            extra = extra if keras.backend.is_float_dtype(extra.dtype) else ops.cast(extra, keras.backend.floatx())
            parts.append(ops.sum(extra))
        if parts:
            self.tracker.update_state(parts[0] if len(parts) == 1 else ops.sum(parts), sample_weight=batch.size)
        if self.metrics is not None:
            self.metrics.update_state(y, y_pred, w)

    def result(self) -> dict[str, float]:
        if not self._combined:  # every worker's state, once (MultiWorkerMirroredStrategy)
            objects = [self.tracker, *(self.loss.metrics if self.loss is not None else []),
                       *([self.metrics] if self.metrics is not None and self.metrics.built else [])]
            sum_over_workers(unique(v for m in objects for v in m.variables), self.spec.collective, ops.convert_to_numpy,
                             lambda v, value: v.assign(ops.cast(value, v.dtype)))
            self._combined = True
        out: dict[str, Any] = {"loss": self.tracker.result()}
        if self.metrics is not None and self.metrics.built:
            results = self.metrics.result()
            out.update(results)
            self._directions(list(results))
        if self.loss is not None:
            out.update({m.name: m.result() for m in self.loss.metrics})
        values = one_number_results({k: ops.convert_to_numpy(v) for k, v in out.items()}, self.spec)
        self.spec.names = list(values)
        return values

    def _directions(self, keys: list[str]) -> None:
        """The direction each metric object states (``_direction``: ``"up"``, ``"down"``), by its key: the keys of
        ``CompileMetrics.result()`` come one per metric, in the order of its (weighted) metric lists."""
        lists = [*(getattr(self.metrics, "_flat_metrics", None) or []), *(getattr(self.metrics, "_flat_weighted_metrics", None) or [])]
        objects = [m for mls in lists if mls for m in getattr(mls, "metrics", [])]
        if len(objects) == len(keys):
            for key, m in zip(keys, objects):
                if getattr(m, "_direction", None) in ("up", "down"):
                    self.spec.higher_is_better[key] = m._direction == "up"
