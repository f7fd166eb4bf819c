"""A measuring callback for the seed's job: validation with exact statistics, trajectory untouched."""

from __future__ import annotations

from typing import Any

import keras

from ..keras import find_batchnorms, recalibrate


class PreciseValidation(keras.callbacks.Callback):
    """After each epoch, evaluate ``val_data`` with exact population statistics of ``data``.

    The moving statistics are saved, recalibrated, used for ``evaluate`` and then restored
    bitwise, so training goes on exactly as without this callback (in Keras, moving
    statistics never feed the gradient). Adds ``precise_val_<metric>`` to the epoch logs after
    every ``every``-th epoch (each measurement costs a recalibration and an evaluation pass).
    """

    def __init__(self, data: Any, val_data: Any, *, batch_size: int | None = None, every: int = 1):
        super().__init__()
        self.data, self.val_data, self.batch_size, self.every = data, val_data, batch_size, max(1, int(every))
        self.last = None  # the latest Recalibration

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        bns = [bn for _, bn in find_batchnorms(self.model)]
        saved = [(v, v.numpy()) for bn in bns for v in (bn.moving_mean, bn.moving_variance)]
        try:
            self.last = recalibrate(self.model, self.data, batch_size=self.batch_size, progress=False)
            x, y = self.val_data
            metrics = self.model.evaluate(x, y, batch_size=self.batch_size, verbose=0, return_dict=True)
        finally:
            for v, value in saved:
                v.assign(value)
        if logs is not None:
            logs.update({f"precise_val_{k}": float(v) for k, v in metrics.items()})
