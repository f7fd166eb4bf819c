"""What a Keras user passes as data, as engine batches.

Arrays (``x`` or ``(x, y[, sample_weight])``; dicts and lists of arrays for several inputs
or outputs) go through Keras's own array conversion (floats cast to ``floatx``, one sample
weight per output, as ``fit`` and ``evaluate`` see them) and are cut into batches as
``fit(shuffle=True)`` cuts them (:class:`evalgap.engine.ArrayBatches`: a seeded permutation;
``shuffle=False`` keeps the order; default batch size 32, Keras's). ``tf.data.Dataset``,
``PyDataset``, generators and torch ``DataLoader`` go through Keras's data adapters and keep
their batches and order; a list of batches is taken as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._checks import check_label_dtype
from .._keras_common import check_no_number_lists, check_not_arrays_in_a_list, repeats_forever
from .._random import is_torch_loader, iterate_keeping_random_states
from ..engine import ArrayBatches, Batch, StreamBatches, tree_leaves
from ..errors import DataError
from .distributed import global_batch

logger = logging.getLogger("evalgap.keras")

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
    parts = [p for p in data if p is not None] if isinstance(data, tuple) and 1 <= len(data) <= 3 else [data]
    if isinstance(data, tuple) and not 1 <= len(data) <= 3:
        return False
    leaves = [leaf for p in parts for leaf in tree_leaves(p)]
    return bool(leaves) and all(_is_array(leaf) for leaf in leaves)


class _Sliced:
    """One of Keras's sliceable arrays: ``a[indices]`` gives the NumPy batch Keras would give."""

    def __init__(self, sliceable: Any, length: int):
        self.sliceable, self.shape = sliceable, (length,)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.sliceable.convert_to_numpy(self.sliceable[index])


def _keras_arrays(data: tuple | Any, size: int) -> tuple[Any, Any, Any]:
    """``(x, y, w)`` as Keras's ArrayDataAdapter converts them, each leaf sliceable by index."""
    from keras.src.trainers.data_adapters import array_slicing
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
    from keras.utils import unpack_x_y_sample_weight

    parts = data if isinstance(data, tuple) else (data,)
    if len(parts) >= 2 and parts[1] is not None:
        for leaf in tree_leaves(parts[1]):
            check_label_dtype(leaf)  # before Keras fails on it with "Invalid dtype"
    try:
        adapter = ArrayDataAdapter(*parts, batch_size=size, shuffle=False)
    except ValueError as exc:
        raise DataError(f"Keras cannot use these arrays as data: {exc}") from exc
    sliceables = array_slicing.convert_to_sliceable(adapter._inputs, target_backend="numpy")
    n = adapter._num_samples
    from ..engine import tree_map

    return unpack_x_y_sample_weight(tree_map(lambda s: _Sliced(s, n), sliceables))


def _batch(x: Any, y: Any, w: Any, n: int | None = None) -> Batch:
    return Batch(x, y, w, n if n is not None else leading_dim(x))


def leading_dim(x: Any) -> int | None:
    for leaf in tree_leaves(x):
        if hasattr(leaf, "shape") and len(leaf.shape) > 0:
            return int(leaf.shape[0])
    return None


def _unpacked(raw: Any) -> Batch:
    from keras.utils import unpack_x_y_sample_weight

    from ..engine import tree_map

    x, y, w = unpack_x_y_sample_weight(tree_map(global_batch, raw))
    return _batch(x, y, w)


def batches(data: Any, *, batch_size: int | None = None, shuffle: bool = True, seed: int = 0, targets: bool = False):
    """The user's data as an engine batch source (see the module docstring)."""
    from keras.src.trainers.data_adapters import get_data_adapter

    if data is None:
        raise DataError("data is None: pass the training data (arrays, a tf.data.Dataset, a PyDataset or batches).")
    check_no_number_lists(data)
    check_not_arrays_in_a_list(data, batch_size)
    if is_array_structure(data):
        size = int(batch_size or DEFAULT_BATCH_SIZE)
        note = None if batch_size else "Keras's default for arrays; pass batch_size= to use your training batch size"
        return ArrayBatches(_keras_arrays(data, size), batch_size=size, shuffle=shuffle, seed=seed, to_batch=_batch, size_note=note)
    if batch_size is not None:
        logger.info("batch_size=%s is ignored: the data are already batched", batch_size)
    if isinstance(data, (list, tuple)) or hasattr(data, "__next__") or _distributed(data):  # batches as they come
        total = len(data) if isinstance(data, (list, tuple)) else None
        return StreamBatches(lambda: data, to_batch=_unpacked, reiterable=not hasattr(data, "__next__"), total=total)
    try:
        adapter = get_data_adapter(data, shuffle=False)
        make = adapter.get_numpy_iterator
        if is_torch_loader(data):  # its sampler draws from generators fit draws from next: put them back
            make = lambda: iterate_keeping_random_states(data, adapter.get_numpy_iterator())  # noqa: E731
        total = adapter.num_batches
    except ValueError:
        if not hasattr(data, "__iter__"):
            raise DataError(
                f"cannot read batches from {type(data).__name__}: pass NumPy arrays (x or (x, y)) with batch_size, "
                "a tf.data.Dataset, a keras.utils.PyDataset, a generator or an iterable of batches."
            ) from None
        make, total = (lambda: data), None
    source = StreamBatches(make, to_batch=_unpacked, reiterable=True, total=total)
    source.infinite = repeats_forever(data)
    return source


def _distributed(data: Any) -> bool:
    """A ``strategy.experimental_distribute_dataset(...)``: its batches are PerReplica values, made global ones
    (:func:`evalgap.keras.distributed.global_batch`); Keras's NumPy iterator would turn each into an object array."""
    return any(cls.__name__ == "DistributedDataset" and cls.__module__.startswith("tensorflow") for cls in type(data).__mro__)
