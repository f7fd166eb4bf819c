"""``bench/gpu.sh --smoke``: the GPU acceptance script's code path, on CPU with tiny sizes.

The full run needs a GPU machine; this runs every step of it (seed job, fit vs reproduce,
PyTorch / Keras / Flax recalibration ratios, the summary) on a tiny synthetic image folder and
checks what it writes against itself and against the job's invariants.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("keras")
pytest.importorskip("tensorflow")
pytest.importorskip("torch")
pytest.importorskip("PIL")


def _image_folder(root: Path, classes: int = 21, per_class: int = 2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = root / "UCMerced_LandUse" / "Images"
    for c in range(classes):
        (images / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)  # not square: resize_with_pad pads
            Image.fromarray(pixels).save(images / f"class{c:02d}" / f"class{c:02d}{i:02d}.png")
    return root / "UCMerced_LandUse"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout")
def test_gpu_script_smoke_writes_every_table(tmp_path):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    # Keras on torch: eager, so the tiny run does not pay for tracing ResNet50 (TensorFlow's graphs took 3 of 4 minutes);
    # the job's code is the same on every Keras 3 backend
    env = dict(os.environ, PYTHON=sys.executable, EVALGAP_GPU_DATA=str(data), EVALGAP_GPU_KERAS_BACKEND="torch",
               EVALGAP_GPU_KERAS_BACKENDS="torch", TMPDIR=str(tmp_path))
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "--smoke"], env=env, capture_output=True, text=True, timeout=1200)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{log[-4000:]}"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what a device call returns
    assert {"summary.md", "results.json", "ratios.csv", "ratios.png", "reproduce.json", "reproduce.csv", "reproduce.png", "log.txt"} == set(files)
    results = json.loads((out / "results.json").read_text())
    assert all(s["exit"] == 0 for s in results["steps"]), results["steps"]

    # (a) the seed job: 42 images (the smoke run leaves out momentum0.9 and precise-every 0, same code path);
    # the side measurement and PreciseBN agree on the same weights
    job = results["seed_job"]
    assert job["images"] == 42 and list(job["variants"]) == ["seed", "precise-bn"]
    seed, fixed = job["variants"]["seed"]["epochs"], job["variants"]["precise-bn"]["epochs"]
    assert [r["loss"] for r in seed] == pytest.approx([r["loss"] for r in fixed], rel=1e-4)  # BN statistics never feed the gradient
    # the seed's side measurement (statistics of all 42 images, the default) is what PreciseBN's validation reports
    assert [r["precise_val_accuracy"] for r in seed] == pytest.approx([r["val_accuracy"] for r in fixed], abs=1e-6)
    # and both scored that same pass's outputs: the training-mode accuracy of the epoch's final weights
    assert [r["train_mode_accuracy"] for r in seed] == pytest.approx([r["train_mode_accuracy"] for r in fixed], abs=1e-6)
    rows = list(csv.DictReader(open(out / "reproduce.csv")))
    assert [float(r["val_accuracy"]) for r in rows if r["variant"] == "seed"] == pytest.approx([r["val_accuracy"] for r in seed])

    fit = results["fit_vs_reproduce"]["results"]
    assert [r["run"] for r in fit] == ["plain model.fit"]  # the smoke run times plain fit only (reproduce ran above)
    for r in fit:
        assert r["images_per_second"] == pytest.approx(42 / r["epoch_seconds"]) and r["ratio"] > 0

    # (b) ratios: each PyTorch setting against update_bn (and fvcore where installed), Keras, Flax
    ratios = list(csv.DictReader(open(out / "ratios.csv")))
    settings = {r["setting"] for r in ratios if r["framework"] == "torch"}
    for must in ("resnet50", "resnet50, 32 batches of 2", "channels-last", "autocast bf16", "mobilenet_v2, 1 batches of 16", "mobilenet_v2, 1 batches of 2"):
        assert any(must in s for s in settings), (must, settings)
    for s in settings:
        methods = {r["method"] for r in ratios if r["setting"] == s}
        assert {"training-mode forward (baseline)", "evalgap.torch.recalibrate", "torch swa_utils.update_bn"} <= methods
        base = next(r for r in ratios if r["setting"] == s and "baseline" in r["method"])
        assert float(base["ratio"]) == 1.0
    assert any(r["framework"] == "keras/torch" for r in ratios)
    if __import__("importlib").util.find_spec("flax") is not None:
        assert {"flax/nnx", "flax/linen"} <= {r["framework"] for r in ratios}
    # (c) the PyTorch pass's fast paths, as the GPU run checks them (here on the CPU)
    checks = results["checks"]["checks"]
    assert {"direct = forward (resnet50, fp32)", "exact (resnet50, fp32)", "direct = forward (resnet50, bf16 autocast)"} <= {c["check"] for c in checks}
    assert all(c["ok"] for c in checks), checks
    # where the time goes: every adapter step of a PyTorch call timed, the rest of the call beside them
    phases = results["profile"]["ms"]["evalgap"]
    assert {"prepare", "layers", "read", "enter", "batches", "host_captures", "exit", "write", "total"} <= set(phases), phases
    assert all(v >= 0 for k, v in phases.items() if k != "outside the adapter") and phases["batches"] < phases["total"]
    assert any(r["framework"] == "keras/torch" and "2 batches" in r["setting"] for r in ratios)  # the longer Keras run
    # diagnose against one evaluation pass, PyTorch and the Keras backend, each ratio its two times' quotient
    diag = results["diagnose"]
    assert {r["framework"] for r in diag["results"]} == {"torch", "keras/torch"} and not diag["failed"]
    for r in diag["results"]:
        assert r["ratio"] == pytest.approx(r["diagnose"] / r["evaluate"]) and r["evaluate"] > 0
    summary = (out / "summary.md").read_text()
    assert "## Where PyTorch recalibrate's extra time goes" in summary and "## diagnose / one evaluation pass" in summary
    assert "## The seed's job" in summary and "## Recalibration / training-mode forward" in summary and "images/s" in summary
    assert (out / "ratios.png").read_bytes()[:4] == b"\x89PNG" and (out / "reproduce.png").read_bytes()[:4] == b"\x89PNG"
