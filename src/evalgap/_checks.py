"""Checks shared by the adapters: clear errors for statistics that cannot be right."""

from __future__ import annotations

import numbers
from typing import Collection, Sequence

import numpy as np

from .errors import DataError
from .stats import ChannelMoments


#: What each count argument means, for the messages of :func:`check_size`.
_SIZES = {
    "batch_size": ("the training batch size", "batch_size=32"),
    "max_batches": ("or None for all batches", "max_batches=10, or leave it out"),
    "max_samples": ("or None for all samples", "max_samples=1024, or leave it out"),
}


def check_size(name: str, value) -> int | None:
    """``value`` of the count argument ``name`` (``batch_size``, ``max_batches``, ``max_samples``) as an int >= 1,
    None kept; anything else (0, negative, a float, a string, a bool) is a DataError naming the argument and the value."""
    if value is None:
        return None
    meaning, example = _SIZES.get(name, ("", f"{name}=1"))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be a whole number >= 1 ({meaning}; an int, NumPy integers are fine), got {value!r} "
                        f"of type {type(value).__name__}: pass e.g. {example}.")
    if value < 1:
        raise DataError(f"{name} must be >= 1 ({meaning}), got {int(value)}: pass e.g. {example}.")
    return int(value)


def check_sizes(**sizes) -> tuple[int | None, ...]:
    """:func:`check_size` of each keyword (``batch_size=``, ``max_batches=``, ``max_samples=``), in order: what every
    public ``recalibrate`` / ``diagnose`` checks first, before reading the data."""
    return tuple(check_size(name, value) for name, value in sizes.items())


def check_count(count: int, layer: str) -> None:
    """One value per channel: the batch variance is 0 and the statistics are meaningless."""
    if count == 1:
        raise DataError(
            f"{layer} saw a batch with one value per channel (a batch of 1, or 1 per replica): its batch variance is 0, "
            "so training-mode statistics are meaningless. Use the training batch size (> 1)."
        )


def check_finite(layers: Sequence[tuple[str, ChannelMoments | None]]) -> None:
    """Raise naming the first layer (forward order) whose statistics hold NaN or Inf."""
    present = [m for _, m in layers if m is not None]
    if not present or np.isfinite(np.concatenate([v for m in present for v in (m.mean, m.m2)])).all():
        return  # one check for all (the common case); layer by layer only to name the first bad one
    for i, (name, m) in enumerate(layers):
        if m is None:
            continue
        if not (np.all(np.isfinite(m.mean)) and np.all(np.isfinite(m.m2))):
            where = "the inputs" if i == 0 else f"the layers before {name}"
            raise DataError(
                f"{name} received NaN or Inf values (non-finite statistics): the first such layer in forward order, so "
                f"{where} produce them. Check the data (np.isfinite(x).all()) and the model's weights."
            )


def check_label_dtype(y) -> None:
    """Labels must be numbers (class indices or one-hot vectors), not strings or objects."""
    y = np.asarray(y)
    if y.dtype.kind in "USO":
        raise DataError(
            f"labels must be numbers (class indices or one-hot vectors), got {y.dtype} values such as {y.ravel()[:3].tolist()}: "
            "encode them, e.g. with the sorted class names as indices."
        )


def check_labels(y: np.ndarray, classes: int, ignored: Collection[int] = ()) -> None:
    """Numeric integer class labels that lie in [0, classes), apart from ``ignored`` values (a loss's
    or metric's ``ignore_class``, e.g. 255 for unlabelled pixels)."""
    check_label_dtype(y)
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and y.size and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            return
    if len(ignored):
        y = y[~np.isin(y, list(ignored))]
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise DataError(
            f"labels must be class indices in [0, {classes}) for a model with {classes} outputs, but they range over "
            f"[{int(y.min())}, {int(y.max())}]: check the label encoding (or the model's number of classes)."
        )
