"""``evalgap demo`` in Keras: the seed's job in miniature on the embedded digits.

1680 digits (14 whole batches of 120) as 32x32 RGB with raw 0..255 values, a small
ResNet-style BatchNorm network (momentum 0.99, Keras's default), Adam, validation data =
training data, as the seed. Each epoch logs Keras's loss/accuracy/val_loss/val_accuracy and
the validation accuracy with exact population statistics (measured on the side, which is
what ``PreciseBN`` would report). Then the trained model is recalibrated for real.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
from rich.console import Console

from .common import SEED_QUESTION, demo_console, epoch_table, plot_epochs

SAMPLES, BATCH, MOMENTUM = 1680, 120, 0.99


def run(epochs: int | None = None, out: str = "evalgap-out", console: Console | None = None) -> int:
    import keras

    from ..data import load_digits_rgb
    from ..keras import diagnose, recalibrate
    from .keras_callbacks import PreciseValidation
    from .keras_models import small_resnet

    console = console or demo_console()
    epochs = epochs or 8
    images, labels = load_digits_rgb(32)
    order = np.random.default_rng(0).permutation(len(images))[:SAMPLES]
    x, y = images[order].astype("float32"), labels[order]
    steps = SAMPLES // BATCH
    console.print(f"[bold]The seed's question[/bold]: {SEED_QUESTION}")
    console.print(
        f"In miniature, Keras {keras.__version__} ({keras.backend.backend()} backend): {SAMPLES} digits as 32x32 RGB "
        f"with raw 0..255 values, a small ResNet with BatchNormalization(momentum={MOMENTUM}), Adam, batch {BATCH} "
        f"({steps} steps per epoch), validation_data = the training data."
    )
    keras.utils.set_random_seed(0)
    model = small_resnet((32, 32, 3), 10, momentum=MOMENTUM)
    logs = []

    class Status(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, epoch_logs=None):
            logs.append(SimpleNamespace(epoch=epoch + 1, **{k: float(v) for k, v in (epoch_logs or {}).items()}))
            status.update(
                f"training... epoch {epoch + 1}/{epochs}: accuracy {logs[-1].accuracy:.3f}, "
                f"val_accuracy {logs[-1].val_accuracy:.3f}"
            )

    start = time.perf_counter()
    with console.status("training...") as status:
        history = model.fit(
            x, y, batch_size=BATCH, epochs=epochs, validation_data=(x, y), verbose=0,
            callbacks=[PreciseValidation((x, y), (x, y), batch_size=BATCH), Status()],
        )
    console.print(epoch_table(logs, f"Training vs validation on the same data (Keras, {keras.backend.backend()})"))
    console.print(f"({time.perf_counter() - start:.0f} s.) The precise column is what validation reports with "
                  "evalgap.keras.PreciseBN(train_data) in the callbacks; training itself is identical.")
    console.rule("evalgap.keras.diagnose(model, (x, y), batch_size=120, history=history)")
    report = diagnose(model, (x, y), batch_size=BATCH, history=history, progress=False)
    console.print(report)
    html = report.to_html(os.path.join(out, f"demo_report_{keras.backend.backend()}.html"))
    console.rule("the fix")
    before = model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    result = recalibrate(model, (x, y), batch_size=BATCH, progress=False)
    after = model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    console.print(result.summary())
    console.print(
        f"[bold]Fix[/bold] evalgap.keras.recalibrate(model, (x, y), batch_size={BATCH}): val_accuracy "
        f"{before['accuracy']:.4f} -> [bold]{after['accuracy']:.4f}[/bold] (val_loss {before['loss']:.3f} -> "
        f"{after['loss']:.3f}); training accuracy of the last epoch {logs[-1].accuracy:.4f}."
    )
    path = plot_epochs(
        logs,
        f"Same data, two modes: Keras ({keras.backend.backend()}) small ResNet on digits, momentum 0.99, raw pixels",
        os.path.join(out, f"demo_keras_{keras.backend.backend()}.png"),
    )
    console.print(f"Plot written to {os.path.abspath(path)}; HTML report written to {os.path.abspath(html)}")
    return 0
