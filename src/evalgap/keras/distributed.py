"""Exact combination of per-channel moments across ``MultiWorkerMirroredStrategy`` workers.

Each worker runs the statistics pass over its own data; then, with the chief's means as a
shared shift ``s``, every worker contributes ``(n, sum(x - s), sum((x - s)^2))`` per layer once
(on its first local replica) and one cross-worker ``SUM`` gives the union's moments exactly,
as :mod:`evalgap.torch.distributed` does for ``torch.distributed``. Under a single-worker
strategy (``MirroredStrategy``) the pass already sees whole global batches: nothing to combine.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Iterator

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


@contextlib.contextmanager
def local_variables() -> Iterator[None]:
    """Variables created inside are plain, local ones, even inside a ``tf.distribute`` strategy's scope (Keras 2's
    ``fit`` runs its callbacks there): a diagnosis's fresh metric objects then count this process's batches, updated
    outside any replica, and :func:`evalgap._keras_common.sum_over_workers` combines the workers' once. Created under
    the strategy they were replicated variables: a ``MirroredStrategy``'s refuse ``assign_add`` outside a replica, and
    a ``MultiWorkerMirroredStrategy``'s are reduced across the workers at every update and read, which workers with
    different numbers of batches cannot do. Outside a strategy scope (or without TensorFlow loaded): nothing changes."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not tf.distribute.has_strategy():
        yield
        return
    from tensorflow.python.ops.resource_variable_ops import ResourceVariable

    accepted = set(inspect.signature(ResourceVariable.__init__).parameters) - {"self", "distribute_strategy"}

    def local(next_creator, **kwargs):  # noqa: ARG001 - the strategy's creator is skipped on purpose
        return ResourceVariable(**{k: v for k, v in kwargs.items() if k in accepted})

    with tf.variable_creator_scope(local):
        yield


def refuse_inside_scope() -> None:
    """Keras 3 on TensorFlow: the compiled losses are refused inside ``strategy.scope()`` of several replicas, where
    Keras scales every loss by 1 / replicas (``scale_loss_for_distribution`` reads the strategy in scope, for
    gradients summed over the replicas): the loss would read half of ``evaluate``'s on two replicas. Keras 3's ``fit``
    runs its callbacks outside the scope; Keras 2's losses do not scale there."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        from ..errors import DataError

        raise DataError(
            "evalgap.keras measures the compiled loss inside `with strategy.scope():`, where Keras scales every loss by "
            "1 / replicas: call diagnose (and recalibrate with training_metrics=True) outside the scope, as fit calls "
            "callbacks; the model built in the scope is used as it is."
        )



def global_batch(leaf):
    """A ``tf.distribute`` PerReplica value (a batch of ``strategy.experimental_distribute_dataset``) as the global
    batch it splits, replicas in order; anything else as it is. The statistics pass runs on global batches, in
    cross-replica context. TensorFlow code, shared with the Keras 2 adapter."""
    if type(leaf).__name__ == "PerReplica" and hasattr(leaf, "values"):
        import tensorflow as tf

        return tf.concat(list(leaf.values), axis=0)
    return leaf
