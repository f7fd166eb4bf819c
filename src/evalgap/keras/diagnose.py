"""``evalgap.keras.diagnose``: measure a Keras model in every mode on the same data and explain the gap.

Passes over the probe batches (whole batches of the training batch size), all through
``stateless_call`` so that no variable of the model changes:

1. BN on batch statistics, dropout off (Td), gathering the exact population statistics;
2. evaluation mode with the current moving statistics (E);
3. evaluation mode with the population statistics substituted (P);
4. only if the model has dropout/noise layers: full training mode (T);
   only if it has frozen BN layers: P with those recalibrated too (their effect);
   only with ``val_data``: evaluation mode on the validation data.

Metrics: the model's compiled loss and metrics, recomputed from the outputs with fresh
metric objects. ``history`` (``fit``'s return value) adds F, the epoch-averaged training
metric, and the steps per epoch for the EMA arithmetic.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import keras
import numpy as np

from .._checks import check_label_dtype, check_labels
from ..attribution import decompose
from ..diagnosis import Context, InputScale, build_report
from ..errors import DataError, ModelError
from ..report import Report
from ._data import batches, first_batch, leading_dim
from ._layers import find_batchnorms, walk
from .precise_bn import apply, measure

logger = logging.getLogger("evalgap.keras")

TRAINING_ONLY_TOKENS = ("Dropout", "Noise", "Random")
OTHER_NORMALIZATION = ("LayerNormalization", "GroupNormalization", "UnitNormalization", "RMSNormalization")


# ---------------------------------------------------------------------------------
# compiled predictions in a chosen mode with chosen non-trainable values
# ---------------------------------------------------------------------------------
_PREDICTORS: "weakref.WeakKeyDictionary[Any, _Predictor]" = weakref.WeakKeyDictionary()


def _predictor(model) -> "_Predictor":
    """One compiled predictor per model, reused across diagnoses (GapMonitor runs every epoch)."""
    if model not in _PREDICTORS:
        _PREDICTORS[model] = _Predictor(model)
    return _PREDICTORS[model]


class _Predictor:
    def __init__(self, model):
        self._model = weakref.ref(model)
        backend = keras.backend.backend()

        def fn(tv, ntv, x, training):
            return self._model().stateless_call(tv, ntv, x, training=training)[0]

        if backend == "jax":
            import jax

            self._fn = jax.jit(fn, static_argnames=("training",))
        elif backend == "tensorflow":
            import tensorflow as tf

            self._fn = tf.function(fn, reduce_retracing=True)
        else:
            self._fn = fn

    def __call__(self, x, non_trainable, training: bool) -> np.ndarray:
        tv = [v.value for v in self._model().trainable_variables]
        if keras.backend.backend() == "torch":
            import torch

            with torch.no_grad():
                out = self._fn(tv, non_trainable, x, training)
        else:
            out = self._fn(tv, non_trainable, x, training)
        return np.asarray(keras.ops.convert_to_numpy(out))


# ---------------------------------------------------------------------------------
# metrics from outputs
# ---------------------------------------------------------------------------------
def _accuracy_for(y: np.ndarray, pred: np.ndarray):
    if pred.ndim >= 2 and pred.shape[-1] > 1:
        if y.shape == pred.shape:
            return keras.metrics.CategoricalAccuracy()
        return keras.metrics.SparseCategoricalAccuracy()
    return keras.metrics.BinaryAccuracy()


def _fresh(metric) -> Any:
    if isinstance(metric, keras.metrics.Metric):
        return metric.__class__.from_config(metric.get_config())
    return metric


class _Metrics:
    """The model's compiled loss and metrics, as fresh objects per evaluation."""

    def __init__(self, model, y: np.ndarray, pred: np.ndarray):
        self.loss = getattr(model, "loss", None)
        compiled = getattr(model, "_compile_metrics", None)
        user = list(keras.tree.flatten(getattr(compiled, "_user_metrics", None) or []))
        self.specs: list[tuple[str, Any]] = []
        labels_like = np.issubdtype(np.asarray(y).dtype, np.integer) or (y.shape == pred.shape and pred.ndim >= 2)
        if self.loss is None:
            if not labels_like or pred.ndim < 2:
                raise ModelError(
                    "the model is not compiled and its outputs are not class scores: compile it with its training "
                    "loss and metrics (model.compile(loss=..., metrics=[...])) so that diagnose can measure them."
                )
            probs = bool(np.all(pred >= 0) and np.allclose(pred.sum(-1), 1.0, atol=1e-3))
            self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not probs) if y.shape != pred.shape else keras.losses.CategoricalCrossentropy(from_logits=not probs)
            user = user or ["accuracy"]
        for m in user:
            if isinstance(m, str):
                name = "accuracy" if m in ("accuracy", "acc") else m
                factory = (lambda: _accuracy_for(y, pred)) if name == "accuracy" else (lambda m=m: keras.metrics.get(m))
            else:
                name = getattr(m, "name", None) or getattr(m, "__name__", str(m))
                factory = lambda m=m: _fresh(m)  # noqa: E731
            self.specs.append((name, factory))

    def compute(self, ys: list, preds: list) -> dict[str, float]:
        out: dict[str, float] = {}
        loss = keras.losses.get(self.loss) if isinstance(self.loss, str) else self.loss
        total, n = 0.0, 0
        for y, p in zip(ys, preds):
            value = np.asarray(keras.ops.convert_to_numpy(loss(y, p)), dtype=np.float64)
            total += float(value.mean()) * len(p)
            n += len(p)
        out["loss"] = total / n
        for name, factory in self.specs:
            metric = factory()
            if isinstance(metric, keras.metrics.Metric):
                for y, p in zip(ys, preds):
                    metric.update_state(y, p)
                out[name] = float(keras.ops.convert_to_numpy(metric.result()))
            else:  # a plain function: mean of per-sample values
                vals = [np.asarray(keras.ops.convert_to_numpy(metric(y, p)), dtype=np.float64).mean() * len(p) for y, p in zip(ys, preds)]
                out[name] = float(np.sum(vals) / n)
        return out


# ---------------------------------------------------------------------------------
def _history_parts(history) -> tuple[dict[str, float], int | None, int | None]:
    if history is None:
        return {}, None, None
    hist = getattr(history, "history", history)
    params = getattr(history, "params", None) or {}
    last = {k: float(v[-1]) for k, v in hist.items() if not k.startswith("val_") and len(v) and isinstance(v[-1], (int, float, np.floating))}
    epochs = len(next(iter(hist.values()))) if hist else None
    return last, params.get("steps"), epochs


def _replicas(model) -> int:
    strategy = getattr(model, "distribute_strategy", None)
    try:
        return int(getattr(strategy, "num_replicas_in_sync", 1) or 1)
    except Exception:  # pragma: no cover - strategy objects vary
        return 1


def diagnose(
    model,
    data: Any,
    *,
    batch_size: int | None = None,
    history: Any = None,
    max_samples: int | None = None,
    val_data: Any = None,
    progress: bool = True,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    bn_updates: int | None = None,
) -> Report:
    """Measure the gap between training and evaluation mode on ``data`` and explain it.

    Args:
        model: a compiled Keras 3 model (its loss and metrics are measured; an uncompiled
            classifier gets cross-entropy and accuracy).
        data: the training data, as :func:`evalgap.keras.recalibrate` takes it, with
            targets: ``(x, y)`` arrays (with ``batch_size``), a ``tf.data.Dataset`` or
            ``PyDataset`` of ``(x, y)`` batches, ...
        batch_size: the training batch size for array data.
        history: ``model.fit``'s History (or its ``.history`` dict): gives F (the last
            epoch's averaged training metrics), the steps per epoch and the epochs trained.
        max_samples: probe at most this many samples (whole batches).
        val_data: separate validation data, for the data term.
        steps_per_epoch, epochs: for the EMA arithmetic when no History is given.
        bn_updates: the number of BatchNorm updates actually made (GapMonitor counts them).

    Returns:
        :class:`evalgap.Report`. The model is left exactly as it was: every variable, its
        modes and attributes, also on error.
    """
    if isinstance(data, tuple) and len(data) >= 2 and hasattr(data[1], "dtype"):
        check_label_dtype(data[1])  # before Keras's adapter fails on it with "Invalid dtype"
    stream, size, how = batches(data, batch_size, targets=True)
    first = first_batch(stream)
    if first is None:
        raise DataError("the data yielded no batch: pass the training data with targets, e.g. (x, y).")
    if first[1] is None:
        raise DataError("diagnose needs targets to measure the loss and metrics: pass (x, y), not x alone.")
    per_batch = size or leading_dim(first[0])
    max_batches = None if max_samples is None else max(1, max_samples // max(per_batch or 1, 1))

    def again():
        yield first
        yield from stream

    probe: list[tuple[Any, Any]] = []
    td_preds: list[np.ndarray] = []

    def keep(batch, y_pred):
        probe.append((batch[0], np.asarray(keras.ops.convert_to_numpy(batch[1]) if not isinstance(batch[1], np.ndarray) else batch[1])))
        td_preds.append(np.asarray(keras.ops.convert_to_numpy(y_pred)))

    if not model.built:
        model(first[0], training=False)  # builds the variables; inference mode changes nothing
    recal = None
    if not find_batchnorms(model):
        # no BatchNorm: still measure the modes (all P == E == Td)
        measured = None
        for b in again():
            if max_batches is not None and len(probe) >= max_batches:
                break
            probe.append((b[0], np.asarray(b[1])))
    else:
        measured = measure(model, again(), max_batches=max_batches, progress=progress, on_output=keep, description="diagnosing: batch statistics")
        recal = apply(measured, write=False)

    predictor = _predictor(model)
    nt_vars = list(model.non_trainable_variables)
    current = [v.value for v in nt_vars]
    position = {id(v): i for i, v in enumerate(nt_vars)}

    def substituted(population: dict[int, Any]) -> list:
        values = list(current)
        for _, bn in find_batchnorms(model):
            moments = population.get(id(bn))
            if moments is None:
                continue
            values[position[id(bn.moving_mean)]] = keras.ops.convert_to_tensor(moments.mean.astype("float32"), dtype=bn.moving_mean.dtype)
            values[position[id(bn.moving_variance)]] = keras.ops.convert_to_tensor(moments.var.astype("float32"), dtype=bn.moving_variance.dtype)
        return values

    xs = [x for x, _ in probe]
    ys = [y for _, y in probe]
    e_preds = [predictor(x, current, False) for x in xs]
    if not td_preds:  # no BN: training mode without dropout equals evaluation mode
        td_preds = e_preds
    p_preds = e_preds if measured is None else [predictor(x, substituted(measured.population()), False) for x in xs]
    training_only = [name for name, layer in walk(model) if any(t in type(layer).__name__ for t in TRAINING_ONLY_TOKENS)]
    t_preds = [predictor(x, current, True) for x in xs] if training_only else td_preds
    if e_preds[0].ndim >= 2 and e_preds[0].shape[-1] > 1 and ys[0].shape != e_preds[0].shape:
        for y in ys:
            check_labels(y, e_preds[0].shape[-1])
    metrics = _Metrics(model, ys[0], e_preds[0])
    by_mode = {"T": metrics.compute(ys, t_preds), "Td": metrics.compute(ys, td_preds), "P": metrics.compute(ys, p_preds), "E": metrics.compute(ys, e_preds)}

    frozen_effect: dict[str, float] = {}
    if recal is not None and recal.frozen and measured is not None:
        pf = [predictor(x, substituted(measured.population(include_frozen=True)), False) for x in xs]
        pf_metrics = metrics.compute(ys, pf)
        frozen_effect = {k: pf_metrics[k] - by_mode["P"][k] for k in pf_metrics}
    if val_data is not None:
        vstream, _, _ = batches(val_data, batch_size, targets=True)
        vys, vpreds = [], []
        for i, (vx, vy, _) in enumerate(vstream):
            if max_batches is not None and i >= max_batches:
                break
            vpreds.append(predictor(vx, current, False))
            vys.append(np.asarray(vy))
        if vpreds:
            by_mode["E_val"] = metrics.compute(vys, vpreds)

    fit_last, steps, hist_epochs = _history_parts(history)
    decompositions = {}
    for name in by_mode["E"]:
        values = {mode: by_mode[mode][name] for mode in by_mode}
        if name in fit_last:
            values["F"] = fit_last[name]
        decompositions[name] = decompose(name, values)

    x_all = np.concatenate([np.asarray(keras.ops.convert_to_numpy(x)) for x in xs[: max(1, 2048 // max(per_batch or 1, 1))]]) if xs and not isinstance(xs[0], (dict, list, tuple)) else None
    bns = find_batchnorms(model)
    ctx = Context(
        framework=f"keras/{keras.backend.backend()}",
        api="evalgap.keras",
        samples=sum(len(y) for y in ys),
        batch_size=per_batch,
        data_expr="train_data",
        input_scale=InputScale.measure(x_all, -1) if x_all is not None else None,
        momenta=[bn.momentum for _, bn in bns],
        convention="keras",
        steps_per_epoch=steps_per_epoch or steps,
        epochs=epochs or hist_epochs,
        bn_updates=bn_updates,
        training_only_layers=training_only,
        other_normalization=[name for name, layer in walk(model) if type(layer).__name__ in OTHER_NORMALIZATION],
        replicas=_replicas(model),
        synchronized=bool(bns) and all(getattr(bn, "synchronized", False) for _, bn in bns),
        frozen_effect=frozen_effect,
        notes=[] if recal is None else [n for n in recal.notes if not n.startswith("batch size")],
    )
    if how != "given" and size is not None:
        ctx.notes.append(f"batch size {size} ({how}).")
    return build_report(decompositions, recal, ctx, primary=_primary(decompositions))


def _primary(decompositions) -> str:
    for name in decompositions:
        if "acc" in name:
            return name
    return "loss"


__all__ = ["diagnose"]
