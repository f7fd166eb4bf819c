"""When `evalgap reproduce` measures precise_val_* (--precise-every): the schedules, by hand."""

from __future__ import annotations

import argparse

import pytest

from evalgap.cli import _precise_every
from evalgap.errors import DataError
from evalgap.seed.common import check_precise_every, precise_epochs, precise_plan, schedule_text, summary_epochs


def test_the_default_measures_the_summary_tables_epochs():
    assert precise_epochs(50) == [1, 2, 3, 4, 5, 6, 7, 10, 20, 50]  # 10 of 50 epochs
    assert precise_epochs(50) == summary_epochs(50)
    assert precise_epochs(35) == [1, 2, 3, 4, 5, 6, 7, 10, 20, 35]
    assert precise_epochs(100, "seed") == [1, 2, 3, 4, 5, 6, 7, 10, 20, 50, 100]
    assert precise_epochs(3) == [1, 2, 3]
    assert precise_epochs(10, "seed") == [1, 2, 3, 4, 5, 6, 7, 10]


def test_every_n_and_never():
    assert precise_epochs(10, 1) == list(range(1, 11))
    assert precise_epochs(10, 3) == [3, 6, 9]
    assert precise_epochs(10, "4") == [4, 8]
    assert precise_epochs(10, 0) == []
    assert schedule_text(1) == "after every epoch" and schedule_text(0) == "never"


@pytest.mark.parametrize("bad", [-1, 1.5, "often", None])
def test_a_bad_schedule_is_a_clear_error(bad):
    with pytest.raises(DataError, match="'seed' or a whole number >= 0"):
        check_precise_every(bad)


def test_the_cli_flag_takes_seed_or_a_number():
    assert _precise_every("seed") == "seed" and _precise_every("2") == 2 and _precise_every("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="'seed' or a whole number"):
        _precise_every("-3")


def test_the_plan_names_the_schedule():
    labels = [0, 1] * 10
    mode, pick, text = precise_plan(labels, precise_bn=False, every="seed", samples=0, batch_size=4)
    assert mode == "side" and len(pick) == 20 and text.endswith("after epochs 1-7, 10, 20, 50 and the last")
    assert precise_plan(labels, precise_bn=False, every=0, samples=0, batch_size=4)[0] == "off"
    assert precise_plan(labels, precise_bn=True, every="seed", samples=0, batch_size=4)[0] == "validation"
