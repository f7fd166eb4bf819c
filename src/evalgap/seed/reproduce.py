"""``evalgap reproduce``: the seed's training job for real, with the answer's remedies and evalgap's fix.

The job (``../shared/seed/question.md``): UC Merced (a folder, its zip, or ``tfds`` by name),
``resize_with_pad`` to S x S, ``keras.applications.ResNet50(weights=None, classes=N)``,
Adam, sparse categorical cross-entropy, accuracy, validation data = training data, under
``tf.distribute.MirroredStrategy`` on the TensorFlow backend when there is more than one
device. Variants:

=========================  =======  ========  =============================================
variant                    batch    momentum  inputs / callbacks
=========================  =======  ========  =============================================
``seed``                   96       0.99      raw 0..255 pixels
``batch4-div255``          4        0.99      pixels / 255 (the answer's remedy 1)
``momentum0.9``            96       0.9       raw pixels (the answer's remedy 2)
``precise-bn``             96       0.99      raw pixels, ``PreciseBN`` in the callbacks
``normalized-precise-bn``  96       0.99      per-channel standardized, ``PreciseBN``
=========================  =======  ========  =============================================

Every epoch logs Keras's loss/accuracy/val_loss/val_accuracy, and ``precise_val_*``: the
validation metrics with exact population statistics measured on the side (statistics saved,
recalibrated on a fixed class-stratified sample of ``precise_samples`` training images,
evaluated on all the validation data, restored), so the trajectory is the one the variant
trains. With ``PreciseBN`` (``precise-bn`` variants) fit's own validation pass already uses
exact statistics of all the data: ``precise_val_*`` is that pass, at no extra cost. Each
measurement also logs ``train_mode_*``: the recalibration pass's own outputs scored with the
compiled loss and metrics, i.e. training mode (batch statistics of fit's batch size) at the
epoch's final weights on the statistics sample; Keras's ``accuracy`` instead averages over
the epoch while the weights change.
Normalization (``/255`` or standardization) is a first layer of the model, so the cached
uint8 images feed every variant.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .._files import atomic_write, atomic_write_text
from ..errors import DataError
from .common import (DEFAULT_PRECISE_SAMPLES, PRECISE_SCHEDULE, check_precise_every, precise_epochs, precise_plan, summary_epochs,
                     variant_batch_size)


@dataclass(frozen=True)
class Variant:
    name: str
    batch_size: int
    momentum: float
    inputs: str  # "raw", "div255", "standardize"
    precise_bn: bool
    description: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("seed", 96, 0.99, "raw", False, "the question's code: batch 96, momentum 0.99, raw pixels"),
        Variant("batch4-div255", 4, 0.99, "div255", False, "answer, remedy 1: batch 4 and img / 255"),
        Variant("momentum0.9", 96, 0.9, "raw", False, "answer, remedy 2: BatchNormalization(momentum=0.9)"),
        Variant("precise-bn", 96, 0.99, "raw", True, "the seed + evalgap.keras.PreciseBN"),
        Variant("normalized-precise-bn", 96, 0.99, "standardize", True, "standardized inputs + PreciseBN"),
    )
}


def build_model(classes: int, image_size: int, momentum: float | None, inputs: str, mean=None, std=None, batch_size: int | None = None):
    """ResNet50 from scratch as the seed built it, with an optional input layer and BN momentum."""
    import keras

    net = keras.applications.ResNet50(weights=None, classes=classes, input_shape=(image_size, image_size, 3))
    if momentum is not None:
        for layer in net._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(momentum)
    if inputs == "raw":
        model = net
    else:
        inp = keras.Input((image_size, image_size, 3))
        if inputs == "div255":
            h = keras.layers.Rescaling(1 / 255.0, name="div255")(inp)
        else:
            h = keras.layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="standardize")(inp)
        model = keras.Model(inp, net(h), name=f"resnet50_{inputs}")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _strategy():
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(devices) > 1 else None


def run_variant(
    variant: Variant,
    images: np.ndarray,
    labels: np.ndarray,
    classes: int,
    epochs: int,
    *,
    batch_size: int | None = None,
    on_epoch=None,
    seed: int = 0,
    precise_every: int | str = PRECISE_SCHEDULE,
    info: dict[str, Any] | None = None,
    on_step=None,
    precise_samples: int | None = DEFAULT_PRECISE_SAMPLES,
) -> list[dict[str, float]]:
    """Train one variant with validation data = training data; return its per-epoch logs.

    ``precise_val_*`` after the epochs :func:`~evalgap.seed.common.precise_epochs` gives for
    ``precise_every`` (``"seed"``: the summary table's epochs, 1-7, 10, 20, 50 and the last; N: every N-th; 0: never): statistics from
    :func:`~evalgap.seed.common.precise_subsample` of ``precise_samples`` images (``None``/0:
    all), evaluation on all the data; for a ``PreciseBN`` variant, fit's validation itself.
    ``info`` (a dict, if given) receives how PreciseBN and the precise measurement drew their
    batches (``batching``): shuffled as fit draws them, with seed 0, and ``precise_val``, what
    the measurement used. ``on_step(variant, epoch, advance, total)`` follows the training
    steps (for a progress bar).
    """
    import contextlib

    import keras

    from ..keras import PreciseBN
    from .keras_callbacks import PreciseValidation, ValidationIsPrecise

    keras.utils.set_random_seed(seed)
    bs = variant_batch_size(variant.batch_size, batch_size, len(images))
    mean = images.reshape(-1, 3).mean(0).tolist() if variant.inputs == "standardize" else None
    std = images.reshape(-1, 3).std(0).tolist() if variant.inputs == "standardize" else None
    strategy = _strategy()
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_model(classes, images.shape[1], variant.momentum, variant.inputs, mean, std)
    logs: list[dict[str, float]] = []

    class Collect(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, epoch_logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, epoch_logs=None):
            row = {"epoch": epoch + 1, "seconds": time.perf_counter() - self.t, **{k: float(v) for k, v in (epoch_logs or {}).items()}}
            side = measuring.get("precise_val")
            if side is not None and epoch + 1 in side.seconds:  # the side measurement's share of "seconds"
                row["precise_seconds"] = side.seconds[epoch + 1]
            logs.append(row)
            if on_epoch is not None:
                on_epoch(variant, row)

    measuring: dict[str, Any] = {}
    extra: list[Any] = []
    if variant.precise_bn:
        measuring["precise_bn"] = PreciseBN((images, labels), batch_size=bs, verbose=0, training_metrics=True)
    mode, pick, precise = precise_plan(labels, precise_bn=variant.precise_bn, every=precise_every, samples=precise_samples,
                                       batch_size=bs, seed=seed)
    if mode == "validation":
        extra.append(ValidationIsPrecise())
    elif mode == "side":
        measuring["precise_val"] = PreciseValidation((images[pick], labels[pick]), (images, labels), batch_size=bs,
                                                   at=precise_epochs(epochs, precise_every))
    if info is not None:
        info["precise_val"] = precise
    callbacks = [*measuring.values(), *extra, Collect()]
    if on_step is not None:  # only on a terminal: a per-step callback makes Keras sync after every step
        callbacks.append(_steps(variant, on_step))
    model.fit(images, labels, batch_size=bs, epochs=epochs, validation_data=(images, labels), callbacks=callbacks, verbose=0, shuffle=True)
    if info is not None:
        info["batching"] = {name: cb.last.batching for name, cb in measuring.items() if cb.last is not None}
    return logs


def _steps_callback():
    import keras

    class Steps(keras.callbacks.Callback):
        """Report each epoch's start and every training step to ``on_step``."""

        def __init__(self, variant, on_step):
            super().__init__()
            self.variant, self.on_step = variant, on_step

        def on_epoch_begin(self, epoch, logs=None):
            self.on_step(self.variant, epoch + 1, 0, (self.params or {}).get("steps"))

        def on_train_batch_end(self, batch, logs=None):
            self.on_step(self.variant, None, 1, None)

    return Steps


def _steps(variant, on_step):
    return _steps_callback()(variant, on_step)


class _EpochBar:
    """A transient rich bar of the current epoch's training steps, on the reproduce console (terminals only)."""

    def __init__(self, console: Console, epochs: int):
        self.console, self.epochs = console, epochs
        self.progress = None
        self.task = None

    def __enter__(self) -> "_EpochBar":
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def step(self, variant, epoch: int | None, advance: int, total: int | None) -> None:
        if self.progress is None:
            return
        if epoch is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(f"{variant.name}: epoch {epoch}/{self.epochs}", total=total)
        elif self.task is not None:
            self.progress.advance(self.task, advance)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


def summary_table(results: dict[str, list[dict[str, float]]], epochs: tuple[int, ...]) -> Table:
    table = Table(title="accuracy / val_accuracy / precise_val_accuracy at the seed's epochs (and the last)")
    table.add_column("variant")
    for e in epochs:
        table.add_column(f"epoch {e}", justify="right")
    for name, logs in results.items():
        cells = []
        for e in epochs:
            row = next((r for r in logs if r["epoch"] == e), None)
            precise = f"{row['precise_val_accuracy']:.3f}" if row is not None and "precise_val_accuracy" in row else "-"
            cells.append("-" if row is None else f"{row['accuracy']:.3f} / {row['val_accuracy']:.3f} / {precise}")
        table.add_row(name, *cells)
    return table


class Reproduction(dict):
    """What :func:`reproduce` returns (a dict: source, backend, variants with their epoch logs, ...);
    a notebook shows it as a table."""

    def _repr_html_(self) -> str:
        from ..report_html import reproduction_html

        return reproduction_html(self)


def reproduce(
    images: np.ndarray,
    labels: np.ndarray,
    classes: int,
    *,
    variants: list[str],
    epochs: int = 50,
    batch_size: int | None = None,
    out: str = "evalgap-out/reproduce",
    source: str = "",
    console: Console | None = None,
    precise_every: int | str = PRECISE_SCHEDULE,
    keras_version: int = 3,
    precise_samples: int | None = DEFAULT_PRECISE_SAMPLES,
) -> "Reproduction":
    """Run the variants one after the other; write JSON, CSV, a PNG plot and a summary.

    ``keras_version=2`` runs the job in Keras 2 as the question wrote it (:mod:`evalgap.seed.tf_keras_job`).
    ``precise_every``: when the variants without PreciseBN measure ``precise_val_*`` on the side
    (:data:`~evalgap.seed.common.PRECISE_SCHEDULE`: after epochs 1-7, 10, 20, 50 and the last; N:
    every N-th epoch; 0: never); the PreciseBN variants have it from fit's validation every epoch.
    """
    precise_every = check_precise_every(precise_every)
    if keras_version == 2:
        from . import tf_keras_job

        framework, backend, runner, table = tf_keras_job.framework(), tf_keras_job.FRAMEWORK, tf_keras_job.run_variant, tf_keras_job.variants(VARIANTS)
    else:
        import keras

        framework, backend, runner, table = f"Keras {keras.__version__} ({keras.backend.backend()})", keras.backend.backend(), run_variant, VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise DataError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}.")
    if not variants:
        raise DataError(f"no variant to run; choose from {list(VARIANTS)}.")
    if len(images) == 0:
        raise DataError("no images to train on.")
    console = console or Console()
    results: dict[str, list[dict[str, float]]] = {}
    infos: dict[str, dict[str, Any]] = {}
    kept: list[str] = []  # the variants in the files written last, and those files
    kept_paths: tuple[str, ...] = ()
    console.print(
        f"The seed's job on {source or 'the given data'} ({images.shape[1]}x{images.shape[2]}): ResNet50(weights=None), Adam, validation data = training data, {framework}, "
        f"{epochs} epochs per variant."
    )
    with _EpochBar(console, epochs) as bar:
        for name in variants:
            v = table[name]

            def on_epoch(variant, row):
                console.print(
                    f"[{variant.name}] Epoch {row['epoch']}/{epochs} - {row['seconds']:.0f}s - loss: {row['loss']:.4f} - "
                    f"accuracy: {row['accuracy']:.4f} - val_loss: {row['val_loss']:.4f} - val_accuracy: {row['val_accuracy']:.4f}"
                    + (f" - precise_val_loss: {row['precise_val_loss']:.4f} - precise_val_accuracy: {row['precise_val_accuracy']:.4f}"
                       if "precise_val_accuracy" in row else "")
                    + (f" - train_mode_accuracy: {row['train_mode_accuracy']:.4f}" if "train_mode_accuracy" in row else ""),
                    markup=False,
                    highlight=False,
                )

            console.print(f"[bold]{name}[/bold]: {described(v, batch_size, len(images))}", highlight=False)
            infos[name] = {}
            steps = {"on_step": bar.step} if bar.progress is not None and keras_version != 2 else {}
            try:
                results[name] = runner(v, images, labels, classes, epochs, batch_size=batch_size, on_epoch=on_epoch,
                                       precise_every=precise_every, precise_samples=precise_samples, info=infos[name], **steps)
                data = _reproduction(source, backend, images, classes, epochs, batch_size, table, infos, results)
                paths = _write_outputs(results, data, out)  # after each variant: an interrupted run keeps the finished ones
            except KeyboardInterrupt:
                bar.__exit__(None, None, None)
                bar.progress = None
                if kept:
                    console.print(f"Interrupted during {name}: kept {', '.join(kept_paths)} with the finished variant(s) "
                                  f"{', '.join(kept)}.", markup=False, highlight=False)
                else:
                    console.print(f"Interrupted during {name}, the first variant: nothing was written to {out}.", markup=False,
                                  highlight=False)
                raise
            kept, kept_paths = list(results), paths
    console.print(summary_table(results, tuple(summary_epochs(epochs))))
    console.print(f"Written: {', '.join(paths)}")
    return data


def described(variant: Variant, batch_size: int | None, images: int) -> str:
    """The variant's description with the batch it runs at: ``--batch-size`` (the batch-96 variants) or capped at the
    number of images; as it is unless the batch differs from the variant's own."""
    used = variant_batch_size(variant.batch_size, batch_size, images)
    if used == variant.batch_size:
        return variant.description
    why = f"--batch-size {batch_size}" if batch_size and variant.batch_size == 96 and batch_size <= images else f"capped at the {images} images"
    batch = f"batch {used} ({why}, in place of {variant.batch_size})"
    own = f"batch {variant.batch_size}"
    if own in variant.description:
        return variant.description.replace(own, batch, 1)
    return f"{variant.description}, at {batch}"


def _reproduction(source, backend, images, classes, epochs, batch_size, table, infos, results) -> "Reproduction":
    """The JSON document of the variants finished so far."""
    return Reproduction({
        "source": source,
        "backend": backend,
        "images": int(len(images)),
        "image_size": int(images.shape[1]),
        "classes": int(classes),
        "epochs": epochs,
        "variants": {n: {"description": described(table[n], batch_size, len(images)), "batch_size": variant_batch_size(table[n].batch_size, batch_size, len(images)), "momentum": table[n].momentum, "inputs": table[n].inputs, "precise_bn": table[n].precise_bn, **infos[n], "epochs": logs} for n, logs in results.items()},
    })


def _write_outputs(results: dict[str, list[dict[str, float]]], data: dict[str, Any], out: str) -> tuple[str, str, str]:
    """reproduce.json, reproduce.csv and reproduce.png in ``out``, each written atomically."""
    from ..plots import _pyplot, save_figure

    json_path, csv_path, png_path = (os.path.join(out, f) for f in ("reproduce.json", "reproduce.csv", "reproduce.png"))
    atomic_write_text(json_path, json.dumps(data, indent=2))

    def write_csv(p):
        keys = ["variant", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "precise_val_loss", "precise_val_accuracy",
                "train_mode_loss", "train_mode_accuracy", "seconds"]
        with open(p, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for n, logs in results.items():
                for row in logs:
                    w.writerow({"variant": n, **row})

    atomic_write(csv_path, write_csv, suffix=".csv")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.4), sharey=True, squeeze=False)
    for ax, (n, logs) in zip(axes[0], results.items()):
        ep = [r["epoch"] for r in logs]
        ax.plot(ep, [r["accuracy"] for r in logs], "-o", ms=3, label="accuracy")
        ax.plot(ep, [r["val_accuracy"] for r in logs], "-s", ms=3, label="val_accuracy")
        precise = [(r["epoch"], r["precise_val_accuracy"]) for r in logs if "precise_val_accuracy" in r]
        if precise:
            ax.plot(*zip(*precise), "--^", ms=3, label="precise val")
        train_mode = [(r["epoch"], r["train_mode_accuracy"]) for r in logs if "train_mode_accuracy" in r]
        if train_mode:
            ax.plot(*zip(*train_mode), ":v", ms=3, color="0.4", label="training mode, same weights")
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 1.2, 1.4, ... on short runs
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (same data)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png_path)
    return json_path, csv_path, png_path
