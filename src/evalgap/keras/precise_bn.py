"""Exact population statistics for Keras 3 BatchNormalization layers, in one pass.

:func:`recalibrate` runs the model once over the data, each BatchNormalization layer
normalizing by its batch statistics as in training and every other layer in inference
mode (dropout off), and sets ``moving_mean`` / ``moving_variance`` to the exact population
statistics of each layer's inputs (Keras stores the biased variance):

    mean = sum_b n_b mu_b / N,     var = sum_b n_b (var_b + (mu_b - mean)^2) / N

merged in float64 on the host from per-channel moments reduced on the device.
Works on the TensorFlow, JAX and PyTorch backends (see :mod:`evalgap.keras._pass`).

Side effects: the recalibrated layers' ``moving_mean`` and ``moving_variance``; nothing
else (weights, optimizer state, other non-trainable variables, ``momentum``,
``trainable``). If anything fails or is interrupted, the model is as it was.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import keras
import numpy as np
from keras import ops

from .._checks import check_count, check_finite
from .._progress import progress_bar
from ..errors import DataError, EvalgapError, ModelError, RecalibrationError
from ..recalibration import LayerRecalibration, Recalibration
from ..stats import ChannelMoments
from ._data import batches, first_batch, leading_dim
from ._layers import find_batchnorms, is_frozen
from ._pass import moments_pass
from ._workers import combine_workers, multi_worker_strategy

logger = logging.getLogger("evalgap.keras")

#: Per-batch moments stay on the device for this many batches, then move to the host.
FLUSH_EVERY = 32


class _Accumulator:
    """Per-layer float64 moments, fed from backend tensors in bulk."""

    def __init__(self, n_layers: int, names: list[str] | None = None):
        self.names = names or [f"layer {i}" for i in range(n_layers)]
        self.moments: list[ChannelMoments | None] = [None] * n_layers
        self.calls = [0] * n_layers
        self.samples = [0] * n_layers
        self.max_calls_per_batch = [0] * n_layers
        self.first_seen: dict[int, int] = {}
        self.pending: list[tuple[int, Any, Any, Any]] = []

    def add_batch(self, captured: list, batch_size: int) -> None:
        per_batch: dict[int, int] = {}
        for index, *_ in captured:
            per_batch[index] = per_batch.get(index, 0) + 1
            self.first_seen.setdefault(index, len(self.first_seen))
            self.calls[index] += 1
            self.samples[index] += batch_size
        for index, n in per_batch.items():
            self.max_calls_per_batch[index] = max(self.max_calls_per_batch[index], n)
        self.pending.extend(captured)

    def flush(self) -> None:
        for index, count, mean, var in self.pending:
            count = int(ops.convert_to_numpy(count))
            check_count(count, self.names[index])
            part = ChannelMoments.from_moments(
                count,
                ops.convert_to_numpy(mean).astype(np.float64),
                ops.convert_to_numpy(var).astype(np.float64),
            )
            self.moments[index] = part if self.moments[index] is None else self.moments[index].merge(part)
        self.pending.clear()


def _numpy(variable) -> np.ndarray:
    return np.array(variable.numpy(), dtype=np.float64)


class _Measured:
    """The result of a statistics pass, before anything is written."""

    def __init__(self, result, layers, targets, acc):
        self.result, self.layers, self.targets, self.acc = result, layers, targets, acc

    def population(self, include_frozen: bool = False) -> dict[int, ChannelMoments]:
        """id(layer) -> population moments, for the target layers (and the frozen ones if asked)."""
        target_ids = {id(bn) for _, bn in self.targets}
        return {
            id(bn): self.acc.moments[i]
            for i, (_, bn) in enumerate(self.layers)
            if self.acc.moments[i] is not None and (include_frozen or id(bn) in target_ids)
        }


def measure(
    model,
    data: Any,
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
    include_frozen: bool = False,
    progress: bool = True,
    drop_ragged: bool = True,
    on_output: Callable[[Any, Any], None] | None = None,
    description: str = "recalibrating BatchNorm",
) -> _Measured:
    """The statistics pass of :func:`recalibrate`, writing nothing.

    With ``on_output``, batches are read with their targets and ``on_output(batch, y_pred)``
    receives each used batch ``(x, y, sample_weight)`` and the model's output in this mode
    (BN on batch statistics, dropout off).
    """
    if not isinstance(model, keras.Model) and not isinstance(model, keras.layers.Layer):
        raise ModelError(f"expected a Keras model, got {type(model).__name__}.")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches must be >= 1 (or None for all batches), got {max_batches}.")
    start = time.perf_counter()
    with_targets = on_output is not None
    stream, size, how = batches(data, batch_size, targets=with_targets)
    first = first_batch(stream)
    if first is None:
        raise DataError("the data yielded no batch: give at least one batch of the training batch size.")
    first_x = first[0] if with_targets else first
    if not model.built:
        model(first_x, training=False)  # builds the variables; inference mode changes no statistic
    found = find_batchnorms(model)
    if not found:
        raise ModelError(
            f"{model.name} has no BatchNormalization layer: there are no moving statistics to recalibrate. "
            "LayerNormalization and GroupNormalization normalize each sample the same way in both modes."
        )
    frozen = [(name, bn) for name, bn in found if is_frozen(bn) and not include_frozen]
    targets = [(name, bn) for name, bn in found if not (is_frozen(bn) and not include_frozen)]
    layers = targets + frozen
    result = Recalibration(framework=f"keras/{keras.backend.backend()}")
    result.batch_size = size if size is not None else leading_dim(first_x)
    if size is None or how != "given":
        result.notes.append(f"batch size {result.batch_size} ({how}).")

    acc = _Accumulator(len(layers), [name for name, _ in layers])
    batch_index = -1
    try:
        with moments_pass(model, [bn for _, bn in targets], [bn for _, bn in frozen]) as stats_pass:
            with progress_bar(description, max_batches, progress) as advance:

                def all_batches():
                    yield first
                    yield from stream

                for batch in all_batches():
                    if max_batches is not None and result.batches >= max_batches:
                        break
                    batch_index += 1
                    x = batch[0] if with_targets else batch
                    n = leading_dim(x)
                    if drop_ragged and n is not None and result.batch_size and n < result.batch_size:
                        result.skipped_batches += 1
                        result.skipped_samples += n
                        continue
                    captures, y_pred = stats_pass.run(x)
                    acc.add_batch(captures, n or 0)
                    if on_output is not None:
                        on_output(batch, y_pred)
                    result.batches += 1
                    result.samples += n or 0
                    if result.batches % FLUSH_EVERY == 0:
                        acc.flush()
                    advance(1)
                acc.flush()
        strategy = multi_worker_strategy(model)
        if strategy is not None:  # each worker passed its own data: merge them exactly
            channels = [int(bn.moving_mean.shape[0]) for _, bn in layers]
            counters = np.array([result.batches, result.samples, result.skipped_batches, result.skipped_samples] + acc.samples, dtype=np.float64)
            acc.moments, totals = combine_workers(strategy, acc.moments, channels, counters)
            result.batches, result.samples, result.skipped_batches, result.skipped_samples = (int(round(v)) for v in totals[:4])
            acc.samples = [int(round(v)) for v in totals[4:]]
            result.notes.append(f"statistics combined exactly over {strategy.num_replicas_in_sync} replicas on several workers.")
        order = sorted(range(len(layers)), key=lambda i: acc.first_seen.get(i, len(layers) + i))
        check_finite([(layers[i][0], acc.moments[i]) for i in order])
    except BaseException as exc:  # nothing was written: the pass is stateless
        if isinstance(exc, EvalgapError) or not isinstance(exc, Exception):
            raise
        where = f"batch {batch_index}" if batch_index >= 0 else "setting up the pass"
        raise RecalibrationError(
            f"the statistics pass failed at {where} ({type(exc).__name__}: {exc}); the model is unchanged."
        ) from exc
    if result.batches == 0:
        raise DataError(
            f"no full batch to use (left out {result.skipped_samples} samples of ragged batches): "
            "give at least one batch of the training batch size."
        )
    result.seconds = time.perf_counter() - start
    return _Measured(result, layers, targets, acc)


def recalibrate(
    model,
    data: Any,
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
    include_frozen: bool = False,
    progress: bool = True,
    drop_ragged: bool = True,
) -> Recalibration:
    """Set every BatchNormalization layer's moving statistics to the exact population statistics.

    Args:
        model: a built or buildable Keras 3 model (functional, Sequential, subclassed;
            nested models included).
        data: ``x`` or ``(x, y[, sample_weight])`` NumPy arrays (batched with
            ``batch_size``; default 32, Keras's default, and the result says so), a
            ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a generator, a torch
            ``DataLoader`` (torch backend) or any iterable of batches. Use the training
            batch size: batch statistics depend on it.
        batch_size: batch size for array data.
        max_batches: stop after this many batches.
        include_frozen: also recalibrate ``trainable=False`` layers (Keras runs them in
            inference mode even in fit, so by default they are left alone and listed).
        progress: show a progress bar.
        drop_ragged: leave out batches smaller than the first (counted in the result).

    Returns:
        :class:`evalgap.Recalibration`, per layer: statistics before and after, drift.

    Side effects: ``moving_mean`` / ``moving_variance`` of the recalibrated layers only.
    """
    measured = measure(
        model, data, batch_size=batch_size, max_batches=max_batches, include_frozen=include_frozen,
        progress=progress, drop_ragged=drop_ragged,
    )
    apply(measured)
    return measured.result


def apply(measured: _Measured, write: bool = True) -> Recalibration:
    """Fill ``measured.result`` per layer; with ``write``, assign the population statistics
    to the target layers (all or nothing)."""
    result, layers, targets, acc = measured.result, measured.layers, measured.targets, measured.acc
    start = time.perf_counter() - result.seconds
    before = {id(bn): (_numpy(bn.moving_mean), _numpy(bn.moving_variance)) for _, bn in layers}
    target_ids = {id(bn) for _, bn in targets}
    try:
        for index, (_, bn) in enumerate(layers if write else []):
            m = acc.moments[index]
            if m is not None and id(bn) in target_ids:
                bn.moving_mean.assign(m.mean.astype(bn.moving_mean.dtype))
                bn.moving_variance.assign(m.var.astype(bn.moving_variance.dtype))
    except BaseException:
        for _, bn in layers:
            mean, var = before[id(bn)]
            bn.moving_mean.assign(mean.astype(bn.moving_mean.dtype))
            bn.moving_variance.assign(var.astype(bn.moving_variance.dtype))
        raise

    entries = []
    for index, (name, bn) in enumerate(layers):
        m = acc.moments[index]
        status = "unreached" if m is None else (("recalibrated" if write else "measured") if id(bn) in target_ids else "frozen")
        mean_before, var_before = before[id(bn)]
        entries.append(
            (
                acc.first_seen.get(index, len(layers) + index),
                LayerRecalibration(
                    name=name,
                    kind=type(bn).__name__ + (" (synchronized)" if getattr(bn, "synchronized", False) else ""),
                    status=status,
                    channels=int(mean_before.shape[0]),
                    eps=float(bn.epsilon),
                    count=0 if m is None else m.count,
                    samples=acc.samples[index],
                    calls=acc.calls[index],
                    calls_per_batch=acc.max_calls_per_batch[index],
                    mean_before=mean_before,
                    var_before=var_before,
                    mean_after=None if m is None else m.mean,
                    var_after=None if m is None else m.var,
                ),
            )
        )
    result.layers = [entry for _, entry in sorted(entries, key=lambda e: e[0])]
    result.seconds = time.perf_counter() - start
    result.add_layer_notes("trainable=False: inference mode even in fit")
    logger.info(result.summary())
    return result
