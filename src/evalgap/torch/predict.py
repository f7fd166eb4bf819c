"""Outputs in a chosen mode, without changing the model.

E runs the model itself in eval mode. P runs it in eval mode with the given statistics
swapped into the given layers' running buffers. Modes and buffers are put back when the
context exits, normally or not (Ctrl-C included). T runs on a side copy (``copy.deepcopy``,
one more model in memory while it lasts), in training mode as the user's training loop runs
it (frozen BN layers, and what the model's own ``train()`` keeps in eval mode, stay in eval mode), with the global RNG state put back, so dropout's
draws leave no trace.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._random import random_states_kept
from ..engine import Batch, NormLayer
from ..errors import EvalgapError
from .data import Forward, call_model, to_device
from .layers import eval_in_training, is_frozen, modes_kept, set_modes


def _runner(model: nn.Module, forward: Forward | None, device: torch.device):
    @torch.no_grad()
    def run(batch: Batch) -> Any:
        return call_model(model, to_device(batch.raw, device), forward)

    return run


@contextlib.contextmanager
def predictor(
    model: nn.Module, mode: str, layers: Sequence[NormLayer], stats: Sequence[tuple[np.ndarray, np.ndarray]], *,
    forward: Forward | None, device: torch.device, local_sync: bool = False, left_in_eval: set[int] | None = None,
) -> Iterator[Any]:
    """``run(batch) -> outputs`` in mode E, P or T (module docstring). ``local_sync``: in T, SyncBatchNorm
    layers normalize by each process's own batch statistics, as the Td pass does (no collective per batch,
    so processes with different numbers of batches cannot hang)."""
    if mode in ("E", "P"):
        saved = [(layer.handle.running_mean.detach().clone(), layer.handle.running_var.detach().clone()) for layer in layers]
        with modes_kept(model, False):
            try:
                with torch.no_grad():
                    for layer, (mean, var) in zip(layers, stats):
                        bn = layer.handle
                        bn.running_mean.copy_(torch.as_tensor(mean, dtype=bn.running_mean.dtype))
                        bn.running_var.copy_(torch.as_tensor(var, dtype=bn.running_var.dtype))
                yield _runner(model, forward, device)
            finally:
                with torch.no_grad():
                    for layer, (mean, var) in zip(layers, saved):
                        layer.handle.running_mean.copy_(mean)
                        layer.handle.running_var.copy_(var)
        return
    if mode != "T":
        raise EvalgapError(f"unknown mode {mode!r}: E, P or T.")
    if left_in_eval is None:  # what the model's own train() keeps in eval mode
        left_in_eval = eval_in_training(model)
    trains = any(p.requires_grad for p in model.parameters())
    frozen = {i for i, m in enumerate(model.modules())
              if id(m) in left_in_eval or isinstance(m, _BatchNorm) and is_frozen(m, model, left_in_eval=left_in_eval, model_trains=trains)}
    side = copy.deepcopy(model)
    set_modes(side, True, except_eval={id(m) for i, m in enumerate(side.modules()) if i in frozen})
    if local_sync:
        for m in side.modules():
            if isinstance(m, nn.SyncBatchNorm):
                m.forward = functools.partial(_BatchNorm.forward, m)
    with random_states_kept(python=False, numpy=False):
        yield _runner(side, forward, device)
