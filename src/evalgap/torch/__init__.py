"""evalgap for native PyTorch: exact BatchNorm recalibration (and, later, diagnosis).

``import evalgap.torch as eg; eg.recalibrate(model, loader)``
"""

from __future__ import annotations

from .precise_bn import find_batchnorms, is_frozen, recalibrate

__all__ = ["recalibrate", "find_batchnorms", "is_frozen"]
