"""`evalgap demo --framework torch` end to end (one epoch), through the CLI entry point."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from evalgap.cli import main  # noqa: E402


def test_torch_demo_runs_and_writes_its_plot(tmp_path, capsys):
    assert main(["demo", "--framework", "torch", "--epochs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "val_accuracy" in out and "recalibrated" in out and "Plot written to" in out
    png = tmp_path / "demo_torch.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--framework", "mxnet"])
    assert info.value.code == 2


def test_flag_combinations_that_make_no_sense_exit_2(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2, 2, 3), np.uint8), y=np.zeros(4, np.int64))
    assert main(["diagnose", "--torch-model", "a:b", "--npz", str(tmp_path / "d.npz"), "--tfds-manual-dir", str(tmp_path)]) == 2
    assert "go with --tfds" in capsys.readouterr().err
    assert main(["diagnose", "m.keras", "--npz", str(tmp_path / "d.npz"), "--weights", "w.pt"]) == 2
    assert "--weights goes with --torch-model" in capsys.readouterr().err
    assert main(["diagnose", "--npz", str(tmp_path / "d.npz")]) == 2
