"""``evalgap.torch.recalibrate`` and ``evalgap.torch.diagnose``: the engine with the PyTorch adapter."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn

from .. import engine
from .._checks import check_sizes
from ..recalibration import Recalibration
from ..report import Report
from .adapter import TorchAdapter
from .data import Forward
from .metrics import Metric


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    forward: Forward | None = None,
    include_frozen: bool = False,
    progress: bool = True,
    drop_ragged: bool = True,
    process_group=None,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    max_samples: int | None = None,
    training_metrics: bool = False,
    loss_fn: Metric | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Recalibration:
    """Set every BatchNorm layer's running statistics to the exact population statistics.

    One pass over the data, the BN layers on batch statistics (as in training) and every
    other module in eval mode (dropout off); per layer, in float64,

        mean = sum_b n_b mu_b / N,     var = sum_b n_b (var_b + (mu_b - mean)^2) / N

    (biased variance, what BatchNorm normalizes with in training).

    Args:
        model: any ``nn.Module`` (a DDP wrapper is unwrapped); its ``_BatchNorm`` layers
            (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants, subclasses) are found.
        data: a DataLoader or any iterable of batches: a tensor, a tuple/list whose first
            element is the input, or a dict (input under ``input``/``inputs``/``x``/
            ``image``/``images``/``pixel_values``, else passed as ``model(**batch)``). Or
            arrays ``(x, y)`` / a map-style Dataset with ``batch_size=``: then batches are
            drawn as a shuffled training epoch draws them (``shuffle``, ``seed``). Tensors
            are moved to the model's device. Use the training batch size.
        max_batches: stop after this many batches (default: all of ``data``).
        forward: ``forward(model, batch)`` to call the model yourself (the batch is
            already on the model's device).
        include_frozen: also recalibrate frozen layers (see :func:`is_frozen`); they are
            put in training mode for the pass. Default: left alone and listed.
        progress: show a progress bar.
        drop_ragged: leave out batches smaller than the first (counted in ``skipped_samples``).
        process_group: under ``torch.distributed`` (default: the initialized default group)
            every rank passes its own data and every rank ends with the statistics of the
            union, combined exactly (:mod:`evalgap.torch.distributed`); ranks may have
            different numbers of batches; SyncBatchNorm layers use local batch statistics
            during the pass. Collective: every rank must call it.
        batch_size, shuffle, seed: for array data and Datasets (see ``data``).
        max_samples: use at most this many samples, and at least one batch: whole batches drawn at random from all
            of the arrays (the first batches of a loader).
        training_metrics: also score the pass's own outputs (BN on batch statistics, dropout
            off, these weights, every batch including a ragged last one) with ``loss_fn`` and
            ``metrics``, as :func:`diagnose` takes them (defaults where the shapes leave no
            doubt): the training-mode numbers of exactly these weights, at no extra pass
            (diagnose's Td). Needs ``(input, target)`` batches. Reduced over the ranks of
            ``process_group``. In ``result.training_metrics``.

    Returns:
        :class:`evalgap.Recalibration`, per layer: statistics before and after, drift.

    Side effects: the recalibrated layers' ``running_mean`` / ``running_var``. Nothing else
    (modes, ``momentum``, ``num_batches_tracked``, weights); on failure or
    ``KeyboardInterrupt`` nothing at all (the error names the batch that failed).
    """
    batch_size, max_batches, max_samples = check_sizes(batch_size=batch_size, max_batches=max_batches, max_samples=max_samples)
    adapter = TorchAdapter(forward=forward, process_group=process_group)
    source = adapter.batches(data, batch_size=batch_size, shuffle=shuffle, seed=seed)
    source = source.take(max_samples) if max_samples is not None else source
    options = {k: v for k, v in (("loss_fn", loss_fn), ("metrics", metrics)) if v is not None}
    return engine.recalibrate(
        adapter, model, source, max_batches=max_batches, include_frozen=include_frozen, progress=progress, drop_ragged=drop_ragged,
        training_metrics=training_metrics, metric_options=options,
    )


def diagnose(
    model: nn.Module,
    data: Iterable[Any],
    *,
    loss_fn: Metric | None = None,
    metrics: Mapping[str, Any] | None = None,
    forward: Forward | None = None,
    fit_metric: float | Mapping[str, float] | None = None,
    max_samples: int | None = None,
    val_data: Iterable[Any] | None = None,
    progress: bool = True,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    bn_updates: int | None = None,
    process_group=None,
    primary: str | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> Report:
    """Measure the gap between training and evaluation mode on ``data`` and explain it.

    Args:
        model: the model (a DDP wrapper is unwrapped).
        data: ``(input, target)`` batches of the training batch size (a DataLoader, a list,
            ...), or ``(x, y)`` arrays with ``batch_size=`` (shuffled like training).
        loss_fn: ``(output, target) -> value`` or an ``nn.Module`` loss, called as an
            evaluation loop calls it: on the model's output as the model returns it (tensor,
            tuple, dict) and the batch's targets as they come. The value is the batch mean,
            the batch sum (an ``nn.Module`` loss with ``reduction='sum'``; a plain function's
            one number is a mean) or one value per sample (``reduction='none'``);
            the report gives the mean per sample. Sample weights: pass them with the
            targets, ``(x, (y, w))``, and weight in ``loss_fn``. Default, only where the
            shapes leave no doubt (:mod:`evalgap.engine.tasks`), on the prediction in the
            output (a tensor, a dict's ``logits``, a tuple's first): cross-entropy for class
            scores, BCE-with-logits for one logit and 0/1 targets, MSE for float targets
            shaped like the output; otherwise a DataError asks for it.
        metrics: ``{"name": callable or torchmetrics.Metric}``, called like ``loss_fn``
            (default: accuracy where the task has one).
        forward: ``forward(model, batch) -> output`` to call the model yourself.
        fit_metric: what the training loop reported for the last epoch (F): a dict by metric
            name, or one number for the primary metric.
        max_samples: probe at most this many samples, and at least one batch (whole batches; random batches of
            arrays, the first batches of a loader).
        val_data: separate validation batches, for the data term.
        steps_per_epoch, epochs, bn_updates: for the EMA arithmetic of the running statistics.
        process_group: under ``torch.distributed``, every rank passes its own data; the
            population statistics and the metrics are reduced over the ranks exactly, so
            every rank gets the same modes, terms and causes (what describes the data, such
            as the input scale, is each rank's own shard; collective: every rank must call
            it, with the same model).
        primary: the metric to rank causes by (default: accuracy-like, else the first
            given metric, else the loss).
        batch_size, shuffle, seed: for array data.

    Returns:
        :class:`evalgap.Report`. The model is left exactly as it was: it runs in eval mode
        (for P with the population statistics swapped in and put back), Td in the moments
        pass that puts everything back, T (only with dropout-like modules) on a side copy.
    """
    batch_size, max_samples = check_sizes(batch_size=batch_size, max_samples=max_samples)
    adapter = TorchAdapter(forward=forward, process_group=process_group)
    source = adapter.batches(data, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=True)
    val = None if val_data is None else adapter.batches(val_data, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=True)
    training = engine.Training(fit=fit_metric, steps_per_epoch=steps_per_epoch, epochs=epochs, bn_updates=bn_updates)
    return engine.diagnose(
        adapter, model, source, max_samples=max_samples, val_source=val, training=training, primary=primary, progress=progress,
        metric_options={"loss_fn": loss_fn, "metrics": metrics},
    )
