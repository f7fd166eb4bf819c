"""The user's data as batches for a PyTorch model: arrays shuffled like training, the user's batches as they come.

Arrays (``(x, y[, sample_weight])`` tensors or NumPy arrays, with ``batch_size=``) are cut
into seeded shuffled batches (:class:`evalgap.engine.ArrayBatches`); a map-style
``Dataset`` with ``batch_size=`` likewise. Anything else (a ``DataLoader``, a list of
batches, a generator) is taken batch by batch in the user's order. A batch is a tensor, a
tuple/list whose first element is the input (the second the target), or a dict.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from typing import Any, Callable, Mapping

import numpy as np

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .._random import iterate_keeping_random_states
from ..engine import ArrayBatches, Batch, StreamBatches, tree_leaves
from ..errors import DataError

logger = logging.getLogger("evalgap.torch")

#: Keys taken as the model's input when a batch is a dict and no ``forward`` is given.
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values")
#: Keys taken as the targets when a batch is a dict.
TARGET_KEYS = ("label", "labels", "y", "target", "targets")

Forward = Callable[[nn.Module, Any], Any]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first materialized parameter or buffer (CPU if none)."""
    from torch.nn.parameter import is_lazy

    for t in itertools.chain(model.parameters(), model.buffers()):
        if not is_lazy(t):
            return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values pass through. A ``PackedSequence`` moves
    by its own ``to()``, which keeps its ``batch_sizes`` on the CPU as the class requires."""
    if isinstance(batch, (torch.Tensor, PackedSequence)):
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
    """The model's input in a batch: the tensor (or ``PackedSequence``) itself, a tuple's first element, or a dict's
    input key."""
    if isinstance(batch, PackedSequence):  # a NamedTuple of its parts, one input
        return batch
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise DataError("got an empty batch (an empty tuple or list); each batch must hold the input first.")
        return batch[0]
    if isinstance(batch, Mapping):
        key = _dict_input_key(batch)
        return batch[key] if key is not None else batch
    return batch


def _first_tensor(tree: Any) -> torch.Tensor | PackedSequence | None:
    """The first tensor of at least one dimension (or ``PackedSequence``) in a tensor, a dict's values or a
    list/tuple's items."""
    items = (tree,) if isinstance(tree, PackedSequence) else tree.values() if isinstance(tree, Mapping) \
        else tree if isinstance(tree, (list, tuple)) else (tree,)
    for v in items:
        if isinstance(v, PackedSequence) or (isinstance(v, torch.Tensor) and v.dim() > 0):
            return v
    return None


def _samples(t: torch.Tensor | PackedSequence) -> int:
    """A tensor's leading dimension; a ``PackedSequence``'s number of sequences, ``batch_sizes[0]`` (its ``data``
    holds their tokens, not them)."""
    if isinstance(t, PackedSequence):
        return int(t.batch_sizes[0]) if t.batch_sizes.numel() else 0
    return int(t.shape[0])


def _is_sequence(v: Any) -> bool:
    """A list or tuple of items (not a ``PackedSequence``, a NamedTuple of one input's parts)."""
    return isinstance(v, (list, tuple)) and not isinstance(v, PackedSequence)


def _leading(v: Any) -> int | None:
    """A tensor's (or ``PackedSequence``'s) number of rows; None for anything else, a 0-dim tensor included."""
    if isinstance(v, PackedSequence) or (isinstance(v, torch.Tensor) and v.dim() > 0):
        return _samples(v)
    return None


def _target_rows(y: Any) -> int | None:
    """The batch dimension the targets hold: a tensor's leading dimension, a dict's first tensor's, or the leading
    dimension that every tensor of a list/tuple shares (one target per output, ``(y1, y2)``); None otherwise (per-sample
    targets: dicts, or tensors of different lengths, one per image)."""
    if _is_sequence(y):
        dims = {_leading(v) for v in y} - {None}
        return dims.pop() if len(dims) == 1 else None
    x = _first_tensor(y) if y is not None else None
    return None if x is None else _samples(x)


def _one_target_per_item(y: Any, items: int, batch_dims: tuple[int | None, ...]) -> bool:
    """Whether the targets hold one entry per item of an input list of ``items`` elements, not one per row of its first
    tensor: a tensor (or dict) of ``items`` rows; or a list/tuple of ``items`` dicts, or of tensors whose leading dimensions
    do not all equal one batch dimension of the input (``batch_dims``: its first tensor's first, or second where
    sequence-first), as per-image boxes of detection do."""
    if not _is_sequence(y):
        return _target_rows(y) == items
    if len(y) != items or not y:
        return False
    if all(isinstance(v, Mapping) for v in y):
        return True
    rows = _target_rows(y)
    return all(_leading(v) is not None for v in y) and (rows is None or rows not in batch_dims)


def batch_size_of(batch: Any) -> int | None:
    """The number of samples in a batch: the leading dimension of its input (the first tensor found), or None;
    for a ``PackedSequence`` input, the number of sequences it packs.

    - An input that is a list/tuple of per-sample tensors (torchvision's detection models take a list of images) counts
      its items where the targets hold one entry per item (:func:`_one_target_per_item`: a list of that many dicts or of
      per-image box tensors, or a tensor of that many rows); otherwise (several batched inputs, ``((x1, x2), y)``,
      ``((x1, x2), (y1, y2))``, or no targets) it counts the rows of its first tensor.
    - A sequence-first input, ``(T, N, ...)`` as ``batch_first=False`` RNNs and Transformers take it, is told by
      its targets' batch dimension (:func:`_target_rows`: a tensor's rows, or the rows that a tuple of targets
      shares): when that is not the input's first dimension but its second, the batch holds that many samples (N).
      Per-sample targets, a list with one entry per row of the input, never make an input sequence-first.
    - Ambiguous by shapes: a list of images with a list of per-image target tensors that all have the same number of
      rows ``r``, where ``r`` is the first image's first dimension (its channels: 3 boxes per image) or its second (its
      height: ``(H, W)`` masks), is also batched inputs and targets ``((x1, x2), (y1, y2))`` of ``r`` samples
      (sequence-first for the height), and is counted so: ``r``, not its images. A list of images without targets
      counts its first image's first dimension. Stacked images (one ``(N, C, H, W)`` tensor) with a list of per-image
      targets count ``N`` whatever the targets' shapes: batch them so, with ``forward=lambda model, batch:
      model(list(batch[0]))`` where the model takes a list."""
    inputs, y = model_input(batch), targets_of(batch)
    x = _first_tensor(inputs)
    if x is None:
        return None
    n = _samples(x)
    second = int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
    if _is_sequence(inputs) and len(inputs) != n and _one_target_per_item(y, len(inputs), (n, second)):
        return len(inputs)
    rows = _target_rows(y)
    if rows is not None and rows != n and rows == second and not (_is_sequence(y) and len(y) == n):
        return rows
    return n


def call_model(model: nn.Module, batch: Any, forward: Forward | None) -> Any:
    """Run the model on one batch: ``forward(model, batch)`` if given, else by the batch's shape.

    A tensor is the input; a tuple or list holds the input first; a dict holds it under one
    of :data:`INPUT_KEYS`, or is passed as keyword arguments (``model(**batch)``). An input that
    is itself a tuple or list, for a model whose ``forward`` needs several positional arguments
    (``forward(self, image, meta)`` with batches ``((image, meta), y)``), is passed unpacked.
    """
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping) and _dict_input_key(batch) is None:
        return model(**batch)
    x = model_input(batch)
    if isinstance(x, (list, tuple)) and not isinstance(x, PackedSequence) and len(x) > 1:
        low, high = positional_arguments(model)
        if low > 1 and low <= len(x) <= high:
            return model(*x)
    return model(x)


def positional_arguments(model: nn.Module) -> tuple[int, int]:
    """How many positional arguments the model's ``forward`` needs and takes at most (``(1, 1)`` when
    its signature cannot be read or takes ``*args``)."""
    own = model.__dict__.get("forward")
    if own is not None:  # an instance attribute (maybe an unhashable callable object): not cached
        return _positional.__wrapped__(own, False)
    return _positional(type(model).forward, True)


@functools.lru_cache(maxsize=256)
def _positional(fn: Callable, unbound: bool) -> tuple[int, int]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return 1, 1
    if unbound and params:
        params = params[1:]  # self
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 1, 1
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return sum(p.default is p.empty for p in positional), len(positional)


def targets_of(batch: Any) -> Any:
    """The targets in a batch: a tuple's second element or a dict's target key; None if there are none (a
    ``PackedSequence`` alone is an input)."""
    if isinstance(batch, (list, tuple)) and not isinstance(batch, PackedSequence) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
    return None


def _is_array(a: Any) -> bool:
    return isinstance(a, (torch.Tensor, np.ndarray))


def _arrays(data: Any) -> tuple[Any, Any, Any] | None:
    """``(x, y, w)`` when ``data`` is arrays with one row per sample: x, (x, y) or (x, y, w)."""
    if _is_array(data):
        return data, None, None
    if isinstance(data, tuple) and 1 <= len(data) <= 3 and all(p is None or all(_is_array(a) for a in tree_leaves(p)) for p in data):
        parts = list(data) + [None] * (3 - len(data))
        return parts[0], parts[1], parts[2]
    return None


def _as_tensor(a: Any) -> Any:
    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a


def _array_batch(x: Any, y: Any, w: Any, n: int) -> Batch:
    from ..engine import tree_map

    x, y, w = (tree_map(_as_tensor, p) for p in (x, y, w))
    raw = x if y is None else (x, y) if w is None else (x, y, w)
    return Batch(x, y, w, n, raw)


def _stream_batch(raw: Any) -> Batch:
    return Batch(model_input(raw), targets_of(raw), None, batch_size_of(raw), raw)


def batches(data: Any, *, batch_size: int | None = None, shuffle: bool = True, seed: int = 0, targets: bool = False):
    """The user's data as an engine batch source (see the module docstring)."""
    if data is None:
        raise DataError("data is None: pass the training data (a DataLoader, a list of batches, or (x, y) arrays with batch_size=).")
    arrays = _arrays(data) if batch_size is not None else None
    if arrays is not None:
        return ArrayBatches(arrays, batch_size=batch_size, shuffle=shuffle, seed=seed, to_batch=_array_batch)
    if batch_size is not None and isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") \
            and not isinstance(data, torch.utils.data.IterableDataset):
        return _dataset_batches(data, batch_size, shuffle, seed)
    if _arrays(data) is not None and isinstance(data, (torch.Tensor, np.ndarray, tuple)):
        raise DataError(
            "these look like arrays of samples (x or (x, y)): pass batch_size= (the training batch size) to cut them into "
            "batches, or pass a DataLoader / a list of (input, target) batches."
        )
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset) and hasattr(data, "__len__"):
        raise DataError(
            f"a map-style Dataset ({type(data).__name__}) gives one sample at a time: pass batch_size= (the training batch "
            "size) to draw batches from it as training does, or pass a DataLoader over it (batch_size=None if its items "
            "are already batches)."
        )
    if batch_size is not None:
        logger.info("batch_size=%s is ignored: the data are already batched", batch_size)
    total = _length(data)
    make = (lambda: iterate_keeping_random_states(data)) if isinstance(data, torch.utils.data.DataLoader) else (lambda: data)
    return StreamBatches(make, to_batch=_stream_batch, reiterable=not hasattr(data, "__next__"), total=total)


def _length(data: Any) -> int | None:
    """``len(data)``, or None where the data have none: a DataLoader over an IterableDataset without
    ``__len__`` has the method but raises TypeError."""
    if isinstance(data, Mapping) or not hasattr(data, "__len__"):
        return None
    try:
        return len(data)
    except TypeError:
        return None


def _dataset_batches(dataset, batch_size: int, shuffle: bool, seed: int):
    """A map-style Dataset: samples drawn in a seeded permutation, collated as a DataLoader would."""
    from torch.utils.data import DataLoader

    order = np.random.default_rng(seed).permutation(len(dataset)).tolist() if shuffle else list(range(len(dataset)))
    note = None
    if 0 < len(dataset) < batch_size:  # as a DataLoader does: one batch of all the samples
        note = f"batch_size={batch_size} is more than the {len(dataset)} samples: one batch of all of them, as training draws it"
        batch_size = len(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order)
    source = StreamBatches(lambda: iterate_keeping_random_states(loader), to_batch=_stream_batch, reiterable=True, total=len(loader))
    source.batch_size, source.size_note = batch_size, note
    how = f"shuffled with seed {seed}" if shuffle else "in the dataset's order"
    source.describe = f"dataset samples cut into batches of {batch_size} {how}"
    return source
