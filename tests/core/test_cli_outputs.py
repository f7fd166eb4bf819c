"""What the commands draw: reproduce.png and the demo's plot mark whole epochs only."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


def _ticks_in_view(ax) -> list[float]:
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_epoch_axes_have_whole_number_ticks_on_short_runs(tmp_path, monkeypatch):
    """A 2- or 3-epoch run put ticks at 1.2, 1.4, ... on reproduce.png: epochs are whole numbers."""
    import evalgap.plots as plots
    from evalgap.seed.reproduce import _write_outputs

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.append(fig))
    for epochs in (2, 3):
        rows = [{"epoch": e, "seconds": 0.1, "loss": 1.0, "accuracy": 0.5, "val_accuracy": 0.2, "precise_val_accuracy": 0.4}
                for e in range(1, epochs + 1)]
        _write_outputs({"seed": rows, "precise-bn": rows}, {"epochs": epochs}, str(tmp_path))
        for ax in drawn[-1].axes:
            ticks = _ticks_in_view(ax)
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    fig = plots.accuracy_by_epoch({"accuracy": [0.1, 0.2], "val_accuracy": [0.0, 0.1]}, "two epochs")
    ticks = _ticks_in_view(fig.axes[0])
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
