"""Keras 3 callbacks: :class:`PreciseBN` recalibrates before each validation, :class:`GapMonitor` logs the gap.

The logic is shared with the other Keras version (:mod:`evalgap._keras_callbacks`); these
classes bind it to this version's ``Callback`` class and adapter.
"""

from __future__ import annotations

import keras

from .._keras_callbacks import GapMonitorLogic, PreciseBNLogic, doc, run_first
from .adapter import ADAPTER
from .data import is_array_structure

__all__ = ["PreciseBN", "GapMonitor", "run_first"]


class PreciseBN(PreciseBNLogic, keras.callbacks.Callback):
    __doc__ = doc(PreciseBNLogic, "evalgap.keras")
    _adapter, _callback_base = ADAPTER, keras.callbacks.Callback
    _is_array_structure = staticmethod(is_array_structure)


class GapMonitor(GapMonitorLogic, keras.callbacks.Callback):
    __doc__ = doc(GapMonitorLogic, "evalgap.keras")
    _adapter, _callback_base = ADAPTER, keras.callbacks.Callback
