"""What the demos and the reproduction share: the seed's question, the console, the epoch table and plot."""

from __future__ import annotations

import sys
from typing import Sequence

from rich.console import Console
from rich.table import Table

SEED_QUESTION = (
    "Why do training accuracy and validation accuracy differ on the same dataset? "
    "(tf.keras, ResNet50 on UC Merced, batch 96, 22 steps per epoch, BatchNorm momentum 0.99, raw 0..255 pixels)"
)


def demo_console() -> Console:
    """A rich console; at least 120 columns when the output is not a terminal (logs, CI)."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def epoch_table(logs: Sequence, title: str) -> Table:
    """Keras-style epoch log with the gap and the precise-statistics validation accuracy."""
    table = Table(title=title)
    for col in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "gap (points)", "precise val_accuracy"):
        table.add_column(col, justify="right")
    for log in logs:
        gap = 100 * (log.accuracy - log.val_accuracy)
        table.add_row(
            str(log.epoch),
            f"{log.loss:.4f}",
            f"{log.accuracy:.4f}",
            f"{log.val_loss:.4f}",
            f"{log.val_accuracy:.4f}",
            f"{gap:+.1f}",
            f"{log.precise_val_accuracy:.4f}",
        )
    return table


def plot_epochs(logs: Sequence, title: str, path: str) -> str:
    """accuracy, val_accuracy and precise_val_accuracy by epoch, written to ``path``."""
    from ..plots import accuracy_by_epoch, save_figure

    names = ("accuracy", "val_accuracy", "precise_val_accuracy")
    return save_figure(accuracy_by_epoch({n: [getattr(log, n) for log in logs] for n in names}, title), path)
