"""One compiled pass that reads each Keras 2 BatchNormalization layer's batch moments, assigning nothing.

The model runs with ``training=False`` (dropout and other training-only layers off) inside a
``tf.function`` cached per model and per choice of layers. Each *target* layer's ``call`` is
replaced by one that calls the original with ``training=True`` (and ``trainable`` on for the
call, for ``include_frozen``), so it normalizes exactly as in ``fit``: fused kernel or not,
ghost batches of ``virtual_batch_size``, Batch Renormalization's r/d correction with the
current ``renorm_mean`` / ``renorm_stddev``. Per call the pass returns the layer input's
per-channel ``(count, mean, biased variance)``:

- non-fused layers: what the layer's own ``_moments`` computed (what it normalizes with);
  with virtual batches, the G ghost batches (equal sizes) merged into the whole batch's
  moments, ``mean = mean_g(mu_g)``, ``var = mean_g(var_g + (mu_g - mean)^2)``, since the
  population statistics are the moments of all values, whatever the ghost partition;
- fused layers: ``tf.nn.moments`` of the input (the fused kernel's variance is
  Bessel-corrected, ``n/(n-1)`` times the biased one, and with ``exponential_avg_factor``
  it returns the moving average instead): the biased variance, as for the dense path;
- *observed* layers (frozen, not recalibrated): ``tf.nn.moments`` of their input; they run
  as in training, in inference mode.

Side effects: none. :func:`evalgap.tf_keras.layers.stateless_patches` make ``add_update``
(the moving-statistic updates), ``add_metric`` and BatchNormalization's direct assignments
(Batch Renormalization) do nothing, so no variable of the model is assigned; the traced
graph holds no assignment to them. Every patch is removed on exit, normal or not. The
BN layers' statistics enter the step as arguments read once per pass
(:func:`evalgap.tf_keras.layers.substituted`): under MultiWorkerMirroredStrategy each worker
reads its own copy, so workers with different numbers of batches never wait on each other.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import tensorflow as tf

from .distributed import multi_worker_strategy
from .._keras_common import mark_outputs, output_marks, per_replica, traced_alone, training_shares
from ..stats import pool_rows
from .layers import Patches, autograph_off, channel_axes, find_batchnorms, is_fused, stateless_patches, statistics, substituted

#: Compiled passes, per model and per choice of layers: a later recalibration of the same
#: model (PreciseBN after every epoch) reuses the traced step.
_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple, MomentsPass]]" = weakref.WeakKeyDictionary()


def moments_pass(model, layers: list, batch_statistics: list[bool]) -> "MomentsPass":
    """The (cached) :class:`MomentsPass` for this model and these BN layers (capture indices: positions in ``layers``)."""
    key = (tuple(id(layer) for layer in layers), tuple(batch_statistics))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = MomentsPass(model, layers, batch_statistics)
    return per_model[key]


def _count(inputs, mask, channels: int):
    """Values per channel in this call: all elements over the channels, or the mask's share."""
    if mask is not None:
        per_mask = tf.cast(tf.size(inputs), tf.float32) / tf.cast(tf.size(mask) * channels, tf.float32)
        return tf.cast(tf.round(tf.reduce_sum(tf.cast(mask, tf.float32)) * per_mask), tf.int64)
    shape = inputs.shape
    if shape.is_fully_defined():
        return int(shape.num_elements()) // channels
    return tf.size(inputs, out_type=tf.int64) // channels


def _input_moments(bn, inputs, mask):
    """``(count, mean, biased var)`` of a layer's input over every axis but its channel axes."""
    x = tf.cast(inputs, bn._param_dtype)
    rank = len(x.shape)
    axes = [i for i in range(rank) if i not in channel_axes(bn, rank)]
    channels = int(bn.moving_mean.shape.num_elements())
    if mask is None:
        mean, var = tf.nn.moments(x, axes)
    else:
        weights = tf.expand_dims(tf.cast(mask, x.dtype), -1)
        mean, var = tf.nn.weighted_moments(x, axes, frequency_weights=weights)
    return _count(inputs, mask, channels), tf.reshape(mean, [-1]), tf.reshape(var, [-1])


def _merged(bn, mean, var):
    """The layer's own moments, flattened; ghost batches (axis 1) merged into the whole batch's."""
    if getattr(bn, "virtual_batch_size", None) is not None:
        whole = tf.reduce_mean(mean, axis=1, keepdims=True)
        var = tf.reduce_mean(var + tf.square(mean - whole), axis=1, keepdims=True)
        mean = whole
    return tf.reshape(mean, [-1]), tf.reshape(var, [-1])


class MomentsPass:
    """Context manager: patch the layers, run batches, unpatch. Get one with :func:`moments_pass`.

    Entering gives ``run(batch)``, which returns ``(captures, (y_pred, losses))``: a list of
    ``(layer_index, count, mean, var)``, one entry per layer call in forward order (a shared
    layer appears once per call), the model's output in this mode and its losses
    (regularization, ``add_loss``). The step packs a batch's captures into one float64
    vector (float32 moments and counts are exact in it); the values are :class:`Packed`
    slices of it, which :func:`to_host` copies to the host once per batch.
    """

    def __init__(self, model, layers: list, batch_statistics: list[bool]):
        self._model = weakref.ref(model)
        self.layers = list(layers)
        self.targets = {id(layer) for layer, on_batch in zip(layers, batch_statistics) if on_batch}
        self.layout: list[tuple[int, int]] = []  # per BN call in forward order: (layer index, channels)
        self._captures: list[tuple[int, Any, Any, Any]] = []
        self._patches: Patches | None = None
        self._step = None
        self._all = [bn for _, bn in find_batchnorms(model)]
        self._stats: list = []
        self._shares = 1

    def __enter__(self):
        model = self._model()
        self._stats = statistics(self._all, local=multi_worker_strategy(model) is not None)
        self._shares = training_shares(model, self._all)
        patches = stateless_patches(model)
        for index, layer in enumerate(self.layers):
            self._patch(patches, index, layer)
        self._patches = patches.__enter__()
        return self.run

    def __exit__(self, *exc) -> None:
        if self._patches is not None:
            self._patches.__exit__()
            self._patches = None
        self._stats = []

    def _patch(self, patches: Patches, index: int, bn) -> None:
        orig_call, captures = bn.call, self._captures
        target, fused = id(bn) in self.targets, is_fused(bn)

        if target and not fused:
            orig_moments = bn._moments

            def moments(inputs, reduction_axes, keep_dims, mask=None):
                mean, var = orig_moments(inputs, reduction_axes, keep_dims=keep_dims, mask=mask)
                count = _count(inputs, mask, int(bn.moving_mean.shape.num_elements()))
                captures.append((index, count, *_merged(bn, mean, var)))
                return mean, var

            patches.add(bn, "_moments", autograph_off(moments))

        def call(inputs, training=None, mask=None):
            if not target or fused:
                captures.append((index, *_input_moments(bn, inputs, mask)))
            if not target:
                return orig_call(inputs, training=training, mask=mask)
            trainable = bn._trainable
            bn._trainable = True  # include_frozen: batch statistics for the pass (Keras 2 turns training off otherwise)
            try:
                return orig_call(inputs, training=True, mask=mask)
            finally:
                bn._trainable = trainable

        patches.add(bn, "call", autograph_off(call))

    def _raw_step(self, x, stats):
        self._captures.clear()
        model = self._model()
        with substituted(self._all, stats):
            y_pred = model(x, training=False)
        losses = list(model.losses)
        self.layout = [(c[0], int(c[2].shape[0])) for c in self._captures]
        pieces = [tf.cast(tf.reshape(v, [-1]), tf.float64) for c in self._captures for v in c[1:]]
        packed = tf.concat(pieces, 0) if pieces else tf.zeros([0], tf.float64)
        return packed, y_pred, losses, output_marks(tf.nest.flatten(y_pred))  # for the losses of Td (see mark_outputs)

    def run(self, batch) -> tuple[list[tuple[int, Any, Any, Any]], Any]:
        """One batch: its captures (slices of one packed float64 vector, moved to the host in one copy) and outputs.
        Under a strategy whose replicas each normalize their share of a batch (:func:`training_shares`), each share
        runs as one call, as ``fit`` runs it, and every share's captures come back (pooled as repeated calls)."""
        if self._step is None:
            self._step = tf.function(autograph_off(traced_alone(self._raw_step, "moments_step")), reduce_retracing=True)
        packs: list = []

        def step(x, stats):
            packed, *out = self._step(x, stats)
            packs.append(packed)
            return tuple(out)

        if self._shares == 1:
            y_pred, losses, marks = step(batch.inputs, self._stats)
        else:
            y_pred, losses, marks = per_replica(step, batch.inputs, batch.size, [self._stats] * self._shares)
        mark_outputs(tf.nest.flatten(y_pred), marks)
        packed = packs[0] if len(packs) == 1 else SharePacks(packs, self.layout)
        captures, offset = [], 0
        for index, channels in self.layout:
            count, mean, var = (Packed(packed, a, b) for a, b in ((offset, offset + 1), (offset + 1, offset + 1 + channels),
                                                                 (offset + 1 + channels, offset + 1 + 2 * channels)))
            captures.append((index, count, mean, var))
            offset += 1 + 2 * channels
        return captures, (y_pred, losses)


class SharePacks:
    """A batch run as the replicas' shares: each share's packed vector (same layout), pooled per call on the host
    into one vector of that layout (:func:`evalgap.stats.pool_rows`: the moments of all the shares' values), so the
    engine sees one call per layer, as the replicas' training step makes it."""

    def __init__(self, packs: list, layout: list[tuple[int, int]]):
        self.packs, self.layout = packs, list(layout)

    def numpy(self) -> np.ndarray:
        rows = np.stack([np.asarray(p.numpy(), dtype=np.float64) for p in self.packs])
        out, offset = rows[0].copy(), 0
        for _, channels in self.layout:
            n = rows[:, offset]
            means, variances = rows[:, offset + 1 : offset + 1 + channels], rows[:, offset + 1 + channels : offset + 1 + 2 * channels]
            total, mean, m2 = pool_rows(np.repeat(n[:, None], channels, axis=1), means, variances)
            with np.errstate(invalid="ignore", divide="ignore"):  # a call whose shares were all masked: no values
                out[offset], out[offset + 1 : offset + 1 + channels] = n.sum(), np.where(total > 0, mean, 0.0)
                out[offset + 1 + channels : offset + 1 + 2 * channels] = np.where(total > 0, m2 / total, 0.0)
            offset += 1 + 2 * channels
        return out


class Packed:
    """A capture value: ``packed[start:stop]`` of one batch's packed vector (see :func:`to_host`)."""

    __slots__ = ("packed", "start", "stop")

    def __init__(self, packed, start: int, stop: int):
        self.packed, self.start, self.stop = packed, start, stop


def to_host(values) -> list[np.ndarray]:
    """Device values as NumPy: each batch's packed vector copied once, then sliced; other tensors one by one."""
    host: dict[int, np.ndarray] = {}
    out = []
    for v in values:
        if isinstance(v, Packed):
            if id(v.packed) not in host:
                host[id(v.packed)] = v.packed.numpy()
            out.append(host[id(v.packed)][v.start : v.stop])
        else:
            out.append(np.asarray(v.numpy() if hasattr(v, "numpy") else v))
    return out
