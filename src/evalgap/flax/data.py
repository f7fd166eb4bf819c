"""The user's data as batches for a Flax model: arrays shuffled like training, the user's batches as they come.

Arrays (``x``, ``(x, y[, sample_weight])`` or a dict ``{"image": x, "label": y}`` of NumPy or
JAX arrays, with ``batch_size=``) are cut into seeded shuffled batches
(:class:`evalgap.engine.ArrayBatches`, as a training epoch draws them; ``shuffle=False`` keeps
the order). Anything else (a list of batches, a generator, a ``tf.data``/grain iterator
turned into NumPy) is taken batch by batch in the user's order. A batch is an array (the
input), a tuple/list ``(x, y[, w])``, or a dict holding the input under one of
:data:`INPUT_KEYS` and the targets under one of :data:`TARGET_KEYS` (a dict without an
input key is the input itself). NumPy and JAX arrays are passed as they are, so a batch
sharded over several devices stays sharded; other array types (``tf.Tensor``) become NumPy.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from ..engine import ArrayBatches, Batch, StreamBatches, tree_leaves, tree_map
from ..errors import DataError

logger = logging.getLogger("evalgap.flax")

#: Keys taken as the model's input when a batch is a dict.
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values")
#: Keys taken as the targets when a batch is a dict.
TARGET_KEYS = ("label", "labels", "y", "target", "targets")


def _is_array(a: Any) -> bool:
    import jax

    return isinstance(a, (np.ndarray, jax.Array))


def _key(batch: Mapping, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in batch), None)


def _as_array(a: Any) -> Any:
    """NumPy and JAX arrays as they are; other array types (tf.Tensor, torch.Tensor) as NumPy."""
    if _is_array(a) or not hasattr(a, "__array__") or isinstance(a, (int, float, str, bytes)):
        return a
    return np.asarray(a)


def leading_dim(x: Any) -> int | None:
    for leaf in tree_leaves(x):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
    return None


def split(raw: Any) -> tuple[Any, Any, Any]:
    """``(inputs, targets, weights)`` of one batch (see the module docstring)."""
    if isinstance(raw, (list, tuple)) and not _is_array(raw):
        if not raw:
            raise DataError("got an empty batch (an empty tuple or list); each batch must hold the input first, e.g. (x, y).")
        parts = list(raw) + [None] * (3 - len(raw))
        return parts[0], parts[1], parts[2]
    if isinstance(raw, Mapping):
        xk, yk = _key(raw, INPUT_KEYS), _key(raw, TARGET_KEYS)
        if xk is None:
            return {k: v for k, v in raw.items() if k != yk}, (raw[yk] if yk else None), None
        return raw[xk], (raw[yk] if yk else None), raw.get("sample_weight")
    return raw, None, None


def _batch(x: Any, y: Any, w: Any, n: int | None = None) -> Batch:
    x, y, w = (tree_map(_as_array, p) for p in (x, y, w))
    return Batch(x, y, w, n if n is not None else leading_dim(x), (x, y) if y is not None else x)


def _stream_batch(raw: Any) -> Batch:
    return _batch(*split(raw))


def _arrays(data: Any) -> tuple[Any, Any, Any] | None:
    """``(x, y, w)`` when ``data`` holds arrays with one row per sample, else None."""
    if _is_array(data):
        return data, None, None
    if isinstance(data, tuple) and 1 <= len(data) <= 3 and all(p is None or (tree_leaves(p) and all(_is_array(a) for a in tree_leaves(p))) for p in data):
        parts = list(data) + [None] * (3 - len(data))
        return parts[0], parts[1], parts[2]
    if isinstance(data, Mapping) and _key(data, INPUT_KEYS) and all(_is_array(a) for a in tree_leaves(data)):
        return split(data)
    return None


def batches(data: Any, *, batch_size: int | None = None, shuffle: bool = True, seed: int = 0, targets: bool = False):
    """The user's data as an engine batch source (see the module docstring)."""
    if data is None:
        raise DataError("data is None: pass the training data (a list or iterator of (x, y) batches, or (x, y) arrays with batch_size=).")
    arrays = _arrays(data)
    if arrays is not None:
        if batch_size is None:
            raise DataError("arrays of samples need batch_size= (your training batch size) to be cut into batches; "
                            "or pass the batches themselves (a list or iterator of (x, y)).")
        return ArrayBatches(arrays, batch_size=batch_size, shuffle=shuffle, seed=seed, to_batch=_batch)
    if batch_size is not None:
        logger.info("batch_size=%s is ignored: the data are already batched", batch_size)
    if not hasattr(data, "__iter__") or isinstance(data, (str, bytes, Mapping)):
        raise DataError(f"cannot read batches from {type(data).__name__}: pass (x, y) arrays with batch_size=, "
                        "or an iterable of (x, y) batches.")
    total = len(data) if hasattr(data, "__len__") else None
    return StreamBatches(lambda: data, to_batch=_stream_batch, reiterable=not hasattr(data, "__next__"), total=total)
