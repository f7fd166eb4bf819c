"""Keras callbacks: :class:`PreciseBN` recalibrates BatchNorm before each validation."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import keras

from ..errors import DataError
from ._data import batches, leading_dim
from .precise_bn import recalibrate

logger = logging.getLogger("evalgap.keras")


class PreciseBN(keras.callbacks.Callback):
    """Exact BatchNorm population statistics after every ``every``-th epoch, before validation.

    ``fit`` runs validation (``on_test_begin``) before ``on_epoch_end``; this callback
    recalibrates at that point, so the epoch's ``val_*`` metrics in the logs and the
    History are computed with exact statistics. Without validation it recalibrates at
    ``on_epoch_end``. A standalone ``model.evaluate`` does not trigger it. Once more at
    the end of training if the weights changed since the last run.

    Args:
        data: training data as :func:`evalgap.keras.recalibrate` takes it (batched
            sources keep their batches).
        max_samples: use at most this many samples, whole batches only (default: all).
        every: recalibrate after every ``every``-th epoch.
        verbose: 1 prints one line per run (time, largest drift corrected); 0 is silent.
        batch_size: for array data, the batch size ``fit`` uses (a callback cannot see
            it); without it, Keras's default 32, with a warning.

    Adds ``precise_bn_seconds`` to the epoch logs. Side effects: the model's moving
    statistics, which is the point; training continues from them.
    """

    def __init__(
        self,
        data: Any,
        *,
        max_samples: int | None = None,
        every: int = 1,
        verbose: int = 1,
        batch_size: int | None = None,
    ):
        super().__init__()
        if every < 1:
            raise DataError(f"every must be >= 1, got {every}.")
        if max_samples is not None and max_samples < 1:
            raise DataError(f"max_samples must be >= 1 (or None for all), got {max_samples}.")
        if hasattr(data, "__next__"):
            raise DataError(
                "PreciseBN reads the data after every epoch, and a generator or iterator is used up after one pass: "
                "pass re-iterable data (arrays, a tf.data.Dataset, a keras.utils.PyDataset or a list of batches)."
            )
        self.data = data
        self.max_samples = max_samples
        self.every = int(every)
        self.verbose = verbose
        self.last = None
        self._epoch: int | None = None
        self._done_this_epoch = False
        self._seconds = 0.0
        self._stale = False
        self.batch_size = batch_size
        self._warned = False

    # ---- fit hooks ----------------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._done_this_epoch = False
        self._seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self._stale = True

    def on_test_begin(self, logs=None):
        if self._epoch is not None and self._due():  # validation inside fit
            self._run()

    def on_epoch_end(self, epoch, logs=None):
        if self._due():
            self._run()
        if logs is not None:
            logs["precise_bn_seconds"] = self._seconds
        self._epoch = None

    def on_train_end(self, logs=None):
        if self._stale:
            self._run()
        self._epoch = None

    # ---- work ---------------------------------------------------------------------
    def _due(self) -> bool:
        return not self._done_this_epoch and (self._epoch + 1) % self.every == 0

    def _max_batches(self) -> int | None:
        """Whole batches within ``max_samples``; the batch size is the first batch's."""
        if self.max_samples is None:
            return None
        stream, size, _ = batches(self.data, self.batch_size)
        if size is None:
            first = next(stream, None)
            size = leading_dim(first) if first is not None else None
        return max(1, math.floor(self.max_samples / size)) if size else None

    def _run(self) -> None:
        t = time.perf_counter()
        self.last = recalibrate(
            self.model,
            self.data,
            batch_size=self.batch_size,
            max_batches=self._max_batches(),
            progress=False,
        )
        if self.batch_size is None and self.last.notes and "Keras's default" in self.last.notes[0] and not self._warned:
            logger.warning("PreciseBN: array data without batch_size, so batches of 32 (Keras's default); "
                           "pass PreciseBN(..., batch_size=<fit's batch_size>) to match training.")
            self._warned = True
        self._seconds += time.perf_counter() - t
        self._done_this_epoch = True
        self._stale = False
        if self.verbose:
            where = "end of training" if self._epoch is None else f"epoch {self._epoch + 1}"
            print(f"PreciseBN ({where}): {self.last.summary()}")
