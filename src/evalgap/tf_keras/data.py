"""What a Keras 2 user passes as data, as engine batches.

Arrays (``x`` or ``(x, y[, sample_weight])``; dicts and lists of arrays for several inputs or
outputs) are cut into batches as ``fit(shuffle=True)`` cuts them
(:class:`evalgap.engine.ArrayBatches`: a seeded permutation; ``shuffle=False`` keeps the
order; default batch size 32, Keras's), and each batch's float arrays are cast to
``floatx`` as Keras 2's array adapter casts them (integer and ``uint8`` arrays are kept).
A ``tf.data.Dataset``, a ``keras.utils.Sequence``, a generator or a list of batches keep
their batches and their order (the order training saw); so does
``strategy.experimental_distribute_dataset(ds)``, each PerReplica batch joined into the global
batch it splits, replicas in order.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._checks import check_label_dtype
from .._keras_common import check_no_number_lists, check_not_arrays_in_a_list
from ..engine import ArrayBatches, Batch, StreamBatches, tree_leaves, tree_map
from ..errors import DataError
from ..keras.distributed import global_batch
from .layers import keras

logger = logging.getLogger("evalgap.tf_keras")

#: Keras's own default batch size for arrays.
DEFAULT_BATCH_SIZE = 32


def _is_array(x: Any) -> bool:
    # a pandas DataFrame has ``dtypes``, not ``dtype``: Keras's array adapters take it as an array too
    return hasattr(x, "shape") and (hasattr(x, "dtype") or hasattr(x, "dtypes")) and not hasattr(x, "element_spec")


def is_array_structure(data: Any) -> bool:
    """``x`` or ``(x, y[, sample_weight])`` of arrays (dicts/lists of arrays allowed inside).

    A list at the top is never taken as arrays: it is an iterable of batches.
    """
    if isinstance(data, list):
        return False
    if isinstance(data, tuple) and not 1 <= len(data) <= 3:
        return False
    parts = [p for p in data if p is not None] if isinstance(data, tuple) else [data]
    leaves = [leaf for p in parts for leaf in tree_leaves(p)]
    return bool(leaves) and all(_is_array(leaf) for leaf in leaves)


def _floatx(a: Any) -> Any:
    """NumPy floats as ``floatx`` (Keras 2's ``_process_tensorlike``); anything else as it is."""
    a = np.asarray(a) if not hasattr(a, "numpy") else a
    if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating) and a.dtype != np.dtype(keras.backend.floatx()):
        return a.astype(keras.backend.floatx())
    return a


def leading_dim(x: Any) -> int | None:
    for leaf in tree_leaves(x):
        if hasattr(leaf, "shape") and len(leaf.shape) > 0:
            return int(leaf.shape[0])
    return None


def _batch(x: Any, y: Any, w: Any, n: int | None = None) -> Batch:
    x, y, w = tree_map(_floatx, x), tree_map(_floatx, y), tree_map(_floatx, w)
    return Batch(x, y, w, n if n is not None else leading_dim(x))


def unpack(raw: Any) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` from a batch as Keras 2 unpacks it (a list or tuple of 1 to 3, else ``x``)."""
    raw = tuple(raw) if isinstance(raw, list) else raw
    if isinstance(raw, tuple) and 1 <= len(raw) <= 3:
        return (*raw, *(None,) * (3 - len(raw)))
    return raw, None, None


def _unpacked(raw: Any) -> Batch:
    # a batch of ``strategy.experimental_distribute_dataset``: PerReplica values, as the global batch they split
    return _batch(*unpack(tree_map(global_batch, raw)))


def _arrays(data: Any) -> tuple[Any, Any, Any]:
    x, y, w = unpack(data) if isinstance(data, tuple) else (data, None, None)
    # pandas as NumPy, rows by position (ArrayBatches indexes a[idx]: a DataFrame would select columns, a Series labels)
    x, y, w = (tree_map(lambda a: a.to_numpy() if hasattr(a, "to_numpy") and hasattr(a, "iloc") else a, p) for p in (x, y, w))
    for leaf in tree_leaves(y):
        check_label_dtype(leaf)
    return x, y, w


def _dataset_batches(data: Any) -> StreamBatches:
    import tensorflow as tf

    size = int(data.cardinality().numpy())
    source = StreamBatches(lambda: data.as_numpy_iterator(), to_batch=_unpacked, reiterable=True, total=size if size >= 0 else None)
    source.infinite = size == int(tf.data.INFINITE_CARDINALITY)
    return source


def batches(data: Any, *, batch_size: int | None = None, shuffle: bool = True, seed: int = 0, targets: bool = False):
    """The user's data as an engine batch source (see the module docstring)."""
    import tensorflow as tf

    if data is None:
        raise DataError("data is None: pass the training data (arrays, a tf.data.Dataset, a keras.utils.Sequence or batches).")
    check_no_number_lists(data)
    check_not_arrays_in_a_list(data, batch_size)
    if is_array_structure(data):
        size = int(batch_size or DEFAULT_BATCH_SIZE)
        note = None if batch_size else "Keras's default for arrays; pass batch_size= to use your training batch size"
        return ArrayBatches(_arrays(data), batch_size=size, shuffle=shuffle, seed=seed, to_batch=_batch, size_note=note)
    if batch_size is not None:
        logger.info("batch_size=%s is ignored: the data are already batched", batch_size)
    if isinstance(data, tf.data.Dataset):
        return _dataset_batches(data)
    if isinstance(data, keras.utils.Sequence):
        return StreamBatches(lambda: (data[i] for i in range(len(data))), to_batch=_unpacked, reiterable=True, total=len(data))
    if isinstance(data, (list, tuple)) or hasattr(data, "__next__"):  # batches as they come
        total = len(data) if isinstance(data, (list, tuple)) else None
        return StreamBatches(lambda: data, to_batch=_unpacked, reiterable=not hasattr(data, "__next__"), total=total)
    if hasattr(data, "__iter__"):
        return StreamBatches(lambda: data, to_batch=_unpacked, reiterable=True)
    raise DataError(
        f"cannot read batches from {type(data).__name__}: pass NumPy arrays (x or (x, y)) with batch_size, "
        "a tf.data.Dataset, a keras.utils.Sequence, a generator or an iterable of batches."
    )
