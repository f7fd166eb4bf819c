"""Helpers for Flax training loops: :class:`PreciseBN` before validation, :class:`GapMonitor` per epoch."""

from __future__ import annotations

import time
from typing import Any, Iterable

from .. import engine
from ..recalibration import Recalibration
from .adapter import FlaxAdapter
from .api import recalibrate


class PreciseBN:
    """Recalibrate BatchNorm before validating, every ``every``-th epoch.

    Call it where validation starts; it runs :func:`evalgap.flax.recalibrate` on ``data``
    when the epoch is due::

        precise_bn = evalgap.flax.PreciseBN(train_batches, max_batches=200)
        for epoch in range(epochs):
            train_one_epoch(model, ...)
            precise_bn(model, epoch)                      # NNX: exact statistics, in place
            validate(model, val_batches)

        # Linen: the statistics come back in new variables
        result, variables = precise_bn((module, {"params": state.params, "batch_stats": state.batch_stats}), epoch)
        state = state.replace(batch_stats=variables["batch_stats"])

    Returns the :class:`evalgap.Recalibration` (NNX; ``None`` when the epoch is not due), or
    for Linen ``(Recalibration or None, variables)`` (the given variables when not due).
    The compiled pass is cached per model, so only the first call traces. Side effects: the
    NNX model's BatchNorm statistics, which is the point. Extra keyword arguments go to
    :func:`evalgap.flax.recalibrate` (``batch_size``, ``seed``, ``train_arg``, ...).
    """

    def __init__(self, data: Iterable[Any], *, every: int = 1, max_batches: int | None = None, verbose: int = 1, **recalibrate_kwargs: Any):
        engine.check_schedule(every, None, max_batches=max_batches, batch_size=recalibrate_kwargs.get("batch_size"))
        engine.check_reiterable(data, "PreciseBN")
        self.data, self.every, self.max_batches, self.verbose = data, every, max_batches, verbose
        self.kwargs = recalibrate_kwargs
        self.last: Recalibration | None = None
        self.seconds = 0.0
        self._calls = 0

    def __call__(self, model: Any, epoch: int | None = None) -> Any:
        self._calls += 1
        index = epoch if epoch is not None else self._calls - 1
        linen = isinstance(model, tuple)
        if (index + 1) % self.every:
            return (None, model[1]) if linen else None
        t = time.perf_counter()
        out = recalibrate(model, self.data, max_batches=self.max_batches, progress=False, **self.kwargs)
        self.last = out[0] if linen else out
        self.seconds = time.perf_counter() - t
        if self.verbose:
            print(f"PreciseBN (epoch {index + 1}): {self.last.summary()}")
        return out


class GapMonitor:
    """Measure the gap's terms on a fixed probe subset, once per epoch, from your own loop.

    ::

        monitor = evalgap.flax.GapMonitor(train_batches, max_samples=256)
        for epoch in range(epochs):
            for batch in train_batches:
                ...; monitor.step()
            logs = monitor(model, epoch)     # {'gap_bn_stale': ..., 'gap_batch_stats': ..., 'precise_val_accuracy': ...}

    ``model`` is the NNX module or the Linen ``(module, variables)`` pair of the moment.
    ``step()`` counts BatchNorm updates (one per training step) for the EMA arithmetic. The
    model is never changed. ``primary``, ``loss_fn``, ``metrics``, ``train_arg``,
    ``batch_size``, ``shuffle`` and ``seed`` are as in :func:`evalgap.flax.diagnose`.
    """

    def __init__(
        self, data: Iterable[Any], *, max_samples: int = 256, every: int = 1, verbose: int = 1, primary: str | None = None,
        loss_fn=None, metrics=None, train_arg: str | None = None, batch_size: int | None = None, shuffle: bool = True, seed: int = 0,
    ):
        self.adapter = FlaxAdapter(train_arg=train_arg)
        self.data, self.batching = data, {"batch_size": batch_size, "shuffle": shuffle, "seed": seed}
        self.metric_options = {"loss_fn": loss_fn, "metrics": metrics}
        self.core = engine.GapProbe(max_samples=max_samples, every=every, verbose=verbose, primary=primary, fix=self.adapter.remedies.monitor_fix(),
                                    batch_size=batch_size)

    @property
    def updates(self) -> int:
        return self.core.updates

    @property
    def last(self):
        return self.core.last

    def step(self, n: int = 1) -> None:
        self.core.step(n)

    def __call__(self, model: Any, epoch: int) -> dict[str, float]:
        if not self.core.due(epoch):
            return {}
        source = lambda: self.adapter.batches(self.data, targets=True, **self.batching)  # noqa: E731
        return self.core.measure(self.adapter, model, source, epoch, metric_options=self.metric_options)
