"""``evalgap demo``: the seed's symptom and its fix on embedded data, on the CPU."""

from __future__ import annotations

import math
import os
from typing import Sequence

from rich.console import Console
from rich.table import Table

from ..stats import EMA, momentum_for_memory

SEED_QUESTION = (
    "Why do training accuracy and validation accuracy differ on the same dataset? "
    "(tf.keras, ResNet50 on UC Merced, batch 96, 22 steps per epoch, BatchNorm momentum 0.99, raw 0..255 pixels)"
)


def demo_console() -> Console:
    """A rich console; at least 120 columns when the output is not a terminal (logs, CI)."""
    import sys

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


def ema_sentences(momentum_keras: float, steps_per_epoch: int, epochs: int) -> list[str]:
    """The EMA arithmetic of DESIGN.md in words, for the demo's closing lines."""
    ema = EMA(momentum_keras)
    updates = steps_per_epoch * epochs
    advice = momentum_for_memory(steps_per_epoch)
    return [
        f"BatchNorm momentum {momentum_keras} (Keras convention; PyTorch's {1 - momentum_keras:.2g}) with "
        f"{steps_per_epoch} steps per epoch: after {epochs} epochs ({updates} updates) "
        f"{100 * ema.initial_weight(updates):.0f}% of each moving statistic is still its initial value, "
        f"and the statistics are on average {ema.mean_age(updates):.0f} updates "
        f"({ema.mean_age(updates) / steps_per_epoch:.1f} epochs) old (memory: {ema.memory:.0f} updates).",
        f"A momentum whose memory is at most half an epoch: {advice:.3f} (Keras) / {1 - advice:.3f} (PyTorch).",
    ]


def run_torch_demo(epochs: int | None = None, out: str = "evalgap-out", console: Console | None = None) -> int:
    """Train the small BN network in PyTorch, print the gap per epoch, recalibrate, plot."""
    from ..data import load_digits_rgb
    from ..plots import accuracy_by_epoch, save_figure
    from ..torch import recalibrate
    from .torch_demo import evaluate, to_tensors, train_with_same_validation

    console = console or demo_console()
    epochs = epochs or 8
    batch_size, momentum = 120, 0.01
    images, labels = load_digits_rgb(32)
    steps = -(-len(images) // batch_size)
    console.print(f"[bold]The seed's question[/bold]: {SEED_QUESTION}")
    console.print(
        f"In miniature, PyTorch: {len(images)} digits as 32x32 RGB with raw 0..255 values, a small ResNet with "
        f"BatchNorm momentum {momentum} (= Keras 0.99), Adam, batch {batch_size} ({steps} steps per epoch), "
        "validation data = training data."
    )
    logs = []
    with console.status("training...") as status:
        def on_epoch(log):
            logs.append(log)
            status.update(f"training... epoch {log.epoch}/{epochs}: accuracy {log.accuracy:.3f}, val_accuracy {log.val_accuracy:.3f}")

        model, _ = train_with_same_validation(images, labels, epochs=epochs, batch_size=batch_size, momentum=momentum, on_epoch=on_epoch)
    console.print(epoch_table(logs, "Training vs validation on the same data (PyTorch)"))
    for line in ema_sentences(1 - momentum, steps, epochs):
        console.print(line)

    x, y = to_tensors(images, labels)
    loss_before, acc_before = evaluate(model, x, y, batch_size)
    result = recalibrate(model, [x[i : i + batch_size] for i in range(0, len(x), batch_size)], progress=False)
    loss_after, acc_after = evaluate(model, x, y, batch_size)
    first = result.first_drifting()
    console.print(result.summary())
    if first is not None and first.drift is not None:
        console.print(
            f"First drifting layer: {first.name} (mean off by up to {first.drift.mean_max:.2f} std, variance by a factor "
            f"up to {math.exp(first.drift.var_max):.3g}); later layers inherit its error."
        )
    console.print(
        f"[bold]Fix[/bold] evalgap.torch.recalibrate(model, loader): evaluation accuracy {acc_before:.4f} -> "
        f"[bold]{acc_after:.4f}[/bold] (loss {loss_before:.3f} -> {loss_after:.3f}); "
        f"training accuracy of the last epoch {logs[-1].accuracy:.4f}."
    )
    fig = accuracy_by_epoch(
        {
            "accuracy": [log.accuracy for log in logs],
            "val_accuracy": [log.val_accuracy for log in logs],
            "precise_val_accuracy": [log.precise_val_accuracy for log in logs],
        },
        "Same data, two modes: PyTorch small ResNet on digits (raw pixels, momentum 0.99)",
    )
    path = save_figure(fig, os.path.join(out, "demo_torch.png"))
    console.print(f"Plot written to {os.path.abspath(path)}")
    return 0


def run_keras_demo(epochs: int | None = None, out: str = "evalgap-out", console: Console | None = None) -> int:
    from .keras_demo import run

    return run(epochs=epochs, out=out, console=console)
