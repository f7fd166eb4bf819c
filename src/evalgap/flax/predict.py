"""Outputs in a chosen mode through the compiled forward of :mod:`evalgap.flax.forward`: the model never changes.

- E: every BatchNorm on its moving statistics (one without them in use, ``tracks_statistics``
  False, on batch statistics, as the model's evaluation mode runs it), dropout off, the training flag False;
- P: as E, with the given statistics in place of the moving statistics of the given layers
  (NNX: written into the private copy inside the trace; Linen: a new variables tree);
- T: training mode as the user's training step runs it: BatchNorm on batch statistics
  except frozen layers, dropout on, the training flag True. Dropout draws from a fixed key
  (``jax.random.key(0)`` folded with the batch's position), so T is reproducible; the
  model's own RNG state is neither used nor advanced.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from ..engine import Batch, NormLayer
from ..errors import EvalgapError
from .forward import Plan, bind
from .layers import LinenModel, NnxModel


def plan_for(target: NnxModel | LinenModel, mode: str) -> Plan:
    layers = target.norm_layers()
    if mode in ("E", "P"):
        return Plan(tuple((layer.handle.path, not layer.tracks_statistics, None) for layer in layers))
    if mode == "T":
        return Plan(tuple((layer.handle.path, not layer.frozen, None) for layer in layers), dropout=True, training=True)
    raise EvalgapError(f"unknown mode {mode!r}: E, P or T.")


@contextlib.contextmanager
def predictor(
    target: NnxModel | LinenModel, mode: str, layers: Sequence[NormLayer] = (), stats: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> Iterator[Any]:
    """Yield ``run(batch) -> output`` in ``mode`` (module docstring)."""
    given = {layer.handle.path: (mean, var) for layer, (mean, var) in zip(layers, stats)} if mode == "P" else None
    call = bind(target, plan_for(target, mode), given)
    key = jax.random.key(0)
    position = [0]

    def run(batch: Batch):
        _, output = call(batch.inputs, jax.random.fold_in(key, position[0]))
        position[0] += 1
        return output

    yield run
