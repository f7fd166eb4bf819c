"""Keras variables to and from the host in bulk: one transfer each way, whatever the number of layers.

Reading 53 BatchNormalization layers' moving mean and variance one ``.numpy()`` at a time is
106 device-to-host copies, each a synchronization on a GPU; writing them one ``assign`` of a
NumPy array at a time is 106 host-to-device copies. Here the values travel together,
concatenated per dtype on the device (on JAX in one compiled step, so one dispatch rather than
one per variable), moved in one copy and split on the other side. Values are bitwise those of
the per-variable route: nothing is cast except to the variable's own dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import keras
import numpy as np


def read(variables: Sequence[Any]) -> list[np.ndarray]:
    """Each variable's value as a NumPy array of its own shape and dtype, in one device-to-host transfer per dtype."""
    values = [v.value for v in variables]
    if not values:
        return []
    jax_backend = keras.backend.backend() == "jax"
    out: list[np.ndarray | None] = [None] * len(values)
    for indices in _by_dtype(values).values():
        if jax_backend:
            flat = _jax_concat(tuple(values[i] for i in indices))
        elif len(indices) > 1:
            flat = keras.ops.concatenate([keras.ops.reshape(values[i], (-1,)) for i in indices])
        else:
            flat = keras.ops.reshape(values[indices[0]], (-1,))
        host = np.asarray(keras.ops.convert_to_numpy(flat))
        sizes = [int(np.prod(tuple(values[i].shape), dtype=np.int64)) for i in indices]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for i, a, b in zip(indices, starts[:-1], starts[1:]):
            out[i] = host[a:b].reshape(tuple(values[i].shape))
    return out  # type: ignore[return-value]


def assign(variables: Sequence[Any], arrays: Sequence[np.ndarray]) -> None:
    """``v.assign(a)`` for each pair, the arrays moved to the device in one transfer per dtype.

    Every array is cast to its variable's dtype and checked against its shape before anything
    is assigned, so a bad array leaves every variable as it was.
    """
    if len(variables) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for {len(variables)} variables")
    host = []
    for v, a in zip(variables, arrays):
        a = np.asarray(a)
        shape = tuple(int(d) for d in v.shape)
        if a.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"cannot assign {a.size} values to {v.path if hasattr(v, 'path') else v.name} of shape {shape}")
        host.append(np.ascontiguousarray(a.reshape(shape).astype(keras.backend.standardize_dtype(v.dtype), copy=False)))
    if not host:
        return
    jax_backend = keras.backend.backend() == "jax"
    device: list[Any] = [None] * len(host)
    for indices in _by_dtype(host).values():
        flat = keras.ops.convert_to_tensor(np.concatenate([host[i].reshape(-1) for i in indices]))
        if jax_backend:
            parts = _jax_split(flat, tuple(host[i].shape for i in indices))
        else:
            sizes = [host[i].size for i in indices]
            parts = keras.ops.split(flat, np.cumsum(sizes)[:-1].tolist()) if len(indices) > 1 else [flat]
            parts = [keras.ops.reshape(part, host[i].shape) for i, part in zip(indices, parts)]
        for i, part in zip(indices, parts):
            device[i] = part
    for v, value in zip(variables, device):
        v.assign(value)


def _by_dtype(values: Sequence[Any]) -> dict[Any, list[int]]:
    """Indices grouped by dtype (the arrays' own dtype objects: NumPy's, torch's, TensorFlow's, all hashable)."""
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v.dtype, []).append(i)
    return groups


def _jax_concat(values: tuple) -> Any:
    return _jax_steps()[0](values)


def _jax_split(flat: Any, shapes: tuple) -> list:
    return _jax_steps()[1](flat, shapes)


@functools.lru_cache(maxsize=None)
def _jax_steps():
    """Concatenate flattened arrays / cut a vector into arrays of the given shapes, each one compiled step
    (compiled once per layout, then cached by ``jax.jit``)."""
    import jax
    import jax.numpy as jnp

    def concat(values):
        return jnp.concatenate([jnp.ravel(v) for v in values])

    def split(flat, shapes):
        out, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape, dtype=np.int64))
            out.append(flat[start:start + size].reshape(shape))
            start += size
        return out

    return jax.jit(concat), jax.jit(split, static_argnums=1)
