"""Keras variables to and from the host in bulk: one transfer each way, whatever the number of layers.

Reading 53 BatchNormalization layers' moving mean and variance one ``.numpy()`` at a time is
106 device-to-host copies, each a synchronization on a GPU; writing them one ``assign`` of a
NumPy array at a time is 106 host-to-device copies. Here the values travel together: on
TensorFlow and torch concatenated per dtype on the device, moved in one copy and split on the
other side; on JAX with one ``jax.device_get`` / ``jax.device_put`` of the whole list, whose
copies run asynchronously with one wait (concatenating in a compiled step would cost a
compilation, about a second, for each new set of layers). Values are bitwise those of the
per-variable route: nothing is cast except to the variable's own dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np

from .._keras_common import by_dtype


def read(variables: Sequence[Any]) -> list[np.ndarray]:
    """Each variable's value as a NumPy array of its own shape and dtype, in one device-to-host transfer per dtype."""
    values = [v.value for v in variables]
    if not values:
        return []
    if keras.backend.backend() == "jax":
        import jax

        return [np.asarray(v) for v in jax.device_get(values)]
    out: list[np.ndarray | None] = [None] * len(values)
    for indices in by_dtype(values).values():
        if len(indices) > 1:
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

    Each array has its variable's shape, or is flat with as many values; every array is cast
    to its variable's dtype and checked before anything is assigned, so a bad array leaves
    every variable as it was.
    """
    if len(variables) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for {len(variables)} variables")
    host = []
    for v, a in zip(variables, arrays):
        a = np.asarray(a)
        shape = tuple(int(d) for d in v.shape)
        if a.shape != shape and (a.ndim != 1 or a.size != int(np.prod(shape, dtype=np.int64))):
            raise ValueError(f"cannot assign an array of shape {a.shape} to {getattr(v, 'path', v.name)} of shape {shape}")
        host.append(np.ascontiguousarray(a.reshape(shape).astype(keras.backend.standardize_dtype(v.dtype), copy=False)))
    if not host:
        return
    if keras.backend.backend() == "jax":
        import jax

        device = jax.device_put(host)
    else:
        device = [None] * len(host)
        for indices in by_dtype(host).values():
            flat = keras.ops.convert_to_tensor(np.concatenate([host[i].reshape(-1) for i in indices]))
            sizes = [host[i].size for i in indices]
            parts = keras.ops.split(flat, np.cumsum(sizes)[:-1].tolist()) if len(indices) > 1 else [flat]
            for i, part in zip(indices, parts):
                device[i] = keras.ops.reshape(part, host[i].shape)
    for v, value in zip(variables, device):
        v.assign(value)

