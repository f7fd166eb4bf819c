"""Matplotlib figures (Agg backend, no screen needed)."""

from __future__ import annotations

import os
import textwrap
from typing import Mapping, Sequence

from ._files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def accuracy_by_epoch(series: Mapping[str, Sequence[float]], title: str, ylabel: str = "accuracy"):
    """One line per named series (e.g. accuracy, val_accuracy, precise_val_accuracy) by epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"accuracy": "-o", "val_accuracy": "-s", "precise_val_accuracy": "--^"}
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, styles.get(name.split(": ")[-1], "-o"), label=name, markersize=4)
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 1.5 on a 2-epoch run
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | os.PathLike) -> str:
    """Write ``fig`` atomically (temporary file, then rename) and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=os.path.splitext(os.fspath(path))[1] or ".png")
    finally:
        _pyplot().close(fig)
