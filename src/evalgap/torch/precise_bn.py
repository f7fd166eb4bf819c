"""Exact population statistics for PyTorch BatchNorm layers ("precise BN"), in one pass.

:func:`recalibrate` runs the model once over the data with the BatchNorm layers in
training mode (each batch normalized by its own statistics, as in training) and every
other module in evaluation mode (dropout off), and replaces each layer's
``running_mean`` / ``running_var`` with the exact population statistics of its inputs:

    mean = sum_b n_b mu_b / N,     var = sum_b n_b (var_b + (mu_b - mean)^2) / N

(biased variance, as BatchNorm normalizes with in training), merged in float64.

How the batch statistics are read: during the pass each layer's ``momentum`` is 1.0, so
after a call its running buffers hold exactly that batch's mean and Bessel-corrected
variance; a forward hook copies them (C values each, kept on the device and moved to the
host every :data:`FLUSH_EVERY` batches). No extra pass over the activations is made.

Side effects: only the running buffers of the recalibrated layers change. Modes,
``momentum``, ``num_batches_tracked``, weights and every other buffer are restored; on
any failure or interruption the model is restored exactly as it was.
"""

from __future__ import annotations

import logging
import time
import types
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .._checks import check_count, check_finite
from .._progress import progress_bar
from ..errors import DataError, EvalgapError, ModelError, RecalibrationError
from ..recalibration import LayerRecalibration, Recalibration
from ..stats import ChannelMoments
from ._batches import Forward, batch_size_of, call_model, model_device, to_device
from .distributed import active_group, all_reduce_moments, all_reduce_sums

dist = torch.distributed

logger = logging.getLogger("evalgap.torch")

#: Per-batch statistics stay on the device for this many batches, then move to the host.
FLUSH_EVERY = 32

__all__ = ["recalibrate", "find_batchnorms", "is_frozen"]


def find_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants, subclasses), by name."""
    return [(name or type(model).__name__, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def is_frozen(bn: _BatchNorm, model: nn.Module) -> bool:
    """A BN layer is frozen when it normalizes with its running statistics during training.

    That is: it is in eval mode while the model is in training mode, or it is in eval mode
    and its affine parameters do not require gradients. (When the whole model is in eval
    mode and the parameters are trainable, the mode says nothing and it is not frozen.)
    """
    if bn.training:
        return False
    if model.training:
        return True
    params = [p for p in bn.parameters(recurse=False)]
    return bool(params) and not any(p.requires_grad for p in params)


@dataclass
class _Tracked:
    """Per-layer state during the pass."""

    name: str
    bn: _BatchNorm
    frozen: bool
    pending: list = field(default_factory=list)  # device tensors (2, C): mean, biased var
    pending_counts: list = field(default_factory=list)
    moments: ChannelMoments | None = None
    samples: int = 0
    calls: int = 0
    calls_this_batch: int = 0
    max_calls_per_batch: int = 0
    first_call: int | None = None

    def flush(self) -> None:
        if not self.pending:
            return
        rows = torch.stack(self.pending).to("cpu", torch.float64).numpy()
        for count, (mean, var) in zip(self.pending_counts, rows):
            check_count(count, self.name)
            part = ChannelMoments.from_moments(count, mean, var)
            self.moments = part if self.moments is None else self.moments.merge(part)
        self.pending.clear()
        self.pending_counts.clear()


@dataclass
class _Saved:
    """What the pass may change in one layer, to put back."""

    mean: torch.Tensor | None
    var: torch.Tensor | None
    num_batches: torch.Tensor | None
    momentum: float | None
    training: bool


def _save(bn: _BatchNorm) -> _Saved:
    def clone(t):
        return None if t is None or is_lazy(t) else t.detach().clone()

    return _Saved(clone(bn.running_mean), clone(bn.running_var), clone(bn.num_batches_tracked), bn.momentum, bn.training)


def _restore_buffers(bn: _BatchNorm, saved: _Saved) -> None:
    with torch.no_grad():
        for buf, value in ((bn.running_mean, saved.mean), (bn.running_var, saved.var), (bn.num_batches_tracked, saved.num_batches)):
            if buf is not None and value is not None and not is_lazy(buf):
                buf.copy_(value)


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
) -> Recalibration:
    """Set every BatchNorm layer's running statistics to the exact population statistics.

    Args:
        model: any ``nn.Module``; its BatchNorm layers (``_BatchNorm`` subclasses) are found.
        data: a DataLoader or any iterable of batches: a tensor, a tuple/list whose first
            element is the input, or a dict (input under ``input``/``inputs``/``x``/
            ``image``/``images``/``pixel_values``, else passed as ``model(**batch)``).
            Tensors are moved to the model's device. Use the training batch size.
        max_batches: stop after this many batches (default: all of ``data``).
        forward: ``forward(model, batch)`` to call the model yourself (the batch is
            already on the model's device).
        include_frozen: also recalibrate frozen layers (see :func:`is_frozen`); they are
            put in training mode for the pass. Default: left alone and listed.
        progress: show a progress bar.
        drop_ragged: leave out batches smaller than the first (a ragged last batch has
            other statistics); they are counted in ``skipped_samples``.
        process_group: under ``torch.distributed`` (default: the initialized default group)
            every rank passes its own data and every rank ends with the statistics of the
            union of all ranks' data, combined exactly (:mod:`evalgap.torch.distributed`).
            Ranks may have different numbers of batches. A DDP wrapper is unwrapped; during
            the pass SyncBatchNorm layers normalize by local batch statistics (no collective
            per batch), and only rank 0 shows progress. Collective: every rank must call it.

    Returns:
        :class:`evalgap.Recalibration`, per layer: statistics before and after, drift.

    Side effects: the recalibrated layers' ``running_mean`` / ``running_var`` (biased
    population variance). Nothing else; on failure or ``KeyboardInterrupt`` nothing at
    all (the error names the batch that failed).
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # no per-batch collectives, uneven batches per rank allowed
    if not isinstance(model, nn.Module):
        raise ModelError(f"recalibrate needs a torch.nn.Module, got {type(model).__name__}.")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches must be >= 1 (or None for all batches), got {max_batches}.")
    group = active_group(process_group)
    if group is not None and group[2] != 0:
        progress = False
    found = find_batchnorms(model)
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no BatchNorm layer (torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm or a "
            "_BatchNorm subclass): there are no running statistics to recalibrate. LayerNorm and GroupNorm "
            "normalize each sample the same way in both modes."
        )

    start = time.perf_counter()
    device = model_device(model)
    result = Recalibration(framework="torch")
    modes = {m: m.training for m in model.modules()}
    saved = {bn: _save(bn) for _, bn in found}
    tracked: list[_Tracked] = []
    static: list[LayerRecalibration] = []
    for name, bn in found:
        frozen = is_frozen(bn, model)
        if not bn.track_running_stats or bn.running_mean is None:
            static.append(LayerRecalibration(name, type(bn).__name__, "no-running-stats", bn.num_features, bn.eps))
        else:
            tracked.append(_Tracked(name, bn, frozen=frozen and not include_frozen))
    targets = [t for t in tracked if not t.frozen]
    if not targets and not any(t.frozen for t in tracked):
        raise ModelError(
            "no BatchNorm layer tracks running statistics (all have track_running_stats=False): they use batch "
            "statistics in both modes, so there is nothing to recalibrate."
        )

    order = 0
    handles = []

    def on_call(t: _Tracked) -> None:
        nonlocal order
        t.calls += 1
        t.calls_this_batch += 1
        if t.first_call is None:
            t.first_call = order
            order += 1

    def target_hook(t: _Tracked):
        def hook(module, inputs, output):
            x = inputs[0]
            n = x.numel() // x.shape[1]
            on_call(t)
            # momentum 1.0: the buffers hold this call's mean and unbiased variance
            var = module.running_var * ((n - 1) / n)
            t.pending.append(torch.stack((module.running_mean, var)).detach())
            t.pending_counts.append(n)
            t.samples += int(x.shape[0])

        return hook

    def frozen_hook(t: _Tracked):
        def hook(module, inputs):
            x = inputs[0]
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
            on_call(t)
            t.pending.append(torch.stack((mean, var)))
            t.pending_counts.append(x.numel() // x.shape[1])
            t.samples += int(x.shape[0])

        return hook

    batch_index = -1
    try:
        model.eval()
        with torch.no_grad():
            for t in targets:
                t.bn.train()
                t.bn.momentum = 1.0
                if not is_lazy(t.bn.running_mean):  # stale values could be non-finite; 0 * inf = nan
                    t.bn.running_mean.zero_()
                    t.bn.running_var.fill_(1.0)
                handles.append(t.bn.register_forward_hook(target_hook(t)))
            for t in tracked:
                if t.frozen:
                    handles.append(t.bn.register_forward_pre_hook(frozen_hook(t)))
            if group is not None:  # local batch statistics: no collective per batch
                for t in targets:
                    if isinstance(t.bn, nn.SyncBatchNorm):
                        t.bn.forward = types.MethodType(_BatchNorm.forward, t.bn)

            total = None
            if hasattr(data, "__len__"):
                total = len(data) if max_batches is None else min(len(data), max_batches)
            with progress_bar("recalibrating BatchNorm", total, progress) as advance:
                for batch in data:
                    if max_batches is not None and result.batches >= max_batches:
                        break
                    batch_index += 1
                    size = batch_size_of(batch)
                    if result.batch_size is None:
                        result.batch_size = size
                    elif drop_ragged and size is not None and size < result.batch_size:
                        result.skipped_batches += 1
                        result.skipped_samples += size
                        advance(1)
                        continue
                    for t in tracked:
                        t.calls_this_batch = 0
                    call_model(model, to_device(batch, device), forward)
                    for t in tracked:
                        t.max_calls_per_batch = max(t.max_calls_per_batch, t.calls_this_batch)
                    result.batches += 1
                    result.samples += size or 0
                    if result.batches % FLUSH_EVERY == 0:
                        for t in tracked:
                            t.flush()
                    advance(1)
            for t in tracked:
                t.flush()
            if group is not None:
                _combine_ranks(tracked, result, group[0])
            check_finite([(t.name, t.moments) for t in sorted(tracked, key=lambda t: (t.first_call is None, t.first_call or 0))])
            if result.batches == 0:
                raise DataError(
                    "the data yielded no batch"
                    + (f" of full size (left out {result.skipped_samples} samples of ragged batches)" if result.skipped_batches else "")
                    + ": give at least one batch of the training batch size."
                )

            # write the population statistics, put everything else back
            for t in tracked:  # also num_batches_tracked; lazy layers stay materialized
                _restore_buffers(t.bn, saved[t.bn])
            for t in targets:
                if t.moments is not None:
                    bn = t.bn
                    bn.running_mean.copy_(torch.as_tensor(t.moments.mean, dtype=bn.running_mean.dtype))
                    bn.running_var.copy_(torch.as_tensor(t.moments.var, dtype=bn.running_var.dtype))
    except BaseException as exc:
        for _, bn in found:
            _restore_buffers(bn, saved[bn])
            bn.momentum = saved[bn].momentum
        for m, mode in modes.items():
            m.training = mode
        if isinstance(exc, EvalgapError) or not isinstance(exc, Exception):
            raise
        raise RecalibrationError(_explain_failure(exc, batch_index, tracked)) from exc
    finally:
        for h in handles:
            h.remove()
        for _, bn in found:
            bn.__dict__.pop("forward", None)
    for _, bn in found:
        bn.momentum = saved[bn].momentum
    for m, mode in modes.items():
        m.training = mode

    layers = []
    for t in sorted(tracked, key=lambda t: (t.first_call is None, t.first_call or 0)):
        before = saved[t.bn]
        if t.moments is None:
            status = "unreached"
        else:
            status = "frozen" if t.frozen else "recalibrated"
        layers.append(
            LayerRecalibration(
                name=t.name,
                kind=type(t.bn).__name__,
                status=status,
                channels=t.bn.num_features,
                eps=float(t.bn.eps),
                count=0 if t.moments is None else t.moments.count,
                samples=t.samples,
                calls=t.calls,
                calls_per_batch=t.max_calls_per_batch,
                mean_before=None if before.mean is None else before.mean.cpu().double().numpy(),
                var_before=None if before.var is None else before.var.cpu().double().numpy(),
                mean_after=None if t.moments is None else t.moments.mean,
                var_after=None if t.moments is None else t.moments.var,
            )
        )
    result.layers = layers + static
    result.seconds = time.perf_counter() - start
    result.add_layer_notes("eval mode during training")
    logger.info(result.summary())
    return result


def _combine_ranks(tracked: list[_Tracked], result: Recalibration, group) -> None:
    """Replace each layer's local moments and counts with those of all ranks together."""
    merged = all_reduce_moments([t.moments for t in tracked], [t.bn.num_features for t in tracked], group)
    counts = {"batches": result.batches, "samples": result.samples, "skipped_batches": result.skipped_batches, "skipped_samples": result.skipped_samples}
    for i, t in enumerate(tracked):
        t.moments = merged[i]
        counts.update({f"{i}.samples": t.samples, f"{i}.calls": t.calls, f"{i}.seen": 0 if t.first_call is None else 1})
    total = all_reduce_sums(counts, group)
    for key in ("batches", "samples", "skipped_batches", "skipped_samples"):
        setattr(result, key, int(round(total[key])))
    for i, t in enumerate(tracked):
        t.samples, t.calls = int(round(total[f"{i}.samples"])), int(round(total[f"{i}.calls"]))
        if t.first_call is None and total[f"{i}.seen"] > 0:
            t.first_call = 10**9 + i  # reached on another rank only: keep it, after the local order
    result.notes.append(f"statistics combined exactly over {dist.get_world_size(group)} processes.")


def _explain_failure(exc: Exception, batch_index: int, tracked: list[_Tracked]) -> str:
    where = f"batch {batch_index}" if batch_index >= 0 else "setting up the pass"
    msg = f"recalibration failed at {where} ({type(exc).__name__}: {exc}); the model was restored exactly as it was."
    if "more than 1 value per channel" in str(exc):
        msg += " A batch with one value per channel has zero variance: use the training batch size (> 1)."
    return msg
