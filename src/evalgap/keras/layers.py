"""Keras BatchNormalization layers (nested models included, by path name) and what else the model holds."""

from __future__ import annotations

from typing import Iterator

import keras

from ..engine import ModelFacts, NormLayer

#: Layer class names that make training mode differ from evaluation mode besides BatchNorm.
TRAINING_ONLY_TOKENS = ("Dropout", "Noise", "Random")
NON_BN_NORMALIZATION = ("LayerNormalization", "GroupNormalization", "UnitNormalization", "RMSNormalization")


def _children(layer) -> list:
    return list(layer._flatten_layers(include_self=False, recursive=False))


def walk(model, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every sub-layer with a path name (``outer/inner/layer``), depth first, each once."""
    seen: set[int] = set()

    def visit(layer, path):
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{path}/{child.name}" if path else child.name
            yield name, child
            yield from visit(child, name)

    yield from visit(model, prefix)


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


def replicas(model) -> int:
    strategy = getattr(model, "distribute_strategy", None)
    try:
        return int(getattr(strategy, "num_replicas_in_sync", 1) or 1)
    except Exception:  # pragma: no cover - strategy objects vary
        return 1


def facts(model) -> ModelFacts:
    bns = find_batchnorms(model)
    layers = list(walk(model))
    return ModelFacts(
        training_only=[name for name, layer in layers if any(t in type(layer).__name__ for t in TRAINING_ONLY_TOKENS)],
        other_normalization=[name for name, layer in layers if type(layer).__name__ in NON_BN_NORMALIZATION],
        replicas=replicas(model),
        synchronized=bool(bns) and all(getattr(bn, "synchronized", False) for _, bn in bns),
    )
