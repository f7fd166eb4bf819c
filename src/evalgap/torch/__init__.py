"""evalgap for native PyTorch: exact BatchNorm recalibration and diagnosis of the train/eval gap.

``import evalgap.torch as eg; eg.recalibrate(model, loader)``
"""

from __future__ import annotations

from .diagnose import diagnose
from .hooks import PreciseBN
from .monitor import GapMonitor
from .precise_bn import find_batchnorms, is_frozen, recalibrate

__all__ = ["recalibrate", "diagnose", "PreciseBN", "GapMonitor", "find_batchnorms", "is_frozen"]
