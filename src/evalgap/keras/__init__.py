"""evalgap for Keras 3 (TensorFlow, JAX and PyTorch backends).

``import evalgap.keras as eg; eg.recalibrate(model, data)``; in ``fit``:
``callbacks=[eg.PreciseBN(train_data)]``.
"""

from __future__ import annotations

from ._layers import find_batchnorms, is_frozen
from .callbacks import PreciseBN
from .diagnose import diagnose
from .monitor import GapMonitor
from .precise_bn import recalibrate

__all__ = ["recalibrate", "diagnose", "PreciseBN", "GapMonitor", "find_batchnorms", "is_frozen"]
