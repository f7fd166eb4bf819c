"""``precise_subsample`` (``--precise-samples``): a fixed, class-stratified sample of the images."""

from __future__ import annotations

import numpy as np
import pytest

from evalgap.cli import main
from evalgap.seed.common import precise_subsample, whole_batches


def test_sample_keeps_the_class_mix_and_is_fixed():
    labels = np.repeat(np.arange(21), 100)[np.random.default_rng(1).permutation(2100)]
    pick = precise_subsample(labels, 512, seed=0)
    assert len(pick) == 512 and len(np.unique(pick)) == 512 and np.all(np.diff(pick) > 0)
    counts = np.bincount(labels[pick], minlength=21)
    # 512 / 21 = 24.38: largest-remainder rounding gives 24 or 25 to every class, 512 in all
    assert set(counts) <= {24, 25} and counts.sum() == 512
    assert np.array_equal(pick, precise_subsample(labels, 512, seed=0))
    assert not np.array_equal(pick, precise_subsample(labels, 512, seed=1))


def test_unequal_classes_get_proportional_shares():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    counts = np.bincount(labels[precise_subsample(labels, 10)], minlength=3)
    assert counts.tolist() == [7, 2, 1]
    counts = np.bincount(labels[precise_subsample(labels, 15)], minlength=3)  # shares 10.5, 3, 1.5: ties go to the first
    assert counts.sum() == 15 and counts.tolist() in ([11, 3, 1], [10, 3, 2])


def test_all_when_zero_none_or_too_many_and_one_hot_labels():
    labels = np.arange(30) % 3
    for n in (0, None, 30, 1000):
        assert np.array_equal(precise_subsample(labels, n), np.arange(30))
    one_hot = np.eye(3)[labels]
    assert np.array_equal(precise_subsample(one_hot, 9), precise_subsample(labels, 9))
    with pytest.raises(ValueError, match=">= 0"):
        precise_subsample(labels, -1)


def test_cli_rejects_a_negative_sample_size(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--data", "x", "--precise-samples", "-5"])
    assert e.value.code == 2 and "--precise-samples" in capsys.readouterr().err


def test_sample_sizes_round_up_to_whole_batches():
    assert whole_batches(512, 96, 2100) == 576 and whole_batches(480, 96, 2100) == 480
    assert whole_batches(2000, 96, 2100) == 2016 and whole_batches(2090, 96, 2100) == 2100
    assert whole_batches(0, 96, 2100) == 0 and whole_batches(None, 96, 2100) is None and whole_batches(5000, 96, 2100) == 5000


def test_plan_says_how_each_variant_measures():
    from evalgap.seed.common import precise_plan

    labels = np.repeat(np.arange(21), 100)
    mode, pick, text = precise_plan(labels, precise_bn=True, every=1, samples=512, batch_size=96)
    assert mode == "validation" and pick is None and "2016 of 2100 images" in text  # whole batches: 21 of 96
    mode, pick, text = precise_plan(labels, precise_bn=False, every=2, samples=512, batch_size=96)
    assert mode == "side" and len(pick) == 576 and text.startswith("statistics from 576 of 2100") and "every 2" in text
    mode, pick, _ = precise_plan(labels, precise_bn=False, every=1, samples=0, batch_size=96)
    assert mode == "side" and np.array_equal(pick, np.arange(2100))
    assert precise_plan(labels, precise_bn=False, every=0, samples=0, batch_size=96)[0] == "off"


def test_the_measurement_text_counts_the_images_a_pass_of_whole_batches_uses():
    """2100 images at batch 96: a statistics pass uses 21 whole batches, 2016 images; the text says so."""
    from evalgap.seed.common import precise_plan, variant_batch_size

    labels = np.repeat(np.arange(21), 100)
    mode, _, text = precise_plan(labels, precise_bn=True, every=1, samples=0, batch_size=96)
    assert mode == "validation" and "2016 of 2100 images (whole batches of 96; the last 84 left out)" in text
    _, pick, text = precise_plan(labels, precise_bn=False, every=1, samples=512, batch_size=96)
    assert len(pick) == 576 and text.startswith("statistics from 576 of 2100 images")
    assert "all 2100 images" in precise_plan(labels, precise_bn=True, every=1, samples=0, batch_size=100)[2]
    # --batch-size replaces the seed's 96, not a variant's own 4; never more than the images
    assert (variant_batch_size(96, 32, 2100), variant_batch_size(4, 32, 2100), variant_batch_size(96, None, 42)) == (32, 4, 42)
