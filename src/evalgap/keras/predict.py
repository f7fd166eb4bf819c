"""Outputs in a chosen mode, through ``stateless_call``: no variable of the model changes.

E runs in inference mode with the current variables (under a ``tf.distribute`` strategy whose replicas
hold different copies of the moving statistics, each replica's share of a batch with its own copy,
as ``evaluate`` runs it); P in inference mode with the given
statistics substituted for the moving statistics of the given layers; T in training mode
(BN on batch statistics except frozen layers, which Keras runs in inference mode; dropout
on; the updated state is thrown away; under a strategy whose replicas normalize their shares
separately, each replica's share of a batch on its own batch statistics, as ``fit`` runs it). The step is compiled once per model (``jax.jit`` /
``tf.function``; eager under ``torch.no_grad()`` on the torch backend) and cached, so a
GapMonitor does not trace again every epoch. Each call returns ``(y_pred, losses)``.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Sequence

import keras
import numpy as np

from keras.src.backend import get_keras_mask, set_keras_mask

from .._keras_common import copies_differ, distributed_copies, mark_outputs, output_marks, per_replica, replicas, traced_alone
from .._random import random_states_kept
from ..engine import Batch, NormLayer
from .layers import find_batchnorms
from .moments import replica_shares_of

_PREDICTORS: "weakref.WeakKeyDictionary[Any, _Predictor]" = weakref.WeakKeyDictionary()


def _predictor(model) -> "_Predictor":
    if model not in _PREDICTORS:
        _PREDICTORS[model] = _Predictor(model)
    return _PREDICTORS[model]


class _Predictor:
    def __init__(self, model):
        self._model = weakref.ref(model)
        backend = keras.backend.backend()

        def fn(tv, ntv, x, training):
            y_pred, new_ntv, losses = self._model().stateless_call(tv, ntv, x, training=training, return_losses=True)
            # the outputs' masks, and on TensorFlow the logits behind softmax/sigmoid, for the losses (see mark_outputs)
            marks = output_marks(keras.tree.flatten(y_pred), logits=backend == "tensorflow", get_mask=get_keras_mask)
            return y_pred, list(losses), new_ntv, marks

        self._plain = fn
        self._fns: dict[tuple[bool, bool], Any] = {}
        if backend == "jax":
            import jax

            self._jitted = jax.jit(fn, static_argnames=("training",))

    def _compiled(self, training: bool, substituted: bool):
        """The compiled step for one mode. TensorFlow: one ``tf.function`` per mode, each over its own code
        (:func:`evalgap._keras_common.traced_alone`), so each traces two or three times (a ragged last batch; in T the
        state a call returns) and TensorFlow's warning about functions re-traced in a loop stays quiet."""
        backend = keras.backend.backend()
        if backend == "jax":
            return self._jitted
        if backend != "tensorflow":
            return self._plain
        key = (training, substituted)
        if key not in self._fns:
            import tensorflow as tf

            self._fns[key] = tf.function(traced_alone(self._plain, f"{_MODES[key]}_step"), reduce_retracing=True)
        return self._fns[key]

    def __call__(self, x, trainable, non_trainable, training: bool, substituted: bool = False, copies=None, size=None,
                 shares: int = 1):
        """``(y_pred, losses, new_non_trainable)``; with ``copies`` (each replica's non-trainable values, TensorFlow
        under a MirroredStrategy), each replica's share of the ``size`` samples runs with its own copy; with
        ``shares`` > 1 (TensorFlow), each of that many shares runs as a call of its own (BN in training mode on the
        share's batch statistics), the state each call returns feeding the next."""
        tv = trainable
        fn = self._compiled(training, substituted)
        backend = keras.backend.backend()
        if backend == "torch":
            import torch

            with torch.no_grad():  # eager: the outputs keep their marks
                return fn(tv, non_trainable, x, training)[:3]
        if copies is not None:
            y_pred, losses, marks = per_replica(lambda share, values: _without_state(fn(tv, values, share, training)), x, size, copies)
            new_ntv = non_trainable
        elif shares > 1:
            state = [non_trainable]

            def share_step(share, _):
                share_pred, share_losses, state[0], share_marks = fn(tv, state[0], share, training)
                return share_pred, share_losses, share_marks

            y_pred, losses, marks = per_replica(share_step, x, size, [None] * shares)
            new_ntv = state[0]
        else:
            y_pred, losses, new_ntv, marks = fn(tv, non_trainable, x, training)
        mark_outputs(keras.tree.flatten(y_pred), marks, set_mask=set_keras_mask)
        return y_pred, losses, new_ntv


def _without_state(step_output: tuple) -> tuple:
    y_pred, losses, _, marks = step_output
    return y_pred, losses, marks


def _replica_copies(model) -> list[list] | None:
    """Each replica's values of the non-trainable variables where, under a ``tf.distribute`` strategy, the replicas
    hold different copies of some BatchNorm layer's moving statistics (``evaluate`` runs each replica's share of a
    batch with its own copy); None otherwise."""
    if replicas(model) < 2 or not copies_differ(find_batchnorms(model)):
        return None
    variables = list(model.non_trainable_variables)
    found = [distributed_copies(v) for v in variables]
    count = max(len(c) for c in found if c is not None)
    return [[c[r] if c is not None and len(c) == count else v.value for v, c in zip(variables, found)] for r in range(count)]



#: The mode of each (training, substituted).
_MODES = {(False, False): "E", (False, True): "P", (True, False): "T", (True, True): "T"}


def _substituted(model, layers: Sequence[NormLayer], stats: Sequence[tuple[np.ndarray, np.ndarray]]) -> list:
    nt_vars = list(model.non_trainable_variables)
    values = [v.value for v in nt_vars]
    position = {id(v): i for i, v in enumerate(nt_vars)}
    for layer, (mean, var) in zip(layers, stats):
        bn = layer.handle
        values[position[id(bn.moving_mean)]] = keras.ops.convert_to_tensor(mean.astype("float32"), dtype=bn.moving_mean.dtype)
        values[position[id(bn.moving_variance)]] = keras.ops.convert_to_tensor(var.astype("float32"), dtype=bn.moving_variance.dtype)
    return values


@contextlib.contextmanager
def predictor(model, mode: str, layers: Sequence[NormLayer] = (), stats: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> Iterator[Any]:
    """``run(batch) -> (y_pred, losses)`` in mode E, P or T; the model's variables are never assigned.

    In T the non-trainable state a call returns (the dropout seed generators' state, and moving
    statistics nobody reads in training mode) feeds the next batch's call, so every batch draws
    its own dropout masks, as in fit; on the torch backend torch's global RNG is put back after.
    """
    predict = _predictor(model)
    trainable = [v.value for v in model.trainable_variables]  # listed once per pass (Keras walks every layer); never assigned
    values = _substituted(model, layers, stats) if mode == "P" else [v.value for v in model.non_trainable_variables]
    training = mode == "T"
    state = {"values": values}
    copies = _replica_copies(model) if mode == "E" else None
    # T as fit runs it under a strategy: each replica's share of a batch on its own batch statistics
    shares = replica_shares_of(model) if training else 1

    def run(batch: Batch):
        y_pred, losses, new_values = predict(batch.inputs, trainable, state["values"], training, substituted=mode == "P",
                                             copies=copies, size=batch.size, shares=shares)
        if training:
            state["values"] = list(new_values)
        return y_pred, losses

    # training mode on the torch backend draws from torch's global generators: put them back
    with random_states_kept(python=False, numpy=False) if training else contextlib.nullcontext():
        yield run
