"""What the adapters' callbacks share: argument checks, the fixed probe, one diagnosis per epoch."""

from __future__ import annotations

import numbers
from typing import Any, Callable

from .._checks import check_sizes
from ..errors import DataError
from ..report import Report
from .batching import materialize
from .diagnose import Training, diagnose
from .protocol import Adapter, BatchSource


def check_schedule(every: int, max_samples: int | None, **sizes: int | None) -> None:
    """A callback's arguments, at construction: ``every`` a whole number >= 1, and ``max_samples`` and the other counts
    given (``batch_size=``, ``max_batches=``) as every ``recalibrate`` and ``diagnose`` checks them
    (:func:`evalgap._checks.check_size`: 2.5 or ``"8"`` failed only at the first epoch's end)."""
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise DataError(f"every must be a whole number >= 1, got {every!r}: pass e.g. every=1.")
    check_sizes(max_samples=max_samples, **sizes)


def check_reiterable(data: Any, who: str, reads: str = "reads the data after every epoch") -> None:
    """Callbacks read the data again at every epoch, or draw from it while training runs: a generator
    would be empty the second time, or hand the callback batches the training loop then misses."""
    if hasattr(data, "__next__"):
        raise DataError(
            f"{who} {reads}, and a generator or iterator is used up after one pass: "
            "pass re-iterable data (arrays, a tf.data.Dataset, a keras.utils.PyDataset, a DataLoader or a list of batches)."
        )


class GapProbe:
    """The gap's terms on a fixed probe subset, once per due epoch.

    Counts training steps (each one a BatchNorm update) so that the EMA arithmetic of
    :attr:`last` (the latest :class:`evalgap.Report`) uses real step counts. ``epoch_logs``
    of the report: ``gap_bn_stale`` (P - E), ``gap_batch_stats`` (Td - P) of the primary
    metric and ``precise_val_<metric>`` (P). The model is never changed.
    """

    def __init__(self, *, max_samples: int = 256, every: int = 1, verbose: int = 1, primary: str | None = None, fix: str,
                 batch_size: int | None = None):
        check_schedule(every, max_samples, batch_size=batch_size)
        self.max_samples, self.every, self.verbose, self.primary, self.fix = max_samples, int(every), verbose, primary, fix
        self.updates = 0
        self.steps_in_epoch = 0
        self.last: Report | None = None
        self._probe: Any = None

    def step(self, n: int = 1) -> None:
        self.updates += n
        self.steps_in_epoch += n

    def due(self, epoch: int) -> bool:
        """Whether the epoch that just ended is measured; called at every epoch's end, so an epoch
        not measured does not count towards the next measured epoch's steps."""
        if (epoch + 1) % self.every == 0:
            return True
        self.steps_in_epoch = 0
        return False

    def measure(
        self, adapter: Adapter, model: Any, source: Callable[[], BatchSource], epoch: int,
        steps_per_epoch: int | None = None, metric_options: dict | None = None, updates: int | None = None,
    ) -> dict[str, float]:
        """Diagnose the probe (drawn from ``source()`` the first time) and return the epoch logs.

        ``updates``: the training steps taken so far where the framework counts them (Keras: the
        optimizer's ``iterations``, earlier fits included); the larger of it and :meth:`step`'s count is used.
        """
        if updates is not None and updates > self.updates:
            self.updates = updates
        if self._probe is None:
            self._probe = materialize(source().take(self.max_samples))
        training = Training(steps_per_epoch=steps_per_epoch or self.steps_in_epoch or None, epochs=epoch + 1, bn_updates=self.updates)
        report = diagnose(adapter, model, self._probe, training=training, primary=self.primary, progress=False, metric_options=metric_options)
        self.steps_in_epoch = 0
        self.last = report
        sentence = report.distortion_sentence(epoch + 1, self.fix)
        if self.verbose and sentence:
            print(sentence)
        return report.epoch_logs()
