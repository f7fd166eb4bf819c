"""How a batch reaches a PyTorch model: device placement, the input, the call."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import DataError

#: Keys taken as the model's input when a batch is a dict and no ``forward`` is given.
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values")

Forward = Callable[[nn.Module, Any], Any]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first materialized parameter or buffer (CPU if none)."""
    from torch.nn.parameter import is_lazy

    for t in list(model.parameters()) + list(model.buffers()):
        if not is_lazy(t):
            return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _dict_input_key(batch: Mapping) -> str | None:
    for key in INPUT_KEYS:
        if key in batch:
            return key
    return None


def model_input(batch: Any) -> Any:
    """The model's input in a batch: the tensor itself, a tuple's first element, or a dict's input key."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise DataError("got an empty batch (an empty tuple or list); each batch must hold the input first.")
        return batch[0]
    if isinstance(batch, Mapping):
        key = _dict_input_key(batch)
        return batch[key] if key is not None else batch
    return batch


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension of the batch's input (the first tensor found), or None."""
    x = model_input(batch)
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else None
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    if isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    return None


def call_model(model: nn.Module, batch: Any, forward: Forward | None) -> Any:
    """Run the model on one batch: ``forward(model, batch)`` if given, else by the batch's shape.

    A tensor is the input; a tuple or list holds the input first; a dict holds it under one
    of :data:`INPUT_KEYS`, or is passed as keyword arguments (``model(**batch)``).
    """
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping) and _dict_input_key(batch) is None:
        return model(**batch)
    return model(model_input(batch))
