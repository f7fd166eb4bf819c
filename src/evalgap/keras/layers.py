"""Keras BatchNormalization layers (nested models included, by path name) and what else the model holds."""

from __future__ import annotations

import keras

from .._keras_common import facts as _facts
from .._keras_common import walk
from ..engine import ModelFacts, NormLayer


def find_batchnorms(model) -> list[tuple[str, keras.layers.BatchNormalization]]:
    """Every ``keras.layers.BatchNormalization`` (and subclass) in the model, by path name."""
    return [(name, layer) for name, layer in walk(model) if isinstance(layer, keras.layers.BatchNormalization)]


def is_frozen(bn) -> bool:
    """Keras 3 runs a ``trainable=False`` BatchNormalization in inference mode, even in fit."""
    return not bn.trainable


def norm_layers(model) -> list[NormLayer]:
    return [
        NormLayer(
            name=name, handle=bn, kind=type(bn).__name__ + (" (synchronized)" if getattr(bn, "synchronized", False) else ""),
            channels=int(bn.moving_mean.shape[0]), eps=float(bn.epsilon), momentum=float(bn.momentum), frozen=is_frozen(bn),
        )
        for name, bn in find_batchnorms(model)
    ]


def facts(model, first_inputs=None) -> ModelFacts:
    return _facts(model, find_batchnorms(model), first_inputs, keras.ops.convert_to_numpy)
