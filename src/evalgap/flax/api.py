"""``evalgap.flax.recalibrate`` and ``evalgap.flax.diagnose``: the engine with the Flax adapter."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .. import engine
from .._checks import check_sizes
from ..recalibration import Recalibration
from ..report import Report
from .adapter import FlaxAdapter
from .layers import LinenModel
from .metrics import Metric


def recalibrate(
    model: Any,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    include_frozen: bool = False,
    progress: bool = True,
    drop_ragged: bool = True,
    train_arg: str | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    training_metrics: bool = False,
    loss_fn: Metric | None = None,
    metrics: Mapping[str, Metric] | None = None,
) -> Recalibration | tuple[Recalibration, dict]:
    """Set every BatchNorm layer's moving statistics to the exact population statistics.

    One jit-compiled pass over the data, each BatchNorm layer normalizing by its batch
    statistics (as in training) and everything else in inference mode (dropout off); per
    layer and channel, in float64 (Flax stores the biased variance)

        mean = sum_b n_b mu_b / N,     var = sum_b n_b (var_b + (mu_b - mean)^2) / N

    Args:
        model: an ``nnx.Module`` (its ``nnx.BatchNorm`` layers, nested, in lists, shared),
            or a Linen pair ``(module, variables)`` with ``variables["batch_stats"]``. Layers
            inside lifted transforms (``nn.remat``/``nn.scan``/``nn.vmap``, ``nnx.remat``/
            ``nnx.scan``/``nnx.vmap``) are measured too, each stacked layer on its own.
        data: an iterable of batches ``(x, y)``, ``x`` or dicts (``{"image": x, "label": y}``)
            of NumPy or JAX arrays, e.g. a ``tf.data``/grain pipeline turned into NumPy; or
            arrays ``(x, y)`` with ``batch_size=``, drawn as a shuffled training epoch draws
            them (``shuffle``, ``seed``). Batches sharded over several devices give the
            statistics of the whole global batch. Use the training batch size.
        max_batches: stop after this many batches.
        include_frozen: also recalibrate frozen layers (``use_running_average=True`` while
            the model trains, as an attribute or a call argument). Default: left alone and listed.
        progress: show a progress bar.
        drop_ragged: leave out batches smaller than the first (counted in the result).
        train_arg: the name of the module's training-flag argument when it is not one of
            ``train``, ``training``, ``is_training`` (or ``deterministic``, ``eval``, ...); or of
            the field a Linen module holds its mode in (``Net(train=False)``: found by itself
            under those names; every mode then runs ``module.clone(train=...)``).
        batch_size, shuffle, seed: for array data.
        training_metrics: also score the pass's own outputs (BN on batch statistics, dropout
            off, these weights, every batch including a ragged last one) with ``loss_fn`` and
            ``metrics``, as :func:`diagnose` takes them (defaults where the shapes leave no
            doubt): the training-mode numbers of exactly these weights, at no extra pass
            (diagnose's Td). Needs ``(x, y)`` batches. In ``result.training_metrics``.

    Returns:
        NNX: :class:`evalgap.Recalibration` (per layer: statistics before and after, drift).
        Linen: ``(Recalibration, new_variables)``; ``variables`` itself is not modified.

    Side effects: NNX, the ``mean``/``var`` of the recalibrated ``nnx.BatchNorm`` layers, in
    place, all or nothing (on failure or Ctrl-C nothing changes; the error names the batch).
    Nothing else: weights, RNG state, ``use_running_average``/``deterministic`` stay as they are.
    """
    batch_size, max_batches = check_sizes(batch_size=batch_size, max_batches=max_batches)
    adapter = FlaxAdapter(train_arg=train_arg)
    source = adapter.batches(data, batch_size=batch_size, shuffle=shuffle, seed=seed)
    options = {k: v for k, v in (("loss_fn", loss_fn), ("metrics", metrics)) if v is not None}
    result = engine.recalibrate(
        adapter, model, source, max_batches=max_batches, include_frozen=include_frozen, progress=progress, drop_ragged=drop_ragged,
        training_metrics=training_metrics, metric_options=options,
    )
    if isinstance(adapter.target, LinenModel):
        return result, adapter.target.variables
    return result


def diagnose(
    model: Any,
    data: Iterable[Any],
    *,
    loss_fn: Metric | None = None,
    metrics: Mapping[str, Metric] | None = None,
    fit_metric: float | Mapping[str, float] | None = None,
    primary: str | None = None,
    max_samples: int | None = None,
    val_data: Iterable[Any] | None = None,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    bn_updates: int | None = None,
    progress: bool = True,
    train_arg: str | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> Report:
    """Measure the gap between training and evaluation mode on ``data`` and explain it.

    Args:
        model: an ``nnx.Module`` or a Linen ``(module, variables)`` pair.
        data: ``(x, y)`` batches of the training batch size, or ``(x, y)`` arrays with
            ``batch_size=`` (shuffled like training), as :func:`recalibrate` takes them.
        loss_fn: ``(output, target) -> scalar`` (the batch mean), e.g.
            ``lambda o, t: optax.softmax_cross_entropy_with_integer_labels(o, t).mean()``.
            Default, only where the shapes leave no doubt (:mod:`evalgap.engine.tasks`, class
            scores on the last axis): cross-entropy for class scores, sigmoid cross-entropy
            for one logit and 0/1 targets, mean squared error for float targets shaped like
            the output; otherwise a DataError asks for it.
        metrics: ``{"name": (output, target) -> scalar}`` (default: accuracy where the task has one).
            With sample weights in the data (``(x, y, w)``, a dict's ``sample_weight``) they are
            weighted as Keras's ``evaluate`` weights them: the loss as Keras's loss,
            ``sum(w * loss) / N`` over all ``N`` samples, every metric as Keras's
            ``weighted_metrics``, ``sum(w * value) / sum(w)``; the callables must then give one
            value per sample (no ``.mean()``), else a DataError.
        fit_metric: what the training loop reported for the last epoch (F): a dict by metric
            name, or one number for the primary metric.
        primary: the metric to rank causes by (default: accuracy-like, else the first given
            metric, else the loss).
        max_samples: probe at most this many samples, and at least one batch (whole batches).
        val_data: separate validation batches, for the data term.
        steps_per_epoch, epochs, bn_updates: for the EMA arithmetic of the moving statistics.
        progress: show a progress bar.
        train_arg: as in :func:`recalibrate`.
        batch_size, shuffle, seed: for array data.

    Returns:
        :class:`evalgap.Report`. The model is left exactly as it was: every mode runs in a
        compiled function on a private copy (NNX) or on the given variables (Linen).
    """
    batch_size, max_samples = check_sizes(batch_size=batch_size, max_samples=max_samples)
    adapter = FlaxAdapter(train_arg=train_arg)
    source = adapter.batches(data, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=True)
    val = None if val_data is None else adapter.batches(val_data, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=True)
    training = engine.Training(fit=fit_metric, steps_per_epoch=steps_per_epoch, epochs=epochs, bn_updates=bn_updates)
    return engine.diagnose(
        adapter, model, source, max_samples=max_samples, val_source=val, training=training, primary=primary, progress=progress,
        metric_options={"loss_fn": loss_fn, "metrics": metrics},
    )
