"""The Keras demo (what `make demo` runs) end to end, one epoch, on the current backend."""

from __future__ import annotations

import re

import keras
import pytest

pytest.importorskip("sklearn")

from evalgap.seed.keras_demo import run  # noqa: E402


def test_keras_demo_prints_the_gap_and_the_fix(tmp_path, capsys):
    assert run(epochs=1, out=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "precise" in out and "recalibrated 7 BatchNorm layers" in out
    fixed = re.search(r"val_accuracy\s+([0-9.]+)\s+->\s+([0-9.]+)", out.replace("\n", " "))
    assert fixed is not None
    assert float(fixed.group(2)) > float(fixed.group(1))  # recalibration helps even after one epoch
    assert (tmp_path / f"demo_keras_{keras.backend.backend()}.png").exists()
    assert "stale_moving_statistics" in out and "fix: import evalgap.keras" in out and "evalgap.keras.recalibrate(model, train_data)" in out
    assert (tmp_path / f"demo_report_{keras.backend.backend()}.html").exists()
