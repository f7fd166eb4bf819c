"""The moments pass for Flax: one compiled forward per batch, BatchNorm on batch statistics, all else inference mode.

Every layer with ``batch_statistics[i]`` normalizes by its batch statistics, as in training;
the other (frozen) layers normalize by their moving statistics, as they do in training, and
are only observed; a layer without moving statistics in use (not among ``layers``) runs as in
training, uncaptured; dropout is off and the model's training flag, if it has one, is False.
Per BatchNorm call the pass returns ``(count, mean, biased var)`` of the layer's input
(:func:`evalgap.flax.forward.moments`: two-pass, at least float32, per channel) as outputs of
the compiled function, left on the device for the engine to fetch in bulk.

Side effects: none. NNX: the compiled function works on a private copy merged from
``nnx.split(model)``; Linen: ``apply`` returns the updated ``batch_stats``, which are dropped.
The compiled function is cached per model and choice of layers
(:mod:`evalgap.flax.forward`), so PreciseBN traces once per model, not once per epoch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from ..engine import Batch, NormLayer
from .forward import Plan, bind, unpack
from .layers import LinenModel, NnxModel


def plan_for(layers: Sequence[NormLayer], batch_statistics: Sequence[bool], static: Sequence[NormLayer] = ()) -> Plan:
    """Layer i on batch statistics where ``batch_statistics[i]``, its input's moments capture i; ``static`` (layers
    without moving statistics in use) as in training (batch statistics unless frozen), not captured."""
    planned = [(layer.handle.path, bool(b), i) for i, (layer, b) in enumerate(zip(layers, batch_statistics))]
    return Plan(tuple(planned + [(layer.handle.path, not layer.frozen, None) for layer in static]))


@contextlib.contextmanager
def moments_pass(target: NnxModel | LinenModel, layers: Sequence[NormLayer], batch_statistics: Sequence[bool]) -> Iterator[Any]:
    """Yield ``run(batch) -> (captures, output)``; see the module docstring."""
    static = [layer for layer in target.norm_layers() if not layer.tracks_statistics]
    call = bind(target, plan_for(layers, batch_statistics, static))

    def run(batch: Batch):
        packed, output = call(batch.inputs)
        return unpack(packed), output

    yield run
