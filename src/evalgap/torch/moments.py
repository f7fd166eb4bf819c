"""The moments pass for PyTorch: BN layers on batch statistics, read from the BN kernel itself.

During the pass the model is in eval mode (dropout off); each layer that normalizes by batch
statistics is in training mode with ``momentum = 1.0``, so after a call its running buffers
hold exactly that call's mean and Bessel-corrected variance, computed by the BN kernel that
reads the activations anyway. A forward hook copies them (one (2, C) tensor, left on the
device; :func:`host_captures` moves a whole flush of them in one transfer and converts the
variance to the biased one with ``(n - 1) / n`` in float64). Frozen layers stay in
eval mode; a pre-hook measures their input's moments with ``torch.var_mean``.

Side effects during the pass: the layers' buffers, ``momentum`` and every module's mode.
On exit, normal or not, all of them are put back exactly (``num_batches_tracked`` too).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from ..engine import Batch, NormLayer
from .data import Forward, call_model, to_device
from .layers import set_modes


@dataclass
class _Saved:
    """What the pass may change in one layer, to put back."""

    mean: torch.Tensor | None
    var: torch.Tensor | None
    num_batches: torch.Tensor | None
    momentum: float | None


def _clone(t):
    return None if t is None or is_lazy(t) else t.detach().clone()


def _save(bn: _BatchNorm) -> _Saved:
    return _Saved(_clone(bn.running_mean), _clone(bn.running_var), _clone(bn.num_batches_tracked), bn.momentum)


def _restore(bn: _BatchNorm, saved: _Saved) -> None:
    with torch.no_grad():
        for buf, value in ((bn.running_mean, saved.mean), (bn.running_var, saved.var), (bn.num_batches_tracked, saved.num_batches)):
            if buf is not None and value is not None and not is_lazy(buf):
                buf.copy_(value)
    bn.momentum = saved.momentum


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


def host_captures(captures: list) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Captures ``(index, n, (2, C) device tensor of mean and variance, unbiased?)`` as host float64
    ``(index, n, mean, biased var)``: one concatenation and one transfer for all of them; the
    unbiased variance is multiplied by ``(n - 1) / n`` in float64."""
    if not captures:
        return []
    pairs = [pair for _, _, pair, _ in captures]
    dtype = pairs[0].dtype if all(p.dtype == pairs[0].dtype for p in pairs) else torch.float32
    flat = torch.cat([p if p.dtype == dtype else p.to(dtype) for p in pairs], dim=1).to("cpu", torch.float64).numpy()
    out, offset = [], 0
    for index, n, pair, unbiased in captures:
        c = pair.shape[1]
        mean, var = flat[0, offset : offset + c], flat[1, offset : offset + c]
        offset += c
        out.append((index, n, mean, var * ((n - 1) / n) if unbiased else var))
    return out


@contextlib.contextmanager
def moments_pass(
    model: nn.Module, layers: Sequence[NormLayer], batch_statistics: Sequence[bool], *, forward: Forward | None,
    device: torch.device, local_sync: bool = False,
) -> Iterator[Any]:
    """Yield ``run(batch) -> (captures, output)``; see the module docstring.

    ``local_sync``: SyncBatchNorm layers normalize by local batch statistics (no collective
    per batch; the engine combines processes once at the end).
    """
    modes = {m: m.training for m in model.modules()}
    saved = {layer.handle: _save(layer.handle) for layer in layers}
    captures: list = []
    handles = []
    patched = []
    try:
        set_modes(model, False)
        with torch.no_grad():
            for index, (layer, on_batch) in enumerate(zip(layers, batch_statistics)):
                bn = layer.handle
                if on_batch:
                    bn.training = True
                    bn.momentum = 1.0
                    if not is_lazy(bn.running_mean):  # stale values could be non-finite; 0 * inf = nan
                        bn.running_mean.zero_()
                        bn.running_var.fill_(1.0)
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
        for bn, s in saved.items():
            _restore(bn, s)
        for m, mode in modes.items():
            m.training = mode
