"""Exact combination of per-channel moments across ``MultiWorkerMirroredStrategy`` workers.

Each worker runs the statistics pass over its own data; then, with the chief's means as a
shared shift ``s``, every worker contributes ``(n, sum(x - s), sum((x - s)^2))`` per layer once
(on its first local replica) and one cross-worker ``SUM`` gives the union's moments exactly,
as :mod:`evalgap.torch.distributed` does for ``torch.distributed``. Under a single-worker
strategy (``MirroredStrategy``) the pass already sees whole global batches: nothing to combine.
"""

from __future__ import annotations

import numpy as np


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


class WorkerCollective:
    """:class:`evalgap.engine.Collective` over the workers of a MultiWorkerMirroredStrategy."""

    def __init__(self, strategy):
        self.strategy = strategy
        local = max(1, len(strategy.extended.worker_devices))
        self.world = strategy.num_replicas_in_sync // local
        resolver = getattr(strategy, "cluster_resolver", None)
        self.rank = int(getattr(resolver, "task_id", 0) or 0)
        self.description = f"{strategy.num_replicas_in_sync} replicas on several workers"

    def _sum_once_per_worker(self, vector: np.ndarray, chief_only: bool) -> np.ndarray:
        import tensorflow as tf

        strategy = self.strategy
        local = len(strategy.extended.worker_devices)

        def value(ctx):
            rid = ctx.replica_id_in_sync_group
            keep = rid == 0 if chief_only else rid % local == 0
            return tf.constant(vector if keep else np.zeros_like(vector), dtype=tf.float64)

        per_replica = strategy.experimental_distribute_values_from_function(value)
        return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))

    def sum(self, vector: np.ndarray) -> np.ndarray:
        return self._sum_once_per_worker(np.asarray(vector, dtype=np.float64), chief_only=False)

    def broadcast(self, vector: np.ndarray) -> np.ndarray:
        return self._sum_once_per_worker(np.asarray(vector, dtype=np.float64), chief_only=True)


def collective(model) -> WorkerCollective | None:
    strategy = multi_worker_strategy(model)
    return None if strategy is None else WorkerCollective(strategy)


def outside_scope(found: WorkerCollective | None, api: str) -> WorkerCollective | None:
    """``found``, the collective that sums a diagnosis's metric states over the workers, checked to be used outside
    ``strategy.scope()``: metric objects created there hold variables that TensorFlow reduces across the workers at
    every update, which workers with different numbers of batches cannot do (a collective shape mismatch)."""
    if found is not None:
        import tensorflow as tf

        if tf.distribute.has_strategy():
            from ..errors import DataError

            raise DataError(f"{api}.diagnose runs inside strategy.scope() under MultiWorkerMirroredStrategy: call it outside "
                            "the `with strategy.scope():` block (as fit runs callbacks); every worker's metrics are summed "
                            "after the passes.")
    return found
