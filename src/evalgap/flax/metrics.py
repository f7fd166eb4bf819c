"""The user's loss and metrics for Flax; defaults (optax) only where the shapes leave no doubt.

``loss_fn`` and the values of ``metrics`` are ``(output, target) -> value`` callables, called as
an evaluation loop calls them: on the model's output as the model returns it (an array, a tuple,
a dict) and the targets as the batch holds them. The value is the batch's mean (optax losses
reduced with ``.mean()``, say) or one value per sample (:func:`evalgap.engine.tasks.batch_total`);
each batch's per-sample total is kept on the device and fetched once, so every mode gives the
per-sample mean over all batches, as an evaluation loop that averages per sample does. With
sample weights (``(x, y, w)`` batches or arrays, a dict batch's ``sample_weight``, one weight per
sample) the values are weighted exactly as Keras's ``evaluate(sample_weight=w)`` weights them:
the loss as Keras's loss (reduction ``"sum_over_batch_size"``), ``sum(w * loss) / N`` over all
``N`` samples, and every metric as Keras's ``weighted_metrics``, ``sum(w * value) / sum(w)``; a
callable must then give one value per sample (a DataError asks for it: a batch mean cannot be
weighted). The
callables are compiled together with ``jax.jit`` when they allow it (else they run as they
are). Without ``loss_fn``/``metrics`` the defaults of :mod:`evalgap.engine.tasks` apply, on
the prediction in the output (:func:`prediction`), with Flax's channels-last layout (class
scores on the last axis):

- classification and segmentation: ``optax.softmax_cross_entropy_with_integer_labels``, accuracy;
  integer targets with a last axis of 1 (Keras's ``(N, 1)`` labels) are class indices, as
  Keras's sparse categorical cross-entropy takes them;
- binary (one logit, 0/1 targets): ``optax.sigmoid_binary_cross_entropy``, accuracy at logit 0;
- regression (float targets shaped like the output): mean squared error (``optax.squared_error``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_labels
from ..engine import Batch, Collective
from ..engine.tasks import batch_total, check_class_labels, completed, default_task
from ..errors import DataError, ModelError

Metric = Callable[[Any, Any], Any]


def _per_sample(values: Any) -> Any:
    """Per-sample values: the mean over every axis but the first (segmentation: over the pixels)."""
    return values.reshape(values.shape[0], -1).mean(-1) if values.ndim > 1 else values


def prediction(output: Any) -> Any:
    """The prediction in a model's output: the array, a dict's logits/output/out, a tuple's first element."""
    if isinstance(output, (jax.Array, np.ndarray)):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "output", "out"):
            if key in output:
                return output[key]
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], (jax.Array, np.ndarray)):
        return output[0]
    raise ModelError(f"cannot find the model's prediction in an output of type {type(output).__name__}: return an array "
                     "(or a dict with 'logits').")


def _indices(output, target):
    """Integer class indices shaped like the class scores without their last axis (``(N, 1)`` labels as ``(N,)``)."""
    return target.reshape(output.shape[:-1]).astype(jnp.int32)


def _ce(output, target):
    import optax

    return _per_sample(optax.softmax_cross_entropy_with_integer_labels(output.astype(jnp.float32), _indices(output, target)))


def _accuracy(output, target):
    return _per_sample((jnp.argmax(output, -1) == _indices(output, target)).astype(jnp.float32))


def _bce(output, target):
    import optax

    return _per_sample(optax.sigmoid_binary_cross_entropy(output.astype(jnp.float32), target.reshape(output.shape).astype(jnp.float32)))


def _binary_accuracy(output, target):
    return _per_sample(((output > 0) == (target.reshape(output.shape) > 0.5)).astype(jnp.float32))


def _mse(output, target):
    import optax

    return _per_sample(optax.squared_error(output.astype(jnp.float32), target.reshape(output.shape).astype(jnp.float32)))


DEFAULTS: dict[str, tuple[Metric, dict[str, Metric]]] = {
    "classification": (_ce, {"accuracy": _accuracy}),
    "segmentation": (_ce, {"accuracy": _accuracy}),
    "binary": (_bce, {"accuracy": _binary_accuracy}),
    "regression": (_mse, {}),
}


def _ignore_fix(v: int, classes: int) -> str:
    """A loss and metrics that leave the 'no label' marker ``v`` out (:func:`evalgap.engine.tasks.check_class_labels`)."""
    return (f"a loss and metrics that mask them, e.g. loss_fn=lambda o, t: (optax.softmax_cross_entropy_with_integer_labels("
            f"o, jnp.where(t == {v}, 0, t)) * (t != {v})).sum() / (t != {v}).sum() and metrics={{'accuracy': lambda o, t: "
            f"((o.argmax(-1) == t) & (t != {v})).sum() / (t != {v}).sum()}}")


#: A loss that leaves non-finite targets out, for the error that asks for one (:func:`evalgap.engine.tasks.non_finite_error`).
MASKED_EXAMPLE = ("loss_fn=lambda o, t: jnp.where(jnp.isfinite(t), (o - jnp.nan_to_num(t)) ** 2, 0).sum() / "
                  "jnp.isfinite(t).sum()")


def _non_finite(target: Any) -> tuple[int, int]:
    """How many values of floating-point targets are NaN or Inf, and of how many (0, 0 for anything else)."""
    if target is None or not hasattr(target, "shape") or not hasattr(target, "dtype"):
        return 0, 0
    t = np.asarray(jax.device_get(target))
    if t.dtype.kind not in "fc":
        return 0, 0
    return int((~np.isfinite(t)).sum()), int(t.size)


def _task(output: Any, target: Any) -> str:
    """The default task for a channels-last output (the engine's table is written channels-first)."""
    if target is None or not hasattr(target, "shape"):
        raise DataError(f"the targets are {type(target).__name__}, not an array: pass loss_fn= and metrics= that take them.")
    t = np.asarray(jax.device_get(target))
    if t.dtype.kind in "USO":
        check_labels(t, 2)
    shape = tuple(output.shape)
    first = (shape[0], shape[-1], *shape[1:-1]) if len(shape) >= 3 else shape
    target = (t.shape[0], t.shape[-1], *t.shape[1:-1]) if t.ndim == len(shape) >= 3 else t.shape  # channels first too
    binary = bool(t.size) and bool(np.isin(t, (0, 1)).all())
    f = t.astype(np.float64) if t.dtype.kind == "f" else None
    soft = f is not None and t.ndim >= 2 and t.shape[-1] >= 2 and bool((f >= 0).all()) and np.allclose(f.sum(-1), 1.0, atol=1e-4)
    task = default_task(first, target, t.dtype.kind in "iub", binary, soft)
    if task is None:
        why = (" The targets look like class probabilities (soft labels: label smoothing, mixup, distillation): "
               "optax.softmax_cross_entropy(o, t).mean() takes them." if soft else "")
        raise DataError(
            f"cannot choose a loss for outputs of shape {shape} and {t.dtype} targets of shape {t.shape}: pass "
            "loss_fn=(output, target) -> scalar (e.g. lambda o, t: optax.sigmoid_binary_cross_entropy(o, t).mean()) "
            f"and metrics={{'name': (output, target) -> scalar}}.{why}"
        )
    if task in ("classification", "segmentation"):
        check_class_labels(t, int(shape[-1]), _ignore_fix)
        p = np.asarray(jax.device_get(output), dtype=np.float64)
        if (p >= 0).all() and np.allclose(p.sum(-1), 1.0, atol=1e-4):
            raise DataError("the outputs look like probabilities (non-negative, summing to 1), and cross-entropy expects "
                            "logits: return logits, or pass loss_fn= (e.g. lambda p, t: -jnp.log(p[jnp.arange(len(t)), t]).mean()).")
    return task


class FlaxMetrics:
    """:class:`evalgap.engine.Metrics` for Flax (see the module docstring)."""

    def __init__(self, loss_fn: Metric, metrics: Mapping[str, Metric], *, given: list[str], notes: list[str], collective: Collective | None,
                 defaults: frozenset[str] = frozenset()):
        self.loss_fn, self.metrics, self.collective = loss_fn, dict(metrics), collective
        self.names = ["loss", *self.metrics]
        self.given, self.notes = given, notes
        self.defaults = defaults  # names computed by the defaults, on prediction(output)
        calls = [(name in defaults, fn) for name, fn in zip(self.names, [loss_fn, *self.metrics.values()])]
        self._eager = lambda out, y: tuple(jnp.asarray(fn(prediction(out) if on_pred else out, y), jnp.float32) for on_pred, fn in calls)
        self._jitted = jax.jit(self._eager)
        self._compiled: bool | None = None

    @classmethod
    def choose(cls, batch: Batch, outputs: Any, *, loss_fn=None, metrics=None, collective=None) -> "FlaxMetrics":
        """The user's loss and metrics, completed with the defaults the shapes imply."""
        if metrics is not None and not isinstance(metrics, Mapping):
            raise DataError("metrics must be a dict {'name': (output, target) -> scalar}.")
        given = list(metrics) if metrics else []
        loss_fn, metrics, defaults, notes = completed(loss_fn, metrics, lambda: _task(prediction(outputs), batch.targets), DEFAULTS,
                                                      lambda: _non_finite(batch.targets), MASKED_EXAMPLE)
        if batch.weights is not None:
            notes.append("weighted by the sample weights as Keras's evaluate weights them: the loss sum(w * loss) / N over "
                         "all N samples, every metric sum(w * value) / sum(w) (Keras's weighted_metrics).")
        return cls(loss_fn, metrics, given=given, notes=notes, collective=collective, defaults=defaults)

    def values(self, out: Any, target: Any) -> tuple:
        """Every callable's value on one batch: compiled together when they allow it, else as they are."""
        if self._compiled is None:
            try:
                result = self._jitted(out, target)
                self._compiled = True
                return result
            except Exception:  # a callable that cannot be traced (NumPy inside, Python branches on values)
                self._compiled = False
        return self._jitted(out, target) if self._compiled else self._eager(out, target)

    def new(self) -> "_State":
        return _State(self)


def _weights(w: Any, k: int) -> Any:
    """A batch's sample weights as a float32 vector of ``k``; a DataError for another shape."""
    shape = tuple(np.shape(w))
    if shape not in ((k,), (k, 1)):
        raise DataError(f"the sample weights of a batch of {k} samples have shape {shape}: give one weight per sample, shape ({k},).")
    return jnp.asarray(w, jnp.float32).reshape(k)


class _State:
    def __init__(self, spec: FlaxMetrics):
        self.spec = spec
        # per batch: its number of samples, its sum of weights (the number of samples when unweighted), then the
        # weighted per-sample totals, all on the device: fetched once, summed in float64
        self.batches: list[Any] = []
        self.weighted = False

    def update(self, batch: Batch, outputs: Any) -> None:
        k = batch.size if batch.size is not None else int(prediction(outputs).shape[0])
        w = None if batch.weights is None else _weights(batch.weights, k)
        self.weighted = self.weighted or w is not None
        totals = [jnp.asarray(k, jnp.float32), jnp.asarray(k, jnp.float32) if w is None else w.sum()]
        for name, v in zip(self.spec.names, self.spec.values(outputs, batch.targets)):
            each = batch_total(name if name != "loss" else "loss_fn", tuple(v.shape), k) == "each" or k == 1  # one value per sample
            if w is not None and not each:
                raise DataError(
                    f"{name if name != 'loss' else 'loss_fn'} gave one number for a batch with sample weights, which cannot be "
                    "weighted: return one value per sample (e.g. optax.softmax_cross_entropy_with_integer_labels(o, t) "
                    "without .mean()), and evalgap weights them as Keras does (the loss sum(w * loss) / N, a metric "
                    "sum(w * value) / sum(w)); or leave the weights out of the batches for unweighted values."
                )
            if not each:
                totals.append(v.reshape(()) * k)
            else:
                totals.append(v.sum() if w is None else (v.reshape(k) * w).sum())
        self.batches.append(jnp.stack(totals))

    def result(self) -> dict[str, float]:
        values = np.asarray(jax.device_get(self.batches), dtype=np.float64).reshape(len(self.batches), 2 + len(self.spec.names))
        totals = values.sum(axis=0)
        if self.spec.collective is not None:  # weighted sums, samples and total weight over every process
            totals = self.spec.collective.sum(totals)
        samples, weight = totals[0], totals[1]
        if self.weighted and not weight > 0:
            raise DataError(f"the sample weights sum to {weight:g} over the data: give positive weights.")
        with np.errstate(invalid="ignore", divide="ignore"):  # Keras: the loss over the samples, a metric over the weight
            return {name: float(v / (samples if name == "loss" else weight)) for name, v in zip(self.spec.names, totals[2:])}
