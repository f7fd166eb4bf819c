"""Measuring callbacks for the seed's job: validation with exact statistics, trajectory untouched."""

from __future__ import annotations

import time
from typing import Any, Collection

import keras

from .._random import random_states_kept
from ..keras import find_batchnorms, recalibrate, transfer


class PreciseValidation(keras.callbacks.Callback):
    """After each epoch, evaluate ``val_data`` with exact population statistics of ``data``.

    The moving statistics are saved, recalibrated, used for ``evaluate`` and then restored
    bitwise, and the global random states (Python, NumPy, torch on the torch backend, whose
    data loaders draw a seed from it) are put back, so training goes on exactly as without
    this callback (in Keras, moving statistics never feed the gradient). Adds
    ``precise_val_<metric>`` to the epoch logs after every ``every``-th epoch, or after the
    epochs in ``at`` (1-based) when given (each measurement costs a recalibration and an
    evaluation pass), and ``train_mode_<metric>``: the recalibration pass's own outputs scored
    (the epoch's final weights on ``data``, BatchNorm on batch statistics, dropout off).
    """

    def __init__(self, data: Any, val_data: Any, *, batch_size: int | None = None, every: int = 1, at: Collection[int] | None = None):
        super().__init__()
        self.data, self.val_data, self.batch_size, self.every = data, val_data, batch_size, max(1, int(every))
        self.at = None if at is None else set(at)
        self.last = None  # the latest Recalibration
        self.seconds: dict[int, float] = {}  # epoch (1-based) -> seconds the measurement took

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1 not in self.at) if self.at is not None else (epoch + 1) % self.every:
            return
        start = time.perf_counter()
        variables = [v for _, bn in find_batchnorms(self.model) for v in (bn.moving_mean, bn.moving_variance)]
        saved = (variables, transfer.read(variables))  # one transfer each way, not one per variable
        with random_states_kept():
            metrics = self._measure(saved)
        self.seconds[epoch + 1] = time.perf_counter() - start
        if logs is not None:
            logs.update({f"precise_val_{k}": float(v) for k, v in metrics.items()})
            logs.update({f"train_mode_{k}": v for k, v in (self.last.training_metrics or {}).items()})

    def _measure(self, saved) -> dict[str, Any]:
        try:
            self.last = recalibrate(self.model, self.data, batch_size=self.batch_size, progress=False, training_metrics=True)
            x, y = self.val_data
            metrics = self.model.evaluate(x, y, batch_size=self.batch_size, verbose=0, return_dict=True)
        finally:
            transfer.assign(*saved)
        return metrics


class ValidationIsPrecise(keras.callbacks.Callback):
    """Log ``precise_val_<metric>`` = ``val_<metric>`` for a model trained with ``PreciseBN``.

    ``PreciseBN`` recalibrates on all the training data before fit's validation pass, so that
    pass already is the precise measurement; a second one would cost a recalibration and an
    evaluation for the same numbers. Place it after ``PreciseBN`` in the callbacks.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update({f"precise_{k}": float(v) for k, v in list(logs.items()) if k.startswith("val_")})
