"""A CPU-sized `evalgap reproduce` run on the real UC Merced images (skipped without them)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from evalgap.cli import main

IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "uc_merced" / "UCMerced_LandUse"
pytestmark = pytest.mark.skipif(not IMAGES.is_dir(), reason=f"UC Merced images not found at {IMAGES} (../shared/data/uc_merced)")


def test_cpu_sized_reproduce_writes_what_it_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rep"
    code = main(["reproduce", "--data", str(IMAGES), "--image-size", "32", "--limit-per-class", "2", "--epochs", "2",
                 "--variants", "seed,precise-bn", "--batch-size", "21", "--precise-samples", "21", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "reproduce.json").read_text())
    assert data["images"] == 42 and data["classes"] == 21 and list(data["variants"]) == ["seed", "precise-bn"]
    rows = list(csv.DictReader(open(out / "reproduce.csv")))
    assert len(rows) == 4 and (out / "reproduce.png").read_bytes()[:4] == b"\x89PNG"
    # every number the log printed is the number written
    for variant, logs in data["variants"].items():
        for row in logs["epochs"]:
            line = next(l for l in printed.splitlines() if l.startswith(f"[{variant}] Epoch {row['epoch']}/2"))
            assert f"val_accuracy: {row['val_accuracy']:.4f}" in line and f"loss: {row['loss']:.4f}" in line
    # with PreciseBN, fit's validation is the precise measurement (not measured twice); the same training otherwise
    for row in data["variants"]["precise-bn"]["epochs"]:
        assert row["val_accuracy"] == pytest.approx(row["precise_val_accuracy"], abs=1e-6)
    assert data["variants"]["precise-bn"]["precise_val"].startswith("fit's validation pass")
    seed, fixed = data["variants"]["seed"]["epochs"], data["variants"]["precise-bn"]["epochs"]
    assert [r["loss"] for r in seed] == pytest.approx([r["loss"] for r in fixed], rel=1e-4)
    assert re.search(r"seed\s+│", printed)
    # --precise-samples 21: the seed's statistics come from 21 of the 42 images, so its precise_val_loss is not the
    # loss with the statistics of all 42 (precise-bn's validation of the same weights)
    assert data["variants"]["seed"]["precise_val"].startswith("statistics from 21 of 42 images")
    for s, f in zip(seed, fixed):
        assert abs(s["precise_val_loss"] - f["val_loss"]) > 1e-6 * abs(f["val_loss"])
    # PreciseBN and the side measurement draw shuffled batches, as fit trains (the images load class by class)
    assert "shuffled with seed 0" in data["variants"]["precise-bn"]["batching"]["precise_bn"]
    assert "shuffled with seed 0" in data["variants"]["seed"]["batching"]["precise_val"]
