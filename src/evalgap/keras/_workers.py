"""Exact combination of per-channel moments across ``MultiWorkerMirroredStrategy`` workers.

Each worker runs the statistics pass over its own data; then, with the chief's means as a
shared shift ``s``, every worker contributes ``(n, sum(x - s), sum((x - s)^2))`` per layer once
(on its first local replica) and one cross-worker ``SUM`` gives the union's moments exactly,
as :mod:`evalgap.torch.distributed` does for ``torch.distributed``.
"""

from __future__ import annotations

import numpy as np

from ..stats import ChannelMoments, first_means, from_shifted_sums, shifted_sums


def multi_worker_strategy(model):
    """The model's MultiWorkerMirroredStrategy when it spans more than one worker, else None."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    workers = strategy.num_replicas_in_sync // max(1, len(strategy.extended.worker_devices))
    return strategy if workers > 1 else None


def _sum_once_per_worker(strategy, vector: np.ndarray, chief_only: bool = False) -> np.ndarray:
    import tensorflow as tf

    local = len(strategy.extended.worker_devices)

    def value(ctx):
        rid = ctx.replica_id_in_sync_group
        keep = rid == 0 if chief_only else rid % local == 0
        return tf.constant(vector if keep else np.zeros_like(vector), dtype=tf.float64)

    per_replica = strategy.experimental_distribute_values_from_function(value)
    return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))


def combine_workers(strategy, parts: list[ChannelMoments | None], channels: list[int], counters: np.ndarray) -> tuple[list[ChannelMoments | None], np.ndarray]:
    """Every worker's moments merged (collective: every worker calls it), and counters summed."""
    shift = _sum_once_per_worker(strategy, first_means(parts, channels), chief_only=True)
    payload = np.concatenate([shifted_sums(parts, channels, shift), np.asarray(counters, dtype=np.float64)])
    total = _sum_once_per_worker(strategy, payload)
    size = sum(1 + 2 * c for c in channels)
    return from_shifted_sums(total[:size], channels, shift), total[size:]
