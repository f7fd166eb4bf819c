"""Keras BatchNormalization layers (nested models included, by path name) and what else the model holds."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import keras

from .._keras_common import calls_replaced, inference_only, walk
from .._keras_common import facts as _facts
from .._random import random_states_kept
from ..engine import ModelFacts, NormLayer, tree_map

#: Per model: (number of BN layers, ids of those a training-mode call runs in inference mode).
_INFERENCE_ONLY: "weakref.WeakKeyDictionary[Any, tuple[int, frozenset[int]]]" = weakref.WeakKeyDictionary()


def find_batchnorms(model) -> list[tuple[str, keras.layers.BatchNormalization]]:
    """Every ``keras.layers.BatchNormalization`` (and subclass) in the model, by path name."""
    return [(name, layer) for name, layer in walk(model) if isinstance(layer, keras.layers.BatchNormalization)]


def is_frozen(bn) -> bool:
    """Keras 3 runs a ``trainable=False`` BatchNormalization in inference mode, even in fit."""
    return not bn.trainable


def remember_inference_only(model, inputs: Any) -> frozenset[int]:
    """Ids of the BN layers that receive ``training=False`` in every call of a training-mode forward (a subclass
    whose ``call`` runs ``self.base(x, training=False)``): fit runs them in inference mode, as frozen layers
    (:func:`evalgap._keras_common.inference_only`). The forward: one call of the first two samples through
    ``stateless_call(..., training=True)`` (no variable is assigned; torch's global random state put back)."""

    def trace(replacements) -> None:
        grad = contextlib.nullcontext()
        if keras.backend.backend() == "torch":
            import torch

            grad = torch.no_grad()
        try:
            with calls_replaced(replacements), random_states_kept(python=False, numpy=False), grad:
                model.stateless_call([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                                     tree_map(lambda a: a[:2], inputs), training=True)
        except Exception:  # a model that cannot be called so (a fixed batch size): trainable=False stays the only rule
            pass

    return inference_only(model, [bn for _, bn in find_batchnorms(model)], _INFERENCE_ONLY, trace)


def norm_layers(model) -> list[NormLayer]:
    inference_only = _INFERENCE_ONLY.get(model, (0, frozenset()))[1]
    return [
        NormLayer(
            name=name, handle=bn, kind=type(bn).__name__ + (" (synchronized)" if getattr(bn, "synchronized", False) else ""),
            channels=int(bn.moving_mean.shape[0]), eps=float(bn.epsilon), momentum=float(bn.momentum),
            frozen=is_frozen(bn) or id(bn) in inference_only, dtype=str(bn.moving_variance.dtype),
        )
        for name, bn in find_batchnorms(model)
    ]


def facts(model, first_inputs=None) -> ModelFacts:
    return _facts(model, find_batchnorms(model), first_inputs, keras.ops.convert_to_numpy)
