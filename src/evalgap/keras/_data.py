"""Turning what a Keras user passes as data into a stream of model inputs."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from ..errors import DataError, RecalibrationError

logger = logging.getLogger("evalgap.keras")

#: Keras's own default batch size for arrays.
DEFAULT_BATCH_SIZE = 32


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not hasattr(x, "element_spec")


def _is_array_structure(data: Any) -> bool:
    """``x`` or ``(x, y[, sample_weight])`` of arrays (dicts of arrays allowed for ``x``).

    A list is never taken as arrays: it is an iterable of batches.
    """
    import keras

    if isinstance(data, list):
        return False
    if isinstance(data, tuple):
        if not 1 <= len(data) <= 3:
            return False
        parts = [p for p in data if p is not None]
    else:
        parts = [data]
    leaves = [leaf for p in parts for leaf in (keras.tree.flatten(p) if isinstance(p, (dict, tuple, list)) else [p])]
    return bool(leaves) and all(_is_array(leaf) for leaf in leaves)


def batches(data: Any, batch_size: int | None = None, *, targets: bool = False) -> tuple[Iterator[Any], int | None, str]:
    """Return ``(iterator of model inputs x, batch size or None, how the size was chosen)``.

    With ``targets=True`` the iterator yields ``(x, y, sample_weight)`` instead of ``x``.

    Arrays (``x`` or ``(x, y[, sample_weight])``) are batched in order with
    ``batch_size`` (default 32, Keras's default). ``tf.data.Dataset``, ``PyDataset``,
    generators and torch ``DataLoader`` go through Keras's own data adapters and keep
    their batches; any other iterable yields batches as they are (``x`` or ``(x, y, ...)``).
    """
    import keras
    from keras.src.trainers.data_adapters import get_data_adapter

    if data is None:
        raise DataError("data is None: pass the training data (arrays, a tf.data.Dataset, a PyDataset or batches).")
    if _is_array_structure(data):
        x = data[0] if isinstance(data, tuple) and 1 <= len(data) <= 3 else data
        arrays = data if targets and isinstance(data, tuple) else x
        n = len(keras.tree.flatten(x)[0])
        if n == 0:
            raise DataError("the data hold no sample (length 0).")
        how = "given" if batch_size else "Keras's default for arrays; pass batch_size= to use your training batch size"
        size = int(batch_size or DEFAULT_BATCH_SIZE)
        if isinstance(arrays, tuple):
            adapter = get_data_adapter(*arrays, batch_size=size, shuffle=False)
        else:
            adapter = get_data_adapter(arrays, batch_size=size, shuffle=False)
        return _inputs(adapter.get_numpy_iterator(), targets), size, how
    if batch_size is not None:
        logger.info("batch_size=%s is ignored: the data are already batched", batch_size)
    if isinstance(data, (list, tuple)) or hasattr(data, "__next__"):  # batches as they come
        return _inputs(iter(data), targets), None, "the size of the first batch"
    try:
        adapter = get_data_adapter(data, shuffle=False)
        stream = adapter.get_numpy_iterator()
    except ValueError:
        if not hasattr(data, "__iter__"):
            raise DataError(
                f"cannot read batches from {type(data).__name__}: pass NumPy arrays (x or (x, y)) with batch_size, "
                "a tf.data.Dataset, a keras.utils.PyDataset, a generator or an iterable of batches."
            ) from None
        stream = iter(data)
    return _inputs(stream, targets), None, "the size of the first batch"


def _inputs(stream, targets: bool = False) -> Iterator[Any]:
    """``x`` of each ``(x, y[, sample_weight])`` batch (Keras's rule), or the whole triple."""
    from keras.utils import unpack_x_y_sample_weight

    for batch in stream:
        unpacked = unpack_x_y_sample_weight(batch)
        yield unpacked if targets else unpacked[0]


def leading_dim(x: Any) -> int | None:
    import keras

    for leaf in keras.tree.flatten(x):
        if hasattr(leaf, "shape") and len(leaf.shape) > 0:
            return int(leaf.shape[0])
    return None


def as_numpy(x: Any) -> Any:
    import keras

    return keras.tree.map_structure(lambda a: np.asarray(a), x)


def first_batch(stream: Iterator[Any]) -> Any:
    """The first batch, or None; an error while reading it says so (the model is untouched then)."""
    try:
        return next(stream, None)
    except Exception as exc:
        raise RecalibrationError(f"reading the first batch failed ({type(exc).__name__}: {exc}); the model is unchanged.") from exc
