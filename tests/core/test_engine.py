"""The framework-free engine: batching like fit, the vectorized merge, default tasks, the primary metric."""

from __future__ import annotations

import numpy as np
import pytest

from evalgap import DataError
from evalgap.attribution import choose_primary
from evalgap.engine import ArrayBatches, Batch, StreamBatches, materialize
from evalgap.engine.tasks import default_task
from evalgap.stats import ChannelMoments


def _batch(x, y, w, n):
    return Batch(x, y, w, n)


def test_from_batches_is_the_exact_merge_in_float64():
    rng = np.random.default_rng(0)
    batches = [rng.normal(1e4, 3.0, size=(int(rng.integers(2, 40)), 5)) for _ in range(30)]
    counts = [len(b) for b in batches]
    merged = ChannelMoments.from_batches(counts, [b.mean(0) for b in batches], [b.var(0) for b in batches])
    data = np.concatenate(batches)
    np.testing.assert_allclose(merged.mean, data.mean(0), rtol=1e-14)
    np.testing.assert_allclose(merged.var, data.var(0), rtol=1e-10)  # the spread of the batch means is kept
    one_by_one = ChannelMoments.merge_all(ChannelMoments.from_moments(len(b), b.mean(0), b.var(0)) for b in batches)
    np.testing.assert_allclose(merged.m2, one_by_one.m2, rtol=1e-10)
    assert merged.count == len(data)
    with pytest.raises(Exception, match="non-negative integer"):
        ChannelMoments.from_batches([2.5], [[0.0]], [[1.0]])


def test_array_batches_draw_a_seeded_permutation_like_fit():
    x = np.arange(100)[:, None].astype(float)
    y = np.arange(100)
    src = ArrayBatches((x, y, None), batch_size=16, seed=3, to_batch=_batch)
    first = [b.targets.tolist() for b in src]
    assert [len(b) for b in first] == [16] * 6 + [4]  # a ragged last batch, as fit has
    assert sorted(sum(first, [])) == list(range(100))  # every sample once
    assert first == [b.targets.tolist() for b in src]  # re-iterable: the same batches
    assert first != [b.targets.tolist() for b in ArrayBatches((x, y, None), batch_size=16, seed=4, to_batch=_batch)]
    assert first[0] != list(range(16))
    in_order = [b.targets.tolist() for b in ArrayBatches((x, y, None), batch_size=16, shuffle=False, to_batch=_batch)]
    assert in_order[0] == list(range(16)) and "in the given order" in ArrayBatches((x, y, None), batch_size=16, shuffle=False, to_batch=_batch).order
    # max_samples: whole batches drawn at random from all of the data
    taken = src.take(40)
    kept = [b.targets.tolist() for b in taken]
    assert len(kept) == 2 and all(len(b) == 16 for b in kept) and kept == first[:2]
    assert "2 of 6 whole batches drawn at random" in taken.order
    ordered_take = ArrayBatches((x, y, None), batch_size=10, shuffle=False, seed=0, to_batch=_batch).take(30)
    starts = [b.targets[0] for b in ordered_take]
    assert all(s % 10 == 0 for s in starts) and starts != [0, 10, 20] and len(starts) == 3  # random whole batches, in order
    with pytest.raises(DataError, match="same number of samples"):
        ArrayBatches((x, y[:50], None), batch_size=8, to_batch=_batch)


def test_streams_keep_the_users_order_and_take_the_first_batches():
    raw = [(np.zeros((8, 1)), np.full(8, i)) for i in range(5)]
    src = StreamBatches(lambda: raw, to_batch=lambda b: Batch(b[0], b[1], None, len(b[1])), reiterable=True)
    assert [int(b.targets[0]) for b in src] == [0, 1, 2, 3, 4] and src.batch_size == 8
    taken = materialize(src.take(20))
    assert [int(b.targets[0]) for b in taken] == [0, 1] and taken.order.startswith("the first 2 batches")
    gen = StreamBatches(lambda: iter(raw), to_batch=lambda b: Batch(b[0], b[1], None, 8), reiterable=False)
    held = materialize(gen)
    assert len(held) == 5 and len(list(held)) == 5  # read once, kept for every pass


@pytest.mark.parametrize(
    "out, tgt, integer, binary, task",
    [
        ((8, 5), (8,), True, False, "classification"),
        ((8, 5, 4, 4), (8, 4, 4), True, False, "segmentation"),
        ((8, 5), (8, 1), True, False, "classification"),  # (N, 1) labels, as keras.datasets give them
        ((8, 5, 4, 4), (8, 1, 4, 4), True, False, "segmentation"),
        ((8, 5, 4, 4), (8, 2, 4, 4), True, False, None),
        ((8,), (8,), False, True, "binary"),
        ((8, 1), (8, 1), False, True, "binary"),
        ((8, 1), (8,), True, True, "binary"),
        ((8, 3), (8, 3), False, False, "regression"),
        ((8, 1), (8,), False, False, "regression"),
        ((8, 3), (8, 3), False, True, None),  # one-hot or multi-label: a doubt
        ((8, 5), (8, 3), False, False, None),
        ((8, 5), (8,), False, False, None),  # float class labels: a doubt
        ((8, 1), (8,), True, False, None),  # integers other than 0/1 against one logit
    ],
)
def test_default_task_only_where_shapes_leave_no_doubt(out, tgt, integer, binary, task):
    assert default_task(out, tgt, integer, binary) == task


def test_soft_labels_leave_doubt():
    assert default_task((8, 3), (8, 3), False, False, probability_rows=True) is None  # cross-entropy or MSE: ask
    assert default_task((8, 3), (8, 3), False, False, probability_rows=False) == "regression"


def test_tree_leaves_of_a_dataclass_output():
    import dataclasses

    from evalgap.engine import tree_leaves

    @dataclasses.dataclass
    class Out:
        logits: object
        extra: object = None

    assert tree_leaves({"a": Out(1, [2, (3, None)]), "b": [Out(4)]}) == [1, 2, 3, 4]
    assert tree_leaves(Out) == [Out]  # the class itself is a leaf


def test_primary_metric_rule():
    assert choose_primary(["loss", "auc", "accuracy"], ["auc", "accuracy"]) == "accuracy"
    assert choose_primary(["loss", "auc"], ["auc"]) == "auc"
    assert choose_primary(["loss", "a_loss", "b_loss", "a_mae"], []) == "a_mae"
    assert choose_primary(["loss", "a_loss", "b_loss"], []) == "loss"
    assert choose_primary(["loss", "zeta", "alpha"], ["zeta", "alpha"]) == "zeta"
    assert choose_primary(["loss", "auc"], ["auc"], "loss") == "loss"
    with pytest.raises(DataError, match=r"'nope'.*\['loss', 'auc'\]"):
        choose_primary(["loss", "auc"], ["auc"], "nope")


def test_the_scale_rule_tells_rescaling_from_layout_padding_and_pooling():
    """engine.scale_changed on what a first layer receives, against hand-made cases: zero padding (ResNet's stem on a
    small image), a crop of a centred digit, average pooling and a permutation keep the scale; x / 255 (dense or
    sparse images), x / 127.5 - 1 and ImageNet standardization of [0, 1] inputs change it. (A rule on the mean called
    padding and crops transforms; one on the range alone missed x / 255.)"""
    from evalgap.engine import scale_changed, value_summary

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 32, 32, 3)).astype(np.float64)
    digit = np.zeros((8, 28, 28))
    digit[:, 6:22, 6:22] = rng.integers(0, 256, (8, 16, 16))
    sparse = (rng.random((8, 28, 28)) < 0.05) * 255.0
    unit = pixels / 255.0
    pooled = pixels.reshape(8, 16, 2, 16, 2, 3).mean(axis=(2, 4))

    def changed(given, received):
        return scale_changed(value_summary(given), value_summary(received))

    kept = {
        "zero padding": (pixels, np.pad(pixels, ((0, 0), (3, 3), (3, 3), (0, 0)))),
        "crop": (digit, digit[:, 4:24, 4:24]),
        "average pooling": (pixels, pooled),
        "permutation": (pixels, pixels.transpose(0, 3, 1, 2)),
    }
    rescaled = {
        "x / 255": (pixels, pixels / 255.0),
        "sparse x / 255": (sparse, sparse / 255.0),
        "x / 127.5 - 1": (pixels, pixels / 127.5 - 1.0),
        "ImageNet standardization": (unit, (unit - 0.45) / 0.225),
    }
    assert [name for name, (a, b) in kept.items() if changed(a, b)] == []
    assert [name for name, (a, b) in rescaled.items() if not changed(a, b)] == []
