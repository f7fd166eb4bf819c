"""Outputs in a chosen mode, assigning no variable of the model.

E runs ``model(x, training=False)`` with the current variables (under a MirroredStrategy whose
replicas hold different copies of the moving statistics, each replica's share of a batch with its
own copy, as ``evaluate`` runs it); P the same with the given
statistics in place of the moving mean and variance of the given layers; T runs
``model(x, training=True)`` as ``fit`` does (BN on batch statistics except frozen layers and
layers called with ``training=False``, dropout on). One ``tf.function`` per model and mode
(inference or training), cached, so a GapMonitor does not trace again every epoch; each call
returns ``(y_pred, losses)``.

Every BN layer's statistics enter the traced function as arguments
(:func:`evalgap.tf_keras.layers.substituted`): P passes the given ones for its layers, so
substituting assigns nothing and new values need no new trace; under
MultiWorkerMirroredStrategy each worker reads its own copy. In every mode
:func:`evalgap.tf_keras.layers.stateless_patches` keep the model's variables unassigned (T
would otherwise update the moving statistics); in T the state of ``tf.random.Generator``
objects of random layers (``tf_keras.backend.experimental.enable_tf_random_generator()``)
is put back on exit.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow as tf

from ..engine import Batch, NormLayer
from .distributed import multi_worker_strategy
from .._keras_common import copies_differ, distributed_copies, mark_outputs, output_marks, per_replica, traced_alone, training_shares
from .layers import autograph_off, find_batchnorms, stat_attrs, stateless_patches, statistics, substituted, walk

_PREDICTORS: "weakref.WeakKeyDictionary[Any, _Predictor]" = weakref.WeakKeyDictionary()


class _Predictor:
    """The traced forward functions of one model, in inference and in training mode."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.bns = [bn for _, bn in find_batchnorms(model)]
        self._fns: dict[bool, Any] = {}

    def function(self, training: bool):
        if training not in self._fns:

            def fn(x, stats):
                model = self._model()
                with substituted(self.bns, stats):
                    y_pred = model(x, training=training)
                return y_pred, list(model.losses), output_marks(tf.nest.flatten(y_pred))  # see mark_outputs

            self._fns[training] = tf.function(autograph_off(traced_alone(fn, "T_step" if training else "E_step")), reduce_retracing=True)
        return self._fns[training]


def _predictor(model) -> _Predictor:
    if model not in _PREDICTORS:
        _PREDICTORS[model] = _Predictor(model)
    return _PREDICTORS[model]


def _values(model, bns: list, layers: Sequence[NormLayer], stats: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[list[Any]]:
    """Every layer's statistics tensors, the given (mean, var) in place of the moving ones of ``layers``."""
    values = statistics(bns, local=multi_worker_strategy(model) is not None)
    position = {id(bn): i for i, bn in enumerate(bns)}
    for layer, (mean, var) in zip(layers, stats):
        bn = layer.handle
        names, i = stat_attrs(bn), position[id(bn)]
        shape, dtype = bn.moving_mean.shape, bn.moving_mean.dtype
        values[i][names.index("moving_mean")] = tf.constant(np.asarray(mean).reshape(shape), dtype=dtype)
        values[i][names.index("moving_variance")] = tf.constant(np.asarray(var).reshape(shape), dtype=dtype)
    return values


def _replica_copies(model, bns: list) -> list[list[list[Any]]] | None:
    """Each local replica's own copies of every layer's statistics where the replicas' copies differ (after ``fit``
    under a MirroredStrategy each replica updates its own; ``evaluate`` normalizes each replica's share of a batch
    with its copy, where a read of the variable gives their mean); None otherwise."""
    if not copies_differ([(bn.name, bn) for bn in bns]):
        return None
    found = [[distributed_copies(bn.__dict__[name]) for name in stat_attrs(bn)] for bn in bns]
    count = max(len(c) for layer in found for c in layer if c is not None)
    current = statistics(bns, local=multi_worker_strategy(model) is not None)
    return [[[tf.identity(c[r]) if c is not None and len(c) == count else v for c, v in zip(layer, now)]
             for layer, now in zip(found, current)] for r in range(count)]


@contextlib.contextmanager
def rng_restored(model) -> Iterator[None]:
    """Put back the state of the random layers' ``tf.random.Generator`` objects."""
    saved = []
    for _, layer in walk(model):
        gen = getattr(getattr(layer, "_random_generator", None), "_generator", None)
        if gen is not None:
            saved.append((gen.state, gen.state.numpy()))
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


@contextlib.contextmanager
def predictor(model, mode: str, layers: Sequence[NormLayer] = (), stats: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> Iterator[Any]:
    """A context giving ``run(batch) -> (y_pred, losses)`` in mode E, P or T (module docstring)."""
    predict = _predictor(model)
    fn = predict.function(mode == "T")
    values = _values(model, predict.bns, list(layers) if mode == "P" else [], stats)
    copies = _replica_copies(model, predict.bns) if mode == "E" else None
    if mode == "T" and training_shares(model, predict.bns) > 1:  # each replica normalizes its own share, as fit does
        copies = [values] * training_shares(model, predict.bns)

    def run(batch: Batch):
        if copies is not None:
            y_pred, losses, marks = per_replica(fn, batch.inputs, batch.size, copies)
        else:
            y_pred, losses, marks = fn(batch.inputs, values)
        mark_outputs(tf.nest.flatten(y_pred), marks)
        return y_pred, losses

    with stateless_patches(model), rng_restored(model) if mode == "T" else contextlib.nullcontext():
        yield run
