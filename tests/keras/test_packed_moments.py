"""The Keras pass's packed moments (two arrays per batch) turned into the engine's host captures.

Reference: the per-call values written out by hand; a flush of whole batches (the fast path)
and any other selection of calls (cut call by call) must give the same rows.
"""

from __future__ import annotations

import numpy as np

from evalgap.engine.protocol import HostCaptures
from evalgap.keras.moments import PackedMoments


def _batch(counts, means, variances):
    channels = tuple(len(m) for m in means)
    values = np.concatenate([np.asarray(m, np.float32) for m in means] + [np.asarray(v, np.float32) for v in variances])
    return PackedMoments(np.asarray(counts, np.int32), values, channels)


def test_whole_batches_and_a_selection_of_calls_give_the_hand_written_rows(monkeypatch):
    a = _batch([10, 20], [[1.0, 2.0], [3.0, 4.0, 5.0]], [[0.5, 0.25], [1.5, 2.5, 3.5]])
    b = _batch([30, 40], [[6.0, 7.0], [8.0, 9.0, 10.0]], [[0.1, 0.2], [0.3, 0.4, 0.5]])
    fetched = []

    def to_host(values):
        fetched.append(len(values))
        return [np.asarray(v) for v in values]

    cut_call_by_call = []
    original = HostCaptures.from_list
    monkeypatch.setattr(HostCaptures, "from_list", classmethod(lambda cls, rows: cut_call_by_call.append(1) or original(rows)))
    whole = PackedMoments.to_host_captures([(0, a, 0, None), (1, a, 1, None), (0, b, 0, None), (1, b, 1, None)], to_host)
    assert fetched == [4]  # two arrays per batch, one transfer
    assert cut_call_by_call == []  # whole batches in order: laid side by side
    assert whole.index.tolist() == [0, 1, 0, 1] and whole.count.tolist() == [10, 20, 30, 40]
    assert whole.channels.tolist() == [2, 3, 2, 3]
    np.testing.assert_allclose(whole.mean, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    np.testing.assert_allclose(whole.var, [0.5, 0.25, 1.5, 2.5, 3.5, 0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-6)
    assert whole.mean.dtype == np.float64

    # calls out of order and a batch's calls split: cut call by call
    part = PackedMoments.to_host_captures([(1, b, 1, None), (0, a, 0, None), (1, a, 1, None)], to_host)
    assert cut_call_by_call == [1]
    assert part.index.tolist() == [1, 0, 1] and part.count.tolist() == [40, 10, 20]
    np.testing.assert_allclose(part.mean, [8, 9, 10, 1, 2, 3, 4, 5])
    np.testing.assert_allclose(part.var, [0.3, 0.4, 0.5, 0.5, 0.25, 1.5, 2.5, 3.5], rtol=1e-6)
