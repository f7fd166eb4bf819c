"""``GapMonitor`` for hand-written PyTorch training loops."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..report import Report
from ._batches import batch_size_of
from .diagnose import diagnose


class GapMonitor:
    """Measure the gap's terms on a fixed probe subset, once per epoch, from your own loop.

    ::

        monitor = evalgap.torch.GapMonitor(train_loader, max_samples=256)
        for epoch in range(epochs):
            for batch in train_loader:
                ...; optimizer.step(); monitor.step()
            logs = monitor(model, epoch)     # {'gap_bn_stale': ..., 'gap_batch_stats': ..., 'precise_val_accuracy': ...}

    ``step()`` counts BatchNorm updates (one per training step) for the EMA arithmetic.
    The model is never changed. Extra keyword arguments go to :func:`evalgap.torch.diagnose`
    (``loss_fn``, ``metrics``, ``forward``).
    """

    def __init__(self, data: Iterable[Any], *, max_samples: int = 256, verbose: int = 1, **diagnose_kwargs: Any):
        probe, seen = [], 0
        for batch in data:
            n = batch_size_of(batch) or 0
            if probe and (n < (batch_size_of(probe[0]) or 0) or seen + n > max_samples):
                break
            probe.append(batch)
            seen += n
        self.probe, self.verbose, self.kwargs = probe, verbose, diagnose_kwargs
        self.updates = 0
        self.steps_in_epoch = 0
        self.last: Report | None = None

    def step(self, n: int = 1) -> None:
        self.updates += n
        self.steps_in_epoch += n

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        report = diagnose(
            model, self.probe, progress=False, steps_per_epoch=self.steps_in_epoch or None, epochs=epoch + 1,
            bn_updates=self.updates, **self.kwargs
        )
        self.steps_in_epoch = 0
        self.last = report
        sentence = report.distortion_sentence(epoch + 1, "call evalgap.torch.recalibrate(model, train_loader) before validating")
        if self.verbose and sentence:
            print(sentence)
        return report.epoch_logs()
