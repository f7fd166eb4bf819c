"""The moments pass for PyTorch: BN layers on batch statistics, read from the BN kernel itself.

During the pass the model is in eval mode (dropout off); each layer that normalizes by batch
statistics is in training mode with ``momentum = 1.0`` and fresh scratch buffers in place of
its ``running_mean`` / ``running_var`` / ``num_batches_tracked`` (views of one zeroed block), so
after a call the scratch holds exactly that call's mean and Bessel-corrected variance,
computed by the BN kernel that reads the activations anyway. A forward hook copies them (one
(2, C) tensor, left on the device; :func:`host_captures` moves a whole flush of them in one
transfer and converts the variance to the biased one with ``(n - 1) / n`` in float64). Frozen
layers stay in eval mode; a pre-hook measures their input's moments with ``torch.var_mean``.

Side effects during the pass: the layers' buffer entries, ``momentum`` and every module's
mode. The model's own buffer tensors are never written (the scratch stands in for them), and
on exit, normal or not, the same tensor objects, ``momentum`` values and modes are put back.
Lazy layers not yet materialized keep what their first call materializes.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from ..engine import Batch, HostCaptures, NormLayer
from .data import Forward, call_model, to_device
from .layers import modes_kept, set_modes, set_training

_STATE = ("running_mean", "running_var", "num_batches_tracked")


class _Scratch:
    """Zeroed stand-ins for the running buffers of a pass: one allocation per (device, dtype), split into views."""

    def __init__(self, bns: Sequence[_BatchNorm]):
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for bn in bns:
            if not is_lazy(bn.running_mean):
                for t in (bn.running_mean, bn.running_var):
                    groups.setdefault((t.device, t.dtype), []).append(t)
        self.views: dict[int, torch.Tensor] = {}
        for (device, dtype), ts in groups.items():
            parts = torch.zeros(sum(t.numel() for t in ts), device=device, dtype=dtype).split([t.numel() for t in ts])
            self.views.update((id(t), part if t.dim() == 1 else part.view(t.shape)) for t, part in zip(ts, parts))
        self.counters: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, t: torch.Tensor) -> torch.Tensor:
        return self.views[id(t)]

    def counter(self, t: torch.Tensor) -> torch.Tensor:
        """One counter every layer adds its calls to (the count is thrown away)."""
        key = (t.device, t.dtype)
        if key not in self.counters:
            self.counters[key] = torch.zeros_like(t)
        return self.counters[key]


def _swap_in_scratch(bn: _BatchNorm, scratch: _Scratch) -> tuple[Any, ...]:
    """Replace the running buffers by scratch tensors for a momentum-1.0 pass; return what to put back.

    The buffer dict is written directly (as ``torch.func.functional_call`` swaps tensors): no
    copy of the user's tensors is made, and none of them is written. The scratch starts at
    zero: momentum 1.0 still reads the old value (``0 * stale inf = nan``)."""
    saved = (*(bn._buffers.get(k) for k in _STATE), bn.momentum)
    object.__setattr__(bn, "momentum", 1.0)  # a plain float attribute; skip nn.Module.__setattr__'s checks
    if not is_lazy(bn.running_mean):  # a lazy layer materializes (in place) its own on the first call
        bn._buffers["running_mean"] = scratch.like(bn.running_mean)
        bn._buffers["running_var"] = scratch.like(bn.running_var)
    if bn._buffers.get("num_batches_tracked") is not None:
        bn._buffers["num_batches_tracked"] = scratch.counter(bn.num_batches_tracked)
    return saved


def _put_back(bn: _BatchNorm, saved: tuple[Any, ...]) -> None:
    *buffers, momentum = saved
    object.__setattr__(bn, "momentum", momentum)
    for key, value in zip(_STATE, buffers):
        if key in bn._buffers:
            bn._buffers[key] = value


def _batch_hook(index: int, captures: list):
    def hook(module, inputs, output):
        x = inputs[0]
        # momentum 1.0: the buffers hold this call's mean and unbiased variance (made biased on the host)
        captures.append((index, x.numel() // x.shape[1], torch.stack((module.running_mean, module.running_var)), True))

    return hook


def _input_hook(index: int, captures: list):
    def hook(module, inputs):
        x = inputs[0]
        var, mean = torch.var_mean(x.detach().float(), dim=[d for d in range(x.dim()) if d != 1], correction=0)
        captures.append((index, x.numel() // x.shape[1], torch.stack((mean, var)), False))

    return hook


def host_captures(captures: list) -> HostCaptures:
    """Captures ``(index, n, (2, C) device tensor of mean and variance, unbiased?)`` on the host:
    one concatenation and one transfer for all of them; the unbiased variances are multiplied
    by ``(n - 1) / n`` in float64, all at once."""
    m = len(captures)
    pairs = [pair for _, _, pair, _ in captures]
    dtype = pairs[0].dtype if m and all(p.dtype == pairs[0].dtype for p in pairs) else torch.float32
    flat = torch.cat([p if p.dtype == dtype else p.to(dtype) for p in pairs], dim=1).to("cpu", torch.float64).numpy() if m else np.zeros((2, 0))
    count = np.fromiter((n for _, n, _, _ in captures), dtype=np.float64, count=m)
    channels = np.fromiter((p.shape[1] for p in pairs), dtype=np.int64, count=m)
    unbiased = np.fromiter((u for *_, u in captures), dtype=bool, count=m)
    bessel = np.where(unbiased, (count - 1) / np.where(count > 0, count, 1), 1.0)
    return HostCaptures(
        index=np.fromiter((i for i, *_ in captures), dtype=np.int64, count=m), count=count, channels=channels,
        mean=flat[0], var=flat[1] * np.repeat(bessel, channels),
    )


@contextlib.contextmanager
def moments_pass(
    model: nn.Module, layers: Sequence[NormLayer], batch_statistics: Sequence[bool], *, forward: Forward | None,
    device: torch.device, local_sync: bool = False,
) -> Iterator[Any]:
    """Yield ``run(batch) -> (captures, output)``; see the module docstring.

    ``local_sync``: SyncBatchNorm layers normalize by local batch statistics (no collective
    per batch; the engine combines processes once at the end).
    """
    with modes_kept(model), _pass(model, layers, batch_statistics, forward, device, local_sync) as run:
        yield run


@contextlib.contextmanager
def _pass(model, layers, batch_statistics, forward, device, local_sync) -> Iterator[Any]:
    saved: list[tuple[_BatchNorm, tuple[Any, ...]]] = []
    captures: list = []
    handles = []
    patched = []
    try:
        set_modes(model, False)
        with torch.no_grad():
            scratch = _Scratch([layer.handle for layer, on_batch in zip(layers, batch_statistics) if on_batch])
            for index, (layer, on_batch) in enumerate(zip(layers, batch_statistics)):
                bn = layer.handle
                if on_batch:
                    set_training(bn, True)
                    saved.append((bn, _swap_in_scratch(bn, scratch)))
                    handles.append(bn.register_forward_hook(_batch_hook(index, captures)))
                    if local_sync and isinstance(bn, nn.SyncBatchNorm):
                        patched.append((bn, bn.__dict__.get("forward")))
                        bn.forward = types.MethodType(_BatchNorm.forward, bn)
                else:
                    handles.append(bn.register_forward_pre_hook(_input_hook(index, captures)))

        def run(batch: Batch):
            captures.clear()
            with torch.no_grad():
                output = call_model(model, to_device(batch.raw, device), forward)
            return list(captures), output

        yield run
    finally:
        for h in handles:
            h.remove()
        for bn, own in patched:  # only what was patched: a user's own instance-level forward stays
            bn.__dict__.pop("forward", None)
            if own is not None:
                bn.__dict__["forward"] = own
        for bn, s in reversed(saved):
            _put_back(bn, s)
