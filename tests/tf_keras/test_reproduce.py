"""A CPU-sized `evalgap reproduce --keras 2` run on the real UC Merced images (skipped without them)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from evalgap.cli import main

IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "uc_merced" / "UCMerced_LandUse"
pytestmark = pytest.mark.skipif(not IMAGES.is_dir(), reason=f"UC Merced images not found at {IMAGES} (../shared/data/uc_merced)")


def test_keras2_reproduce_writes_what_it_printed_and_precise_bn_makes_validation_exact(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rep"
    code = main(["reproduce", "--keras", "2", "--data", str(IMAGES), "--image-size", "32", "--limit-per-class", "2", "--epochs", "1",
                 "--batch-size", "21", "--variants", "seed,precise-bn", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tf_keras" in printed and "evalgap.tf_keras.PreciseBN" in printed
    data = json.loads((out / "reproduce.json").read_text())
    assert data["backend"] == "tf_keras" and data["images"] == 42 and data["classes"] == 21
    assert len(list(csv.DictReader(open(out / "reproduce.csv")))) == 2
    (row,) = data["variants"]["precise-bn"]["epochs"]
    (seed,) = data["variants"]["seed"]["epochs"]
    line = next(line for line in printed.splitlines() if line.startswith("[precise-bn] Epoch 1/1"))
    assert f"val_accuracy: {row['val_accuracy']:.4f}" in line and f"loss: {row['loss']:.4f}" in line
    # validation after PreciseBN is the precise measurement: the seed's side measurement (statistics of all 42
    # images, drawn in another order, then put back) of the same weights gives the same numbers
    assert seed["loss"] == pytest.approx(row["loss"], rel=1e-4)
    assert data["variants"]["seed"]["precise_val"].startswith("statistics from 42 of 42 images")
    assert row["val_accuracy"] == pytest.approx(seed["precise_val_accuracy"], abs=1e-6)
    assert row["val_loss"] == pytest.approx(seed["precise_val_loss"], rel=1e-4)
    assert row["precise_val_accuracy"] == row["val_accuracy"]  # logged, not measured twice
    assert "the data's own batches" in data["variants"]["precise-bn"]["batching"]["precise_bn"]
