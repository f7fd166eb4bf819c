"""evalgap: explain and close the gap between training-mode and evaluation-mode results.

Public API: :mod:`evalgap.torch`, :mod:`evalgap.lightning`, :mod:`evalgap.keras`, :mod:`evalgap.tf_keras` (Keras 2),
:mod:`evalgap.flax` (imported on demand, each needs its framework), :mod:`evalgap.stats`, :class:`Report`,
:class:`Recalibration` and the errors below.
"""

from __future__ import annotations

from .errors import DataError, DistributedError, EvalgapError, ModelError, RecalibrationError
from .recalibration import LayerRecalibration, Recalibration
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "EvalgapError",
    "DataError",
    "ModelError",
    "RecalibrationError",
    "DistributedError",
    "Recalibration",
    "Report",
    "LayerRecalibration",
    "__version__",
]
