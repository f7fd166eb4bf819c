"""engine.moments.LayerMoments: per-layer population moments from a pass's captures, against float64 NumPy.

Each capture is one BN call's (count, mean, biased variance) of raw values drawn here; the
reference is np.mean / np.var over all raw values a layer received. Regular passes (every batch
calls every layer once, in order) take the grid path; shared, skipped or reordered layers the
general one; both must give the same exact statistics.
"""

from __future__ import annotations

import numpy as np
import pytest

from evalgap import DataError
from evalgap.engine import HostCaptures, NormLayer
from evalgap.engine.moments import LayerMoments

CHANNELS = [3, 5, 2, 4]


def _layers():
    return [NormLayer(name=f"bn{i}", handle=None, kind="BN", channels=c, eps=1e-3, momentum=0.99) for i, c in enumerate(CHANNELS)]


def _run(schedule, flush_every=None, seed=0):
    """``schedule``: per batch, the layer indices called in order. Returns (LayerMoments, raw values per layer)."""
    rng = np.random.default_rng(seed)
    acc = LayerMoments(_layers(), HostCaptures.from_list)
    raw = {i: [] for i in range(len(CHANNELS))}
    for b, calls in enumerate(schedule):
        captures = []
        for i in calls:
            n = int(rng.integers(2, 40))
            x = rng.normal(loc=rng.normal(0, 50, CHANNELS[i]), scale=rng.uniform(0.1, 9, CHANNELS[i]), size=(n, CHANNELS[i])) + 1e4 * i
            raw[i].append(x)
            captures.append((i, n, x.mean(axis=0), x.var(axis=0)))
        acc.add(captures, 8)
        if flush_every and (b + 1) % flush_every == 0:
            acc.flush()
    acc.flush()
    return acc, {i: np.concatenate(v) for i, v in raw.items() if v}


def _check(acc, raw):
    for i, x in raw.items():
        m = acc.moments[i]
        assert m.count == x.shape[0]
        np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(m.var, x.var(axis=0), rtol=1e-9)
    for i in set(range(len(CHANNELS))) - set(raw):
        assert acc.moments[i] is None


def _paths(monkeypatch):
    taken = []
    grid = LayerMoments._merge_regular
    monkeypatch.setattr(LayerMoments, "_merge_regular", lambda self, caps: taken.append(grid(self, caps)) or taken[-1])
    return taken


@pytest.mark.parametrize("flush_every", [None, 1, 3])
def test_regular_pass_every_layer_once_per_batch(flush_every, monkeypatch):
    taken = _paths(monkeypatch)
    acc, raw = _run([[0, 1, 2, 3]] * 7, flush_every)
    _check(acc, raw)
    assert taken and all(taken)  # the grid path
    assert acc.calls == [7] * 4 and acc.calls_per_batch == [1] * 4 and acc.order() == [0, 1, 2, 3]


@pytest.mark.parametrize("flush_every", [None, 2])
def test_shared_skipped_and_reordered_layers(flush_every, monkeypatch):
    taken = _paths(monkeypatch)
    schedule = [[0, 1, 1, 2], [0, 2, 1], [2, 0, 1, 1, 1], [0, 1, 2]]  # 1 shared, 3 never reached, order changes
    acc, raw = _run(schedule, flush_every)
    _check(acc, raw)
    assert taken and not any(taken)  # the general path
    assert acc.calls == [4, 7, 4, 0] and acc.calls_per_batch[1] == 3 and acc.order() == [0, 1, 2, 3]


def test_a_layer_called_with_one_value_per_channel_is_named():
    acc = LayerMoments(_layers(), HostCaptures.from_list)
    acc.add([(0, 4, np.zeros(3), np.ones(3)), (2, 1, np.zeros(2), np.zeros(2))], 4)
    with pytest.raises(DataError, match="bn2 saw a batch with one value per channel"):
        acc.flush()


@pytest.mark.parametrize("flush_between", [False, True])
def test_one_value_per_channel_beside_larger_calls_is_pooled_exactly(flush_between):
    """A ragged last batch of one sample (drop_ragged=False): its values count, as Keras's fit trains on them."""
    rng = np.random.default_rng(3)
    full, last = rng.normal(7, 3, (16, 3)), rng.normal(7, 3, (1, 3))
    acc = LayerMoments(_layers(), HostCaptures.from_list)
    acc.add([(0, 16, full.mean(0), full.var(0))], 16)
    if flush_between:
        acc.flush()
    acc.add([(0, 1, last[0], np.zeros(3))], 1)
    acc.flush()
    _check(acc, {0: np.concatenate([full, last])})


def test_a_layer_whose_channels_change_is_named():
    acc = LayerMoments(_layers(), HostCaptures.from_list)
    acc.add([(1, 4, np.zeros(5), np.ones(5)), (1, 4, np.zeros(6), np.ones(6))], 4)
    with pytest.raises(Exception, match="bn1 saw inputs with different numbers of channels"):
        acc.flush()
