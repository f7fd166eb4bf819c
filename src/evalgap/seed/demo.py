"""``evalgap demo``: the seed's symptom and its fix on embedded data, on the CPU."""

from __future__ import annotations

import os

from rich.console import Console

from ..errors import DataError
from .common import SEED_QUESTION, demo_console, epoch_table, plot_epochs


def _check_epochs(epochs: int | None) -> None:
    """``None`` (the demo's own) or a whole number >= 1; anything else raises :class:`DataError`."""
    if epochs is not None and epochs < 1:
        raise DataError(f"epochs (--epochs) must be >= 1, got {epochs}; leave it out for the demo's own.")


def run_torch_demo(epochs: int | None = None, out: str = "evalgap-out", console: Console | None = None) -> int:
    """Train the small BN network in PyTorch, print the gap per epoch, recalibrate, plot."""
    _check_epochs(epochs)
    from ..data import load_digits_rgb
    from ..torch import diagnose, recalibrate
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

    x, y = to_tensors(images, labels)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    console.rule("evalgap.torch.diagnose(model, train_batches, fit_metric=..., steps_per_epoch=15, epochs=...)")
    report = diagnose(model, batches, fit_metric=logs[-1].accuracy, steps_per_epoch=steps, epochs=epochs, progress=False)
    console.print(report)
    html = report.to_html(os.path.join(out, "demo_report_torch.html"))
    console.rule("the fix")
    loss_before, acc_before = evaluate(model, x, y, batch_size)
    result = recalibrate(model, batches, progress=False)
    loss_after, acc_after = evaluate(model, x, y, batch_size)
    console.print(result.summary())
    console.print(
        f"[bold]Fix[/bold] evalgap.torch.recalibrate(model, loader): evaluation accuracy {acc_before:.4f} -> "
        f"[bold]{acc_after:.4f}[/bold] (loss {loss_before:.3f} -> {loss_after:.3f}); "
        f"training accuracy of the last epoch {logs[-1].accuracy:.4f}."
    )
    path = plot_epochs(
        logs, "Same data, two modes: PyTorch small ResNet on digits (raw pixels, momentum 0.99)", os.path.join(out, "demo_torch.png")
    )
    console.print(f"Plot written to {os.path.abspath(path)}; HTML report written to {os.path.abspath(html)}")
    return 0


def run_keras_demo(epochs: int | None = None, out: str = "evalgap-out", console: Console | None = None) -> int:
    _check_epochs(epochs)
    from .keras_demo import run

    return run(epochs=epochs, out=out, console=console)
