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


DEFAULT_PRECISE_SAMPLES = 0
"""Images ``precise_val_*``'s statistics come from by default (``--precise-samples``): 0, all.

Measured on the real UC Merced images (``bench/precise_samples.py``, ``docs/benchmarks.md``):
statistics from class-stratified samples of 384 to 1536 of the 2100 images put
``precise_val_accuracy`` up to 1.1 points below the value with all of them at some epoch
(wrong statistics cost accuracy, so a sample's error is a bias, not noise), so no sample
smaller than the data meets a 1-point bound at every epoch; a sample is a speed option.
"""


def whole_batches(n: int | None, batch_size: int, total: int) -> int | None:
    """``n`` rounded up to whole batches of ``batch_size``, at most ``total`` (``None``/0: all).

    The statistics pass uses full batches only (a ragged last batch is left out), so a sample
    of 512 at batch 96 would measure 480 images; rounded up it measures 576.
    """
    if not n or n >= total:
        return n
    return min(total, -(-n // batch_size) * batch_size)


def precise_subsample(labels, n: int | None, seed: int = 0):
    """Indices (sorted) of a fixed, class-stratified, seeded sample of ``n`` of the examples.

    Each class gets ``n * count_c / len(labels)`` examples, rounded down, and the ``n - sum``
    left over go to the classes with the largest remainders (largest-remainder rounding), so
    the sample has the class mix of the data. ``n`` of ``None``, 0 or at least ``len(labels)``
    returns every index. The same ``labels``, ``n`` and ``seed`` give the same sample.
    """
    import numpy as np

    labels = np.asarray(labels)
    if labels.ndim > 1:  # one-hot or (n, 1)
        labels = labels.argmax(-1) if labels.shape[-1] > 1 else labels[:, 0]
    m = len(labels)
    if not n or n >= m:
        return np.arange(m)
    if n < 0:
        raise ValueError(f"the number of samples must be >= 0, got {n}.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n / m
    quota = np.floor(share).astype(int)
    quota[np.argsort(-(share - quota), kind="stable")[: n - int(quota.sum())]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


PRECISE_SCHEDULE = "seed"
"""When ``precise_val_*`` is measured by default (``--precise-every``): at the epochs of the summary
table (:func:`summary_epochs`): 1 to 7 (where the question reports its numbers), 10, 20, 50 and
the last; 10 of the job's 50 epochs.

Each side measurement costs a recalibration and an evaluation pass, 0.43 to 0.6 of a plain
``fit`` epoch on the real images (``docs/benchmarks.md``), so measuring every epoch makes the
job 1.46x to 1.6x plain ``fit``; this schedule keeps the 50-epoch job at 1.09x to 1.12x and still
fills every cell of the summary table. ``--precise-every 1`` measures every epoch.
"""

#: The epochs the question reports, measured by the ``"seed"`` schedule and shown in the summary table.
SEED_EPOCHS = (1, 2, 3, 4, 5, 6, 7)


def summary_epochs(epochs: int) -> list[int]:
    """The epochs the summary table shows: :data:`SEED_EPOCHS`, 10, 20, 50 and the last (those that exist)."""
    return sorted({e for e in (*SEED_EPOCHS, 10, 20, 50) if e <= epochs} | ({epochs} if epochs > 0 else set()))


def check_precise_every(every: int | str) -> int | str:
    """``every`` as :func:`precise_epochs` takes it: ``"seed"`` or a whole number >= 0; else a DataError."""
    if isinstance(every, str) and every.strip().lower() == PRECISE_SCHEDULE:
        return PRECISE_SCHEDULE
    try:
        value = int(every)
    except (TypeError, ValueError):
        value = -1
    if value < 0 or (not isinstance(every, str) and value != every):
        from ..errors import DataError

        raise DataError(f"precise_every must be {PRECISE_SCHEDULE!r} or a whole number >= 0 (0: never, 1: every epoch), got {every!r}.")
    return value


def precise_epochs(epochs: int, every: int | str = PRECISE_SCHEDULE) -> list[int]:
    """The epochs (1-based) after which ``precise_val_*`` is measured.

    ``"seed"``: the summary table's epochs, :func:`summary_epochs` (see :data:`PRECISE_SCHEDULE`);
    ``N``: every N-th epoch (1: all); ``0``: none.
    """
    every = check_precise_every(every)
    if every == PRECISE_SCHEDULE:
        return summary_epochs(epochs)
    return list(range(every, epochs + 1, every)) if every else []


def schedule_text(every: int | str) -> str:
    """The schedule in words."""
    every = check_precise_every(every)
    if every == PRECISE_SCHEDULE:
        return "after epochs 1-7, 10, 20, 50 and the last"
    return "after every epoch" if every == 1 else f"after every {ordinal(every)} epoch" if every else "never"


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 22nd, 101st, 111th."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def precise_plan(labels, *, precise_bn: bool, every: int | str, samples: int | None, batch_size: int, seed: int = 0):
    """How a variant measures ``precise_val_*``: ``(mode, pick, description)``.

    ``mode`` is ``"validation"`` (PreciseBN recalibrates on all the data before fit's validation,
    which then is the measurement, every epoch at no extra cost), ``"side"`` (a recalibration on
    ``labels[pick]``, the :func:`precise_subsample` of ``samples`` rounded up to whole batches,
    then an evaluation on all the data, at the epochs :func:`precise_epochs` gives for ``every``)
    or ``"off"`` (``every`` is 0).
    """
    total = len(labels)
    if check_precise_every(every) == 0:
        return "off", None, "not measured"
    if precise_bn:
        return "validation", None, f"fit's validation pass: PreciseBN recalibrated on {_measured(total, batch_size)} before it"
    pick = precise_subsample(labels, whole_batches(samples, batch_size, total), seed)
    return "side", pick, (f"statistics from {_measured(len(pick), batch_size, total)} (class-stratified, seed {seed}), "
                          f"evaluated on all {total}, {schedule_text(every)}")


def _measured(n: int, batch_size: int, total: int | None = None) -> str:
    """Which of ``n`` images (a pick of ``total``) a statistics pass at ``batch_size`` measures: whole batches only."""
    used = n - n % batch_size if n > batch_size else n
    if total is None and used == n:
        return f"all {n} images"
    ragged = f" (whole batches of {batch_size}; the last {n - used} left out)" if used < n else ""
    return f"{used} of {total if total is not None else n} images{ragged}"


def variant_batch_size(variant_batch: int, override: int | None, images: int) -> int:
    """A variant's batch size: ``override`` (``--batch-size``) replaces the seed's 96, never a variant's own (4);
    at most the number of images (CPU-sized runs)."""
    return min(override if override and variant_batch == 96 else variant_batch, images)
