"""Keras variables read and assigned in bulk (:mod:`evalgap.keras.transfer`).

Reference: the per-variable route, ``v.numpy()`` and ``v.assign(array.astype(v.dtype))``, which
the bulk route must match bit for bit, with one transfer per dtype instead of one per variable.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from evalgap.keras import transfer


def _variables():
    rng = np.random.default_rng(0)
    specs = [((3,), "float32"), ((2, 4), "float32"), ((5,), "float16"), ((3,), "int32"), ((1,), "float32"), ((2,), "bfloat16")]
    return [keras.Variable(rng.normal(size=shape).astype(dtype) * (100 if dtype == "int32" else 1), dtype=dtype, trainable=False, name=f"v{i}")
            for i, (shape, dtype) in enumerate(specs)]


def _count_transfers(monkeypatch, direction: str) -> list[int]:
    """Calls that move values between host and device: JAX's batched device_get / device_put (their length), else
    Keras's conversions (each one copy)."""
    calls: list[int] = []
    if keras.backend.backend() == "jax":
        import jax

        name = "device_get" if direction == "to_host" else "device_put"
        original = getattr(jax, name)
        monkeypatch.setattr(jax, name, lambda values, *a, **k: calls.append(len(values)) or original(values, *a, **k))
        return calls
    name = "convert_to_numpy" if direction == "to_host" else "convert_to_tensor"
    original = getattr(keras.ops, name)
    monkeypatch.setattr(keras.ops, name, lambda x, *a, **k: calls.append(1) or original(x, *a, **k))
    return calls


#: JAX: one batched call for all six variables; else one copy per dtype (float32, float16, int32, bfloat16).
ONE_TRANSFER = {"jax": [6]}


def test_read_is_the_per_variable_numpy_bit_for_bit_in_one_transfer_per_dtype(monkeypatch):
    variables = _variables()
    expected = [np.array(v.numpy()) for v in variables]
    calls = _count_transfers(monkeypatch, "to_host")
    got = transfer.read(variables)
    for v, e, g in zip(variables, expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype, v.name
        np.testing.assert_array_equal(g, e)
    assert calls == ONE_TRANSFER.get(keras.backend.backend(), [1, 1, 1, 1])  # not one per variable
    assert transfer.read([]) == []


def test_assign_matches_per_variable_assign_and_casts_to_each_dtype(monkeypatch):
    bulk, one_by_one = _variables(), _variables()
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=int(np.prod(v.shape))).astype(np.float64) * 10 for v in bulk]  # float64 and flat
    for v, a in zip(one_by_one, arrays):
        v.assign(a.reshape(tuple(v.shape)).astype(keras.backend.standardize_dtype(v.dtype)))
    calls = _count_transfers(monkeypatch, "to_device")
    transfer.assign(bulk, arrays)
    assert calls == ONE_TRANSFER.get(keras.backend.backend(), [1, 1, 1, 1])
    for a, b in zip(bulk, one_by_one):
        assert keras.backend.standardize_dtype(a.dtype) == keras.backend.standardize_dtype(b.dtype)
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))


def test_a_bad_array_assigns_nothing():
    variables = _variables()
    before = [np.array(v.numpy()) for v in variables]
    arrays = [np.zeros(int(np.prod(v.shape))) for v in variables]
    arrays[-1] = np.zeros(7)  # the last variable holds 2 values
    with pytest.raises(ValueError, match=r"cannot assign an array of shape \(7,\)"):
        transfer.assign(variables, arrays)
    arrays[-1] = np.zeros(2)
    arrays[1] = np.zeros((4, 2))  # 8 values, but not the (2, 4) of the variable, nor flat
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        transfer.assign(variables, arrays)
    with pytest.raises(ValueError, match="5 arrays for 6 variables"):
        transfer.assign(variables, arrays[:5])
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(np.asarray(v.numpy()), b)
