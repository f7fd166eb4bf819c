"""``GapMonitor``: the gap's terms in every epoch's logs, measured on a fixed probe subset."""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from ._data import batches
from .diagnose import diagnose

logger = logging.getLogger("evalgap.keras")


class GapMonitor(keras.callbacks.Callback):
    """After every ``every``-th epoch, measure E, P and Td (and T) on a fixed probe subset.

    Adds to the epoch logs (so History, CSVLogger and TensorBoard carry them):

    - ``gap_bn_stale``: P - E of the primary metric (accuracy if compiled, else the loss):
      what stale moving statistics cost validation;
    - ``gap_batch_stats``: Td - P: batch statistics vs population statistics;
    - ``precise_val_<metric>``: each compiled metric in evaluation mode with exact statistics.

    Prints one plain sentence when the validation numbers are distorted by BatchNorm
    statistics. It counts the training steps (each one a BatchNorm update), so the EMA
    arithmetic in :attr:`last` (the latest :class:`evalgap.Report`) uses real step counts.
    The model is never changed.

    Args:
        data: training data with targets, as :func:`evalgap.keras.diagnose` takes it.
        max_samples: size of the probe subset (whole batches; at least one batch).
        every: measure after every ``every``-th epoch.
        batch_size: the training batch size, for array data.
        verbose: 1 prints the sentence when the gap is significant; 0 is silent.
    """

    def __init__(self, data: Any, *, max_samples: int = 256, every: int = 1, batch_size: int | None = None, verbose: int = 1):
        super().__init__()
        self.data, self.max_samples, self.every, self.batch_size, self.verbose = data, max_samples, int(every), batch_size, verbose
        self.updates = 0
        self.last = None
        self._probe: list | None = None

    def _take_probe(self) -> list:
        stream, size, _ = batches(self.data, self.batch_size, targets=True)
        probe, seen = [], 0
        for x, y, _ in stream:
            n = len(y)
            if probe and (n < len(probe[0][1]) or seen + n > self.max_samples):
                break
            probe.append((np.asarray(keras.ops.convert_to_numpy(x)), np.asarray(keras.ops.convert_to_numpy(y))))
            seen += n
        return probe

    def on_train_batch_end(self, batch, logs=None):
        self.updates += 1

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        if self._probe is None:
            self._probe = self._take_probe()
        steps = (self.params or {}).get("steps")
        report = diagnose(self.model, list(self._probe), progress=False, steps_per_epoch=steps, epochs=epoch + 1, bn_updates=self.updates)
        self.last = report
        if logs is not None:
            logs.update(report.epoch_logs())
        sentence = report.distortion_sentence(epoch + 1, "add evalgap.keras.PreciseBN(train_data) to the callbacks")
        if self.verbose and sentence:
            print(sentence)
        elif sentence is None:
            logger.info("GapMonitor (epoch %d): no significant BatchNorm distortion", epoch + 1)
