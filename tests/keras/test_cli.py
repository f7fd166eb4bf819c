"""`evalgap diagnose` and `evalgap recalibrate` on a saved .keras model."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from evalgap.cli import main

pytest.importorskip("sklearn")
from evalgap.data import load_digits_rgb  # noqa: E402
from evalgap.seed.keras_models import small_resnet  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    x, y = load_digits_rgb(16)
    order = np.random.default_rng(0).permutation(len(x))[:960]
    x, y = x[order], y[order]
    keras.utils.set_random_seed(0)
    model = small_resnet((16, 16, 3), 10, width=4, momentum=0.999)
    model.fit(x.astype("float32"), y, batch_size=120, epochs=2, verbose=0)
    model.save(d / "model.keras")
    np.savez(d / "data.npz", x=x, y=y)
    return d


def test_diagnose_writes_reports_and_fails_over_the_threshold(saved, capsys):
    args = ["diagnose", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-q"]
    code = main(args + ["--json", str(saved / "r.json"), "--html", str(saved / "r.html"), "--fail-over", "5"])
    out = capsys.readouterr()
    report = json.loads((saved / "r.json").read_text())
    assert report["schema"] == "evalgap.report/1" and report["causes"][0]["term"] == "stale_moving_statistics"
    assert report["gap_points"] > 5 and code == 1 and "exceeds --fail-over" in out.err
    assert (saved / "r.html").read_text().startswith("<!doctype html>")
    assert main(args + ["--fail-over", "100"]) == 0


def test_fail_over_on_a_loss_means_evaluation_loss_higher_by_more_than_the_threshold(saved, capsys):
    """--primary loss: 'worse' is a higher evaluation loss (the gap top - E is then negative); the threshold is in
    the loss's own units."""
    args = ["diagnose", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-q",
            "--primary", "loss", "--json", str(saved / "loss.json")]
    assert main(args + ["--fail-over", "1e9"]) == 0
    values = json.loads((saved / "loss.json").read_text())["metrics"]["loss"]["values"]
    top = "F" if "F" in values else "T"
    worse = values["E"] - values[top]  # evaluation loss above training-mode loss
    assert worse > 0.05, values  # stale statistics (momentum 0.999) make evaluation worse
    capsys.readouterr()
    assert main(args + ["--fail-over", str(worse / 2)]) == 1
    assert "exceeds --fail-over" in capsys.readouterr().err
    assert main(args + ["--fail-over", str(worse * 2)]) == 0


def test_recalibrate_in_place_replaces_the_model_file(saved, tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes((saved / "model.keras").read_bytes())
    assert main(["recalibrate", str(target), "--npz", str(saved / "data.npz"), "--batch-size", "120", "--in-place", "-q"]) == 0
    assert target.read_bytes() != (saved / "model.keras").read_bytes()
    args = ["diagnose", str(target), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-q", "--json", str(tmp_path / "f.json")]
    assert main(args) == 0
    terms = json.loads((tmp_path / "f.json").read_text())["metrics"]["accuracy"]["terms"]
    assert abs(terms["stale_moving_statistics"]) < 0.005


def test_recalibrate_writes_a_fixed_copy_and_keeps_the_input(saved, capsys):
    before = (saved / "model.keras").read_bytes()
    out = saved / "fixed.keras"
    assert main(["recalibrate", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-o", str(out), "-q"]) == 0
    assert (saved / "model.keras").read_bytes() == before
    fixed = keras.saving.load_model(out)
    data = np.load(saved / "data.npz")
    args = ["diagnose", str(out), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-q", "--json", str(saved / "f.json")]
    assert main(args + ["--fail-over", "5"]) == 0
    terms = json.loads((saved / "f.json").read_text())["metrics"]["accuracy"]["terms"]
    assert abs(terms["stale_moving_statistics"]) < 0.005  # the saved statistics are the population's
    assert fixed.count_params() > 0 and len(data["x"]) == 960


def test_bad_input_exits_2_with_a_message(saved, tmp_path, capsys):
    not_model = tmp_path / "x.keras"
    not_model.write_text("hello")
    assert main(["diagnose", str(not_model), "--npz", str(saved / "data.npz")]) == 2
    assert "not a Keras model" in capsys.readouterr().err
    assert main(["diagnose", str(saved / "model.keras"), "--data", str(tmp_path / "missing")]) == 2
    assert main(["recalibrate", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), "-o", str(saved / "model.keras")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_frameworks_start_up_lines_are_hidden_unless_verbose(saved):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    cmd = [sys.executable, "-m", "evalgap", "diagnose", str(saved / "model.keras"), "--npz", str(saved / "data.npz"),
           "--batch-size", "120", "--max-samples", "240", "-q"]
    quiet = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    for noise in ("oneDNN", "cuda drivers", "cpu_feature_guard", "absl::InitializeLog"):
        assert noise not in quiet.stderr, quiet.stderr
    assert "stale_moving_statistics" in quiet.stdout
    if keras.backend.backend() == "tensorflow":  # -v shows them (TensorFlow prints them when it loads)
        loud = subprocess.run(cmd[:3] + ["-v"] + cmd[3:], env=env, capture_output=True, text=True, timeout=300)
        assert "oneDNN" in loud.stderr or "cuda" in loud.stderr.lower()
