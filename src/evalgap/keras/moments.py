"""One compiled pass that reads each BatchNormalization layer's batch moments.

During the pass every *target* layer normalizes with its batch statistics (its ``call``
gets ``training=True``) while the model itself runs with ``training=False``, so dropout
and other training-only layers are off. Each layer's own ``_moments`` (what it
normalizes with in training) is wrapped to
hand the per-channel ``(count, mean, biased variance)`` back as outputs of the pass
(``synchronized=True`` layers compute ``E[x^2] - E[x]^2`` in float32, so for them the pass
measures the variance again, two-pass; on the torch backend, where every layer computes it
that way, the layer's moments come from torch's own BatchNorm statistics kernel instead,
two-pass like the kernel of a PyTorch BatchNorm, see :func:`_torch_moments`).
*Observed* layers (frozen, not recalibrated) run as in training, in inference mode, and
only have their input's moments measured.

The model runs through ``stateless_call``: the moving statistics that BatchNormalization
would update in training mode go to throw-away state, so no variable of the model
changes, on any backend. The step is compiled with ``jax.jit`` or ``tf.function``;
on the torch backend it runs eagerly under ``torch.no_grad()``.
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
from keras import ops

from keras.src.backend import get_keras_mask, set_keras_mask

from .._keras_common import mark_outputs, output_marks, per_replica, traced_alone, training_shares
from ..engine.protocol import HostCaptures
from ..errors import ModelError
from ..stats import pool_rows

#: Compiled passes, per model and per choice of layers: a later recalibration of the same
#: model (PreciseBN after every epoch) reuses the compiled step instead of tracing again.
_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple, MomentsPass]]" = weakref.WeakKeyDictionary()


def moments_pass(model, layers: list, batch_statistics: list[bool]) -> "MomentsPass":
    """The (cached) :class:`MomentsPass` for this model and these BN layers.

    ``batch_statistics[i]``: layer i normalizes by batch statistics (else it runs as in
    training, in inference mode when frozen, and only its input's moments are measured).
    Capture indices are positions in ``layers``.
    """
    key = (keras.backend.backend(), tuple(id(layer) for layer in layers), tuple(batch_statistics))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = MomentsPass(model, layers, batch_statistics)
    return per_model[key]


class MomentsPass:
    """Context manager: patch the layers, run batches, unpatch. Get one with :func:`moments_pass`.

    Entering gives ``run(batch)``, which returns ``(captures, (y_pred, losses))``: a list of
    ``(layer_index, packed, k, None)``, one entry per layer call in forward order (a shared
    layer appears once per call), where ``packed`` (:class:`PackedMoments`) holds the whole
    batch's counts and moments as two arrays and ``k`` is the call's position in it; the
    model's output in this mode (BN on batch statistics, dropout off) and its losses
    (regularization, ``add_loss``). Two arrays per batch instead of three per BN call: on a
    GPU each is a device-to-host copy (:meth:`PackedMoments.to_host_captures`).

    Under a ``tf.distribute`` strategy whose replicas normalize their shares of a batch separately
    (:func:`evalgap._keras_common.training_shares` > 1: BatchNorm not synchronized), each batch runs
    as ``fit`` runs it in training mode: one call of the compiled step per replica's share
    (:func:`evalgap._keras_common.replica_shares`), BN on that share's own batch statistics. The
    outputs are joined in sample order and each model loss is the shares' mean weighted by their
    size (:func:`evalgap._keras_common.per_replica`); each BN call's moments are those of all the
    shares, pooled in float64 on the host (:meth:`PackedMoments.to_host_captures`), so a layer is
    still one call per batch.
    """

    def __init__(self, model, layers: list, batch_statistics: list[bool]):
        self._model = weakref.ref(model)
        self.layers = list(layers)
        self.targets = {id(layer) for layer, on_batch in zip(layers, batch_statistics) if on_batch}
        self.order: list[int] = []
        self.channels: list[int] = []
        self._captures: list[tuple[int, Any, Any, Any]] = []
        self._saved: list[tuple[Any, dict]] = []
        self._step = None
        self._state: tuple[list, list] | None = None  # the variables' values, read once per pass
        self._shares = 1  # the replicas' shares each batch runs as (training_shares), set on entering

    # ---- patching -----------------------------------------------------------------
    def __enter__(self):
        self._shares = replica_shares_of(self._model())
        try:
            for index, layer in enumerate(self.layers):
                saved = {k: layer.__dict__[k] for k in ("call", "_moments") if k in layer.__dict__}
                self._saved.append((layer, saved))
                self._patch(index, layer)
        except BaseException:
            self.__exit__()
            raise
        return self.run

    def __exit__(self, *exc) -> None:
        self._state = None
        for layer, saved in self._saved:
            for key in ("call", "_moments"):
                layer.__dict__.pop(key, None)
            layer.__dict__.update(saved)
        self._saved.clear()

    def _patch(self, index: int, layer) -> None:
        orig_call, orig_moments, captures = layer.call, layer._moments, self._captures

        synchronized = getattr(layer, "synchronized", False)
        torch_backend = keras.backend.backend() == "torch"

        def moments(inputs, mask):
            if torch_backend and mask is None:
                # Keras's torch backend computes E[x^2] - E[x]^2 in float32, which loses digits when
                # |mean| >> std: the layer normalizes with torch's stable BatchNorm statistics, captured
                mean, var = _torch_moments(inputs, layer._reduction_axes)
                captures.append((index, _count(inputs, mask, layer.axis), mean, var))
                return mean, var
            mean, var = orig_moments(inputs, mask)
            if synchronized and mask is None:  # E[x^2] - E[x]^2 in float32 on TensorFlow: measure two-pass
                captures.append((index, _count(inputs, mask, layer.axis), mean, ops.var(inputs, axis=layer._reduction_axes)))
            else:
                captures.append((index, _count(inputs, mask, layer.axis), mean, var))
            return mean, var

        if id(layer) in self.targets:

            def call(inputs, training=None, mask=None):
                trainable = layer._trainable
                layer._trainable = True  # include_frozen: normalize by batch statistics for the pass
                try:
                    return orig_call(inputs, training=True, mask=mask)
                finally:
                    layer._trainable = trainable

        else:

            def call(inputs, training=None, mask=None):
                x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
                layer._moments(x, mask)
                return orig_call(inputs, training=training, mask=mask)

        layer._moments = moments
        layer.call = call

    # ---- running ------------------------------------------------------------------
    def _raw_step(self, trainable, non_trainable, x):
        self._captures.clear()
        model = self._model()
        if trainable is None:  # tf.function: read the variables inside the graph
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
        y_pred, _, losses = model.stateless_call(trainable, non_trainable, x, training=False, return_losses=True)
        caps = self._captures
        # order and channels are the same in every trace of this model (the layers, not the batch, set them);
        # counts depend on the batch's shape, so they are outputs (constants in a compiled step)
        self.order = [c[0] for c in caps]
        means, variances = [_flat(c[2]) for c in caps], [_flat(c[3]) for c in caps]
        self.channels = [int(m.shape[0]) for m in means]
        # for the losses of Td: the outputs' masks and (TensorFlow) logits (see mark_outputs)
        marks = output_marks(keras.tree.flatten(y_pred), logits=keras.backend.backend() == "tensorflow", get_mask=get_keras_mask)
        if not caps:
            return (None, None), y_pred, list(losses), marks
        dtype = keras.backend.result_type(*[m.dtype for m in means + variances])
        values = ops.concatenate([ops.cast(t, dtype) for t in means + variances])
        counts = [c[1] for c in caps]
        if keras.backend.backend() == "torch" and all(isinstance(n, int) for n in counts):
            counts = np.asarray(counts, dtype=np.int64)  # eager: known here, no device round trip
        else:
            counts = ops.stack([ops.cast(n, "int32") for n in counts])
        return (counts, values), y_pred, list(losses), marks

    def _compiled(self):
        if self._step is None:
            backend = keras.backend.backend()
            if backend == "jax":
                import jax

                self._step = jax.jit(self._raw_step)
            elif backend == "tensorflow":
                import tensorflow as tf

                self._step = tf.function(traced_alone(self._raw_step, "moments_step"), reduce_retracing=True)
            else:
                self._step = self._raw_step
        return self._step

    def run(self, batch) -> tuple[list[tuple[int, Any, Any, Any]], Any]:
        x = batch.inputs
        model = self._model()
        backend = keras.backend.backend()
        if backend == "tensorflow":
            trainable = non_trainable = None
        else:
            if self._state is None:  # nothing assigns a variable during the pass: list them once (Keras walks every layer)
                self._state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
            trainable, non_trainable = self._state
        if backend == "torch":
            import torch

            with torch.no_grad():
                (counts, values), y_pred, losses, marks = self._compiled()(trainable, non_trainable, x)
        elif self._shares > 1:  # as fit's replicas: each share normalized by its own batch statistics
            step, parts = self._compiled(), []

            def share_step(share, _):
                moments, share_pred, share_losses, share_marks = step(trainable, non_trainable, share)
                parts.append(moments)
                return share_pred, share_losses, share_marks

            y_pred, losses, marks = per_replica(share_step, x, batch.size, [None] * self._shares)
            for share_counts, share_values in parts:
                self._check_layout(share_counts, share_values)
            counts, values = parts[0]
            if values is not None and len(parts) > 1:
                counts, values = ops.stack([c for c, _ in parts]), ops.stack([v for _, v in parts])
        else:
            (counts, values), y_pred, losses, marks = self._compiled()(trainable, non_trainable, x)
        if backend != "torch":  # eager on torch: the outputs keep their marks
            mark_outputs(keras.tree.flatten(y_pred), marks, set_mask=set_keras_mask)
        if values is None:
            return [], (y_pred, losses)
        if len(values.shape) == 1:
            self._check_layout(counts, values)
        packed = PackedMoments(counts, values, tuple(self.channels))
        return [(index, packed, k, None) for k, index in enumerate(self.order)], (y_pred, losses)

    def _check_layout(self, counts, values) -> None:
        """Order and channels were recorded when the step was traced: a compiled step reused for this
        shape must have the same layout (it does unless the model's BN calls depend on the input shape)."""
        if values is None:
            return
        if int(values.shape[0]) != 2 * sum(self.channels) or int(counts.shape[0]) != len(self.order):
            raise ModelError(
                f"the model's BatchNormalization calls differ between input shapes (this batch: {int(counts.shape[0])} calls, "
                f"{int(values.shape[0]) // 2} channels; an earlier one: {len(self.order)} calls, {sum(self.channels)} channels): "
                "pass batches of one shape (drop_ragged=True and whole batches) to recalibrate this model."
            )


def replica_shares_of(model) -> int:
    """Into how many shares ``fit`` splits a batch in training mode (:func:`evalgap._keras_common.training_shares`)."""
    from .layers import find_batchnorms

    return training_shares(model, [bn for _, bn in find_batchnorms(model)])


class PackedMoments:
    """One batch's moments as the pass returns them: ``counts`` (one per BN call) and ``values``:
    every call's per-channel means in call order, then every call's biased variances. A batch run
    as the replicas' shares (:class:`MomentsPass`) holds one row of each per share, ``(shares, calls)``
    and ``(shares, 2 * channels)``, pooled per call on the host (:func:`_pooled_shares`)."""

    __slots__ = ("counts", "values", "channels")

    def __init__(self, counts: Any, values: Any, channels: tuple[int, ...]):
        self.counts, self.values, self.channels = counts, values, channels

    @staticmethod
    def to_host_captures(captures: list, to_host) -> HostCaptures:
        """A flush of ``(index, packed, k, None)`` captures as :class:`HostCaptures`, with one
        ``to_host`` of two arrays per batch. Whole batches in call order (what a pass flushes)
        are laid side by side without a per-call object; any other selection is cut call by call."""
        batches = list({id(c[1]): c[1] for c in captures}.values())
        host = to_host([v for p in batches for v in (p.counts, p.values)])
        fetched = {id(p): _pooled_shares(np.asarray(host[2 * i]), np.asarray(host[2 * i + 1]), p.channels) for i, p in enumerate(batches)}
        if _whole_batches(captures):
            split = [len(fetched[id(p)][1]) // 2 for p in batches]
            return HostCaptures(
                index=np.fromiter((c[0] for c in captures), dtype=np.int64, count=len(captures)),
                count=np.concatenate([fetched[id(p)][0] for p in batches]).astype(np.float64),
                channels=np.concatenate([np.asarray(p.channels, dtype=np.int64) for p in batches]),
                mean=np.concatenate([fetched[id(p)][1][:s] for p, s in zip(batches, split)]).astype(np.float64),
                var=np.concatenate([fetched[id(p)][1][s:] for p, s in zip(batches, split)]).astype(np.float64),
            )
        rows = []
        for index, p, k, _ in captures:
            counts, values = fetched[id(p)]
            start, size, half = sum(p.channels[:k]), p.channels[k], len(values) // 2
            rows.append((index, counts[k], values[start:start + size], values[half + start:half + start + size]))
        return HostCaptures.from_list(rows)


def _pooled_shares(counts: np.ndarray, values: np.ndarray, channels: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One batch's ``(counts, values)`` as flat arrays; a batch run as shares (rows) pooled per call in float64 by
    :func:`evalgap.stats.pool_rows` (the moments of all the shares' values); a call whose shares were all masked
    keeps zeros."""
    if counts.ndim < 2:
        return counts.reshape(-1), values.reshape(-1)
    n = np.repeat(counts.astype(np.float64), channels, axis=1)  # (shares, channels)
    half = values.shape[1] // 2
    total, mean, m2 = pool_rows(n, values[:, :half].astype(np.float64), values[:, half:].astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean, var = np.where(total > 0, mean, 0.0), np.where(total > 0, m2 / total, 0.0)
    return counts.astype(np.float64).sum(axis=0), np.concatenate([mean, var])


def _whole_batches(captures: list) -> bool:
    """Each batch's calls are all there, contiguous and in call order."""
    seen: set[int] = set()
    last, expect = None, 0
    for _, packed, k, _ in captures:
        if packed is not last:
            if (last is not None and expect != len(last.channels)) or id(packed) in seen:
                return False
            seen.add(id(packed))
            last, expect = packed, 0
        if k != expect:
            return False
        expect += 1
    return last is None or expect == len(last.channels)


def _torch_moments(inputs, reduction_axes):
    """Per-channel mean and biased variance of a torch tensor over ``reduction_axes``, in float32 or wider.

    ``torch.batch_norm_update_stats`` is the statistics half of PyTorch's BatchNorm kernel (mean,
    then the mean of squared deviations: no ``E[x^2] - E[x]^2`` cancellation); it reduces over
    every axis but 1, so the channel axis is moved there as a view. On CPU it is 5-10x faster than
    ``torch.var_mean`` over non-innermost axes (channels-last, Keras's layout). Reductions that
    leave more than one axis use ``torch.var_mean``.
    """
    import torch

    x = inputs if inputs.dtype in (torch.float32, torch.float64) else inputs.float()
    kept = [a for a in range(x.dim()) if a not in {r % x.dim() for r in reduction_axes}]
    if len(kept) == 1 and x.dim() >= 2:
        return torch.batch_norm_update_stats(x.movedim(kept[0], 1), None, None, 0.0)
    var, mean = torch.var_mean(x, dim=tuple(reduction_axes), correction=0)
    return mean, var


def _flat(t):
    return t if len(t.shape) == 1 else ops.reshape(t, (-1,))


def _count(inputs, mask, axis: int):
    """Values per channel in this call: all elements over the channel size, or the mask's sum.

    A Python int when the shape is static (eager torch, jit), else a scalar tensor.
    """
    if mask is not None:
        return ops.sum(ops.cast(mask, "int32"))
    shape = tuple(inputs.shape)
    if all(isinstance(d, int) for d in shape):
        n = 1
        for d in shape:
            n *= d
        return n // shape[axis]
    return ops.size(inputs) // shape[axis]
