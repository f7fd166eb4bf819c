"""Errors raised by evalgap. Each message says what was wrong and what to do."""

from __future__ import annotations


class EvalgapError(Exception):
    """Base class of every error evalgap raises on purpose."""


class DataError(EvalgapError, ValueError):
    """The data cannot be used as given (empty, wrong shape, too few samples, ...)."""


class ModelError(EvalgapError, ValueError):
    """The model cannot be handled as given (no BatchNorm to recalibrate, unsupported layer, ...)."""


class RecalibrationError(EvalgapError, RuntimeError):
    """A recalibration pass failed; the model was restored exactly as it was."""


class DistributedError(EvalgapError, RuntimeError):
    """A multi-process set-up evalgap cannot combine exactly."""
