"""The statistics core against float64 NumPy on the concatenated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalgap import EvalgapError
from evalgap.stats import EMA, ChannelMoments, drift, merge_moments, momentum_for_memory


def _batches(data: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    edges = sorted(set(c % (len(data) + 1) for c in cuts) | {0, len(data)})
    return [data[a:b] for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _assert_close(got: ChannelMoments, data: np.ndarray, rtol: float = 1e-9) -> None:
    assert got.count == data.shape[0]
    ref_mean, ref_var = data.mean(axis=0), data.var(axis=0)
    scale = np.maximum(np.abs(ref_mean), data.std(axis=0)) + 1e-300
    np.testing.assert_array_less(np.abs(got.mean - ref_mean) / scale, rtol)
    np.testing.assert_allclose(got.var, ref_var, rtol=rtol, atol=1e-300)


datasets = st.builds(
    lambda seed, n, c, offset, scale: np.random.default_rng(seed).normal(offset, scale, size=(n, c)),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 300),
    c=st.integers(1, 6),
    offset=st.sampled_from([0.0, -3.0, 255.0, 1e4]),
    scale=st.sampled_from([1e-2, 1.0, 70.0]),
)


@settings(max_examples=150, deadline=None)
@given(data=datasets, cuts=st.lists(st.integers(0, 10**6), max_size=12), order_seed=st.integers(0, 2**16), how=st.sampled_from(["moments", "sums", "array"]))
def test_any_split_and_merge_order_gives_numpy_moments(data, cuts, order_seed, how):
    parts = []
    for b in _batches(data, cuts):
        if how == "moments":
            parts.append(ChannelMoments.from_moments(len(b), b.mean(axis=0), b.var(axis=0)))
        elif how == "sums":
            shift = b[0]  # a per-channel shift near the data, as the adapters use
            parts.append(ChannelMoments.from_sums(len(b), (b - shift).sum(axis=0), ((b - shift) ** 2).sum(axis=0), shift))
        else:
            parts.append(ChannelMoments.from_array(b))
    np.random.default_rng(order_seed).shuffle(parts)
    sequential = ChannelMoments.empty(data.shape[1])
    for p in parts:
        sequential = sequential + p
    _assert_close(sequential, data)
    _assert_close(ChannelMoments.merge_all(parts), data)


def test_large_offset_where_naive_formula_fails():
    rng = np.random.default_rng(1)
    data = rng.normal(1e4, 1.0, size=(4096, 3))
    batches = np.split(data, 64)
    # the naive E[x^2] - E[x]^2 over the same batches, float64: badly wrong at this offset
    naive = np.mean([(b**2).mean(0) for b in batches], 0) - np.mean([b.mean(0) for b in batches], 0) ** 2
    assert np.max(np.abs(naive / data.var(0) - 1)) > 1e-9
    merged = ChannelMoments.merge_all(ChannelMoments.from_moments(len(b), b.mean(0), b.var(0)) for b in batches)
    _assert_close(merged, data)


def test_population_variance_includes_spread_of_batch_means():
    # two batches of constants: each batch variance is 0, the population variance is 1
    a = ChannelMoments.from_moments(2, [-1.0], [0.0])
    b = ChannelMoments.from_moments(2, [1.0], [0.0])
    m = a + b
    assert m.count == 4 and m.mean[0] == 0.0 and m.var[0] == 1.0
    assert m.unbiased_var[0] == pytest.approx(4 / 3)


def test_merge_moments_is_framework_agnostic_arithmetic():
    n, mean, m2 = merge_moments(3, np.array([1.0]), np.array([2.0]), 1, np.array([5.0]), np.array([0.0]))
    # data [0, 1, 2] (mean 1, M2 2) and [5]: union mean 2, M2 = 2 + 0 + 16 * 3 * 1 / 4 = 14
    assert n == 4 and mean[0] == 2.0 and m2[0] == 14.0
    assert merge_moments(0, 0.0, 0.0, 0, 0.0, 0.0) == (0, 0.0, 0.0)


def test_errors_name_the_problem():
    with pytest.raises(EvalgapError, match="same layer"):
        ChannelMoments.empty(2) + ChannelMoments.empty(3)
    with pytest.raises(EvalgapError, match="non-negative integer"):
        ChannelMoments.from_moments(2.5, [0.0], [1.0])
    with pytest.raises(EvalgapError, match="one value per channel"):
        ChannelMoments.from_moments(2, [[0.0]], [[1.0]])


# ---- EMA arithmetic on the seed's numbers -------------------------------------------
def test_seed_numbers_keras_convention():
    ema = EMA(0.99)  # Keras default
    steps, epochs = 22, 7
    # 0.99 ** 154, by hand: exp(154 * ln 0.99) = exp(-1.54775...) = 0.2128
    assert ema.initial_weight(steps * epochs) == pytest.approx(math.exp(154 * math.log(0.99)), rel=1e-12)
    assert round(ema.initial_weight(steps * epochs), 2) == 0.21  # DESIGN.md: 21% still initial
    assert ema.memory == pytest.approx(100.0)
    assert ema.mean_age() == pytest.approx(99.0)
    assert ema.mean_age() / steps == pytest.approx(4.5)  # 4.5 epochs old
    assert momentum_for_memory(steps) == pytest.approx(1 - 2 / 22)
    assert round(momentum_for_memory(steps), 2) == 0.91  # the answer's 0.9


def test_torch_convention_is_one_minus_keras():
    assert EMA(0.01, "torch").decay == pytest.approx(0.99)
    assert EMA(0.01, "torch").initial_weight(154) == pytest.approx(EMA(0.99).initial_weight(154))
    assert momentum_for_memory(22, convention="torch") == pytest.approx(2 / 22)
    assert EMA(0.1, "torch").memory == pytest.approx(10.0)
    cumulative = EMA(None, "torch")
    assert cumulative.cumulative and cumulative.initial_weight(5) == 0.0 and cumulative.mean_age(5) == 2.0


@given(d=st.floats(0.0, 0.999), n=st.integers(0, 400))
def test_finite_mean_age_matches_explicit_weights(d, n):
    # weights: (1-d) d^k on the update k steps ago (k < n), d^n on the initial value (age n)
    k = np.arange(n)
    explicit = float(np.sum(k * (1 - d) * d**k) + n * d**n)
    assert EMA(d).mean_age(n) == pytest.approx(explicit, rel=1e-9, abs=1e-9)
    assert EMA(d).initial_weight(n) + float(np.sum((1 - d) * d**k)) == pytest.approx(1.0)


def test_ema_errors():
    with pytest.raises(EvalgapError, match="outside"):
        EMA(1.5).decay
    with pytest.raises(EvalgapError, match="steps_per_epoch"):
        momentum_for_memory(0)


def test_drift_formula_by_hand():
    d = drift(moving_mean=[0.0, 3.0], moving_var=[1.0, 4.0], mean=[0.0, 1.0], var=[1.0, 1.0], eps=0.0)
    np.testing.assert_allclose(d.mean, [0.0, 2.0])
    np.testing.assert_allclose(d.var, [0.0, math.log(4.0)])
    assert d.mean_max == 2.0 and d.var_max == pytest.approx(math.log(4)) and d.worst == 2.0
