"""Several devices and several processes for Flax.

One process, several devices: a batch that is a ``jax.Array`` sharded along its first axis
(a ``NamedSharding`` over a data axis) is one global batch. The compiled statistics pass
reduces over the whole of it (XLA inserts the cross-device sums), exactly as a jitted Flax
training step normalizes it, so the moments are the global batch's and nothing is left to
combine: :func:`data_shards` only tells the report how many devices shared each batch.

Several processes (``jax.distributed.initialize``): with global arrays (each process holds
its shards of one ``jax.Array``) the pass again sees the global batch and needs no
combination. With process-local batches (and the model's variables on the process's own
devices, as for independent replicas) each process measures its own share and
:class:`ProcessCollective` combines them exactly (the engine's shifted sums, one SUM). Its
float64 vectors travel bit for bit as pairs of ``uint32`` (JAX computes in float32 unless
x64 is on): gathered from every process, summed on the host in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..engine import tree_leaves


def _first_array(x: Any) -> Any:
    import jax

    return next((leaf for leaf in tree_leaves(x) if isinstance(leaf, jax.Array)), None)


def data_shards(x: Any) -> int:
    """How many pieces the batch's first axis is split into across devices (1 for NumPy or one device)."""
    a = _first_array(x)
    if a is None or not getattr(a, "shape", ()) or len(a.sharding.device_set) <= 1:
        return 1
    return max(1, int(a.shape[0]) // int(a.sharding.shard_shape(a.shape)[0]))


def is_global(x: Any) -> bool:
    """The batch is a ``jax.Array`` spanning devices of other processes."""
    a = _first_array(x)
    return a is not None and not a.is_fully_addressable


def _as_words(vector: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(vector, dtype=np.float64)).view(np.uint32)


def _from_words(words: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(words, dtype=np.uint32)).view(np.float64)


class ProcessCollective:
    """:class:`evalgap.engine.Collective` over the JAX processes (``jax.process_count()``)."""

    def __init__(self) -> None:
        import jax

        self.world, self.rank = jax.process_count(), jax.process_index()
        self.description = f"{self.world} JAX processes"

    def sum(self, vector: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(_as_words(vector), tiled=False))
        return np.sum([_from_words(row) for row in gathered.reshape(self.world, -1)], axis=0)

    def broadcast(self, vector: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return _from_words(multihost_utils.broadcast_one_to_all(_as_words(vector)))


def collective(first_inputs: Any) -> ProcessCollective | None:
    """A collective when several processes each pass their own batches; None when the pass sees global batches."""
    import jax

    if jax.process_count() <= 1 or is_global(first_inputs):
        return None
    return ProcessCollective()
