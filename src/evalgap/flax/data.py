"""The user's data as batches for a Flax model: arrays shuffled like training, the user's batches as they come.

Arrays (``x``, ``(x, y[, sample_weight])`` or a dict ``{"image": x, "label": y}`` of NumPy or
JAX arrays, with ``batch_size=``) are cut into seeded shuffled batches
(:class:`evalgap.engine.ArrayBatches`, as a training epoch draws them; ``shuffle=False`` keeps
the order). Anything else (a list of batches, a generator, a ``tf.data``/grain iterator
turned into NumPy) is taken batch by batch in the user's order. A batch is an array (the
input), a tuple/list ``(x, y[, w])``, or a dict holding the input under one of
:data:`INPUT_KEYS` and the targets under one of :data:`TARGET_KEYS` (a dict without an
input key is the input itself, for a model that takes a dict; :func:`unkeyed_dict` explains
a model that fails on it). NumPy and JAX arrays are passed as they are, so a batch sharded
over several devices stays sharded; other array types (``tf.Tensor``) become NumPy; inputs
that are not numeric (strings, file paths) are refused with a DataError.
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


def _check_input(x: Any) -> None:
    """A DataError unless every leaf of the model's input is a numeric array or a number."""
    for leaf in tree_leaves(x):
        if isinstance(leaf, (str, bytes)):
            what = f"a {type(leaf).__name__} ({leaf[:40]!r})"
        elif isinstance(leaf, np.ndarray) and leaf.dtype.kind in "USO":
            what = f"a NumPy array of dtype {leaf.dtype}"
        elif _is_array(leaf) or isinstance(leaf, (bool, int, float, complex, np.number, np.bool_)):
            continue
        else:
            what = f"a {type(leaf).__name__}"
        raise DataError(f"the model's input holds {what}, not a numeric array: decode strings, file paths or images into "
                        "arrays first and pass (x, y) batches of NumPy or JAX arrays.")


def _batch(x: Any, y: Any, w: Any, n: int | None = None, raw: Any = None) -> Batch:
    x, y, w = (tree_map(_as_array, p) for p in (x, y, w))
    _check_input(x)
    return Batch(x, y, w, n if n is not None else leading_dim(x), raw if raw is not None else (x, y) if y is not None else x)


def _stream_batch(raw: Any) -> Batch:
    unkeyed = isinstance(raw, Mapping) and _key(raw, INPUT_KEYS) is None
    return _batch(*split(raw), raw=raw if unkeyed else None)  # an unkeyed dict as given: its keys, for unkeyed_dict


def unkeyed_dict(raw: Any, exc: BaseException) -> DataError | None:
    """The error for a model that failed on a dict batch without an input key (its other entries as a dict), else None."""
    if not isinstance(raw, Mapping) or _key(raw, INPUT_KEYS) is not None:
        return None
    yk = _key(raw, TARGET_KEYS)
    found = ", ".join(repr(k) for k in raw) + (f" ({yk!r} taken as the targets)" if yk else "")
    return DataError(
        f"the batches are dicts without an input key: found {found}; recognised input keys are {', '.join(map(repr, INPUT_KEYS))}. "
        f"The other entries were passed to the model as a dict, and it failed on them ({type(exc).__name__}: {str(exc)[:200]}). "
        "Put the input under one of those keys (e.g. {'image': x, 'label': y}) or pass (x, y) tuples."
    )


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
    if isinstance(data, Mapping) and _key(data, INPUT_KEYS) is None:
        raise DataError(f"a dict of arrays needs its input under one of the keys {', '.join(map(repr, INPUT_KEYS))} (found "
                        f"{', '.join(map(repr, data))}): rename it, or pass (x, y) arrays with batch_size=.")
    if not hasattr(data, "__iter__") or isinstance(data, (str, bytes, Mapping)):
        raise DataError(f"cannot read batches from {type(data).__name__}: pass (x, y) arrays with batch_size=, "
                        "or an iterable of (x, y) batches.")
    total = len(data) if hasattr(data, "__len__") else None
    return StreamBatches(lambda: data, to_batch=_stream_batch, reiterable=not hasattr(data, "__next__"), total=total)
