"""Exact combination of per-channel moments across ``MultiWorkerMirroredStrategy`` workers (Keras 2).

Each worker runs the statistics pass over its own data; then every worker contributes its
shifted sums once and one cross-worker ``SUM`` gives the union's moments exactly
(:class:`evalgap.keras.distributed.WorkerCollective`, shared with the Keras 3 adapter: it is
TensorFlow code). Under a single-worker strategy (``MirroredStrategy``) the pass runs the
model on whole batches in cross-replica context: nothing to combine, and writing a moving
statistic (a ``SyncOnReadVariable``) sets it on every replica.
"""

from __future__ import annotations

from ..keras.distributed import WorkerCollective, local_variables


def multi_worker_strategy(model):
    """The model's MultiWorkerMirroredStrategy when it spans more than one worker, else None."""
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    workers = strategy.num_replicas_in_sync // max(1, len(strategy.extended.worker_devices))
    return strategy if workers > 1 else None


def collective(model) -> WorkerCollective | None:
    strategy = multi_worker_strategy(model)
    return None if strategy is None else WorkerCollective(strategy)


__all__ = ["WorkerCollective", "collective", "local_variables", "multi_worker_strategy"]
