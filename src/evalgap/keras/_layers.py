"""Finding Keras BatchNormalization layers, nested models included, by path name."""

from __future__ import annotations

from typing import Iterator

import keras


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


NON_BN_NORMALIZATION = ("LayerNormalization", "GroupNormalization", "UnitNormalization", "RMSNormalization")
