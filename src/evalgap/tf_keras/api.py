"""``evalgap.tf_keras.recalibrate`` and ``evalgap.tf_keras.diagnose``: the engine with the Keras 2 adapter."""

from __future__ import annotations

from typing import Any


from .. import engine
from .._checks import check_sizes
from ..recalibration import Recalibration
from ..report import Report
from .adapter import ADAPTER


def recalibrate(
    model,
    data: Any,
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
    include_frozen: bool = False,
    progress: bool = True,
    drop_ragged: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    max_samples: int | None = None,
    training_metrics: bool = False,
) -> Recalibration:
    """Set every Keras 2 BatchNormalization layer's moving statistics to the exact population statistics.

    One pass over the data, each BatchNormalization layer normalizing by its batch
    statistics as in training (fused kernel or not, ghost batches of ``virtual_batch_size``,
    Batch Renormalization's correction) and every other layer in inference mode (dropout
    off); ``moving_mean`` / ``moving_variance`` become, per channel, in float64

        mean = sum_b n_b mu_b / N,     var = sum_b n_b (var_b + (mu_b - mean)^2) / N

    with ``var_b`` the *biased* batch variance, for fused layers too (their kernel's
    moving average uses the Bessel-corrected one) and over whole batches for ghost-batch
    layers (Keras 2's own moving variance averages the ghost batches' variances and drops
    the spread of their means).

    Args:
        model: a built or buildable Keras 2 model (``tf_keras``; ``tf.keras`` with
            ``TF_USE_LEGACY_KERAS=1`` or TensorFlow <= 2.15): functional, Sequential,
            subclassed, nested models included, under a ``tf.distribute`` strategy or not.
        data: ``x`` or ``(x, y[, sample_weight])`` arrays, cut into batches of
            ``batch_size`` as ``fit(shuffle=True)`` draws them (a permutation seeded with
            ``seed``; ``shuffle=False`` keeps the order); a ``tf.data.Dataset``, a
            ``keras.utils.Sequence``, a generator or any iterable of batches, taken in
            their order. Use the training batch size: batch statistics depend on it.
        batch_size: batch size for array data (default 32, Keras's; the result says so).
        max_batches: stop after this many batches.
        include_frozen: also recalibrate frozen layers: ``trainable=False`` ones and those
            the model calls with ``training=False`` (Keras runs them in inference mode even
            in fit, so by default they are left alone and listed).
        progress: show a progress bar.
        drop_ragged: leave out batches smaller than the first (counted in the result).
        shuffle, seed: how array data are drawn into batches.
        max_samples: use at most this many samples, and at least one batch: whole batches drawn at random from all
            of the arrays (the first batches of a stream).
        training_metrics: also score the pass's own outputs with the model's compiled loss
            and metrics (as ``evaluate`` computes them): the training-mode metrics of these
            weights, BatchNorm on batch statistics and dropout off, over every batch of the
            pass, at no extra pass. Needs ``(x, y)`` data. In ``result.training_metrics``.

    Returns:
        :class:`evalgap.Recalibration`, per layer: statistics before and after, drift.

    Side effects: ``moving_mean`` / ``moving_variance`` of the recalibrated layers only
    (and ``moving_stddev`` of Batch Renormalization layers); the pass assigns no variable
    (no ``add_update`` runs), so on failure or Ctrl-C nothing has changed.
    """
    batch_size, max_batches, max_samples = check_sizes(batch_size=batch_size, max_batches=max_batches, max_samples=max_samples)
    source = ADAPTER.batches(data, batch_size=batch_size, shuffle=shuffle, seed=seed)
    source = source.take(max_samples) if max_samples is not None else source
    return engine.recalibrate(ADAPTER, model, source, max_batches=max_batches, include_frozen=include_frozen, progress=progress,
                              drop_ragged=drop_ragged, training_metrics=training_metrics)


def diagnose(
    model,
    data: Any,
    *,
    batch_size: int | None = None,
    history: Any = None,
    max_samples: int | None = None,
    val_data: Any = None,
    progress: bool = True,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    bn_updates: int | None = None,
    primary: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> Report:
    """Measure the gap between training and evaluation mode on ``data`` and explain it.

    Every mode is measured with the model's compiled loss and metrics through Keras 2's own
    ``LossesContainer`` / ``MetricsContainer`` (fresh copies), as ``evaluate`` computes
    them (several outputs, loss weights, sample weights given as ``(x, y, sample_weight)``,
    weighted metrics, regularization and ``add_loss`` losses), so E equals
    ``model.evaluate(..., return_dict=True)`` on the same data and batch size, key by key.

    Args:
        model: a compiled Keras 2 model (an uncompiled classifier gets cross-entropy and
            accuracy, and the report says so).
        data: the training data with targets, as :func:`recalibrate` takes it.
        batch_size: the training batch size for array data.
        history: ``model.fit``'s History (or its ``.history`` dict): F (the last epoch's
            averaged training metrics), the steps per epoch and the epochs trained.
        max_samples: probe at most this many samples, and at least one batch (whole batches: drawn at random
            from all of the arrays, the first batches of a stream).
        val_data: separate validation data, for the data term.
        steps_per_epoch, epochs: for the EMA arithmetic when no History is given.
        bn_updates: the number of BatchNorm updates actually made (GapMonitor counts them).
        primary: the metric to rank causes by (default: accuracy-like, else the first
            compiled metric, else the loss).
        shuffle, seed: how array data are drawn into batches (as ``fit`` draws them).

    Returns:
        :class:`evalgap.Report`. The model is left exactly as it was: no variable is
        assigned (every pass runs with the updates disabled), its layers' attributes are
        put back, its compiled metrics are not touched, also on error.
    """
    batch_size, max_samples = check_sizes(batch_size=batch_size, max_samples=max_samples)
    source = ADAPTER.batches(data, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=True)
    val = None if val_data is None else ADAPTER.batches(val_data, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=True)
    training = engine.Training.from_history(history)
    training.steps_per_epoch = steps_per_epoch or training.steps_per_epoch
    training.epochs = epochs or training.epochs
    training.bn_updates = bn_updates
    return engine.diagnose(ADAPTER, model, source, max_samples=max_samples, val_source=val, training=training, primary=primary, progress=progress)
