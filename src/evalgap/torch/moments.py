"""The moments pass for PyTorch: BN layers on batch statistics, read from the BN kernel itself.

During the pass the model is in eval mode (dropout off); each layer that normalizes by batch
statistics is in training mode with ``momentum = 1.0`` and fresh scratch buffers in place of
its ``running_mean`` / ``running_var`` (views of one zeroed block), so after a call the scratch
holds exactly that call's mean and Bessel-corrected variance, computed by the BN kernel that
reads the activations anyway. Its ``num_batches_tracked`` is a copy of its own (hooks and
subclasses may read it). Each layer's ``forward`` is
wrapped for the pass (an instance attribute, put back on exit; no hooks, whose dispatch
costs more than the wrapper): it notes the call (layer, values per channel), and after the
batch one ``clone`` of the scratch block keeps every layer's moments, left on the device. For
a stock BatchNorm1d/2d/3d the wrapper makes the kernel call PyTorch's forward would make,
``torch.batch_norm(x, weight, bias, mean, var, True, 1.0, eps, cudnn)`` on its slot, itself: the
same op on the same input, weight, bias and eps, without that forward's Python work (so the pass
costs less per call than a training-mode forward); what it does not cover (a ``__torch_function__`` override or mode,
keyword arguments, one value per channel, ...) goes through PyTorch's forward. A
layer called again within a batch has its earlier call's moments copied (one ``(2, C)``
stack) before the kernel overwrites them, and a layer that replaces its buffers instead of
updating them in place (a subclass) has what it holds copied after the call.
:func:`host_captures` pools, per layer, a flush whose batches each call every layer once
(:func:`_pooled_snapshots`, float64; on a GPU before the transfer, so only the pooled moments
move); any other flush moves in one transfer per device, its variances made biased with
``(n - 1) / n`` in float64 on the host.
Layers with float16 or bfloat16 buffers have their input's moments measured in float32 instead (the kernel
would round each call's moments to that dtype). Lazy layers not yet materialized use their own buffers, copied after each call. Frozen layers
stay in eval mode; their wrapper measures the input's moments with ``torch.var_mean``.

Side effects during the pass: the layers' buffer entries, ``momentum``, ``forward`` and every
module's mode. The model's own buffer tensors are never written (the scratch stands in for
them), and on exit, normal or not, the same tensor objects, ``momentum`` values, ``forward``
attributes and modes are put back; any other buffer of a layer on batch statistics (a subclass's step counter)
is a clone during the pass. Lazy layers not yet materialized are the exception: their
first call materializes their own buffers, which then hold the pass's last call.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from ..engine import Batch, HostCaptures, NormLayer
from ..errors import ModelError
from ..stats import pool_rows
from .data import Forward, call_model, to_device
from .layers import modes_kept, set_training

_STATE = ("running_mean", "running_var", "num_batches_tracked")


class _Layout:
    """Where the layers of one scratch block keep their moments: all means, then all variances.

    ``slots[index] = (mean offset, variance offset, channels)``; ``order`` the layer indices in
    block order, ``channels`` theirs, ``half`` the number of means."""

    def __init__(self, indices: Sequence[int], sizes: Sequence[int]):
        self.order = np.asarray(indices, dtype=np.int64)
        self.channels = np.asarray(sizes, dtype=np.int64)
        self.half = half = sum(sizes)
        starts = itertools.accumulate(sizes, initial=0)
        self.slots = {i: (a, half + a, c) for i, a, c in zip(indices, starts, sizes)}


class _Snapshot:
    """One batch's copy of a scratch block: the moments of each slot layer's last call of that batch."""

    __slots__ = ("block", "layout", "single")

    def __init__(self, block: torch.Tensor, layout: _Layout, single: bool):
        self.block, self.layout, self.single = block, layout, single


class _Scratch:
    """Zeroed stand-ins for the running buffers of a pass: one block per (device, dtype), split into views.

    A layer's mean and variance are views of its block (:class:`_Layout`), so one ``clone`` of the
    blocks after a batch keeps every layer's last call of that batch."""

    def __init__(self, bns: Sequence[tuple[int, _BatchNorm]]):
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, _BatchNorm]]] = {}
        for index, bn in bns:
            mean, var = bn._buffers.get("running_mean"), bn._buffers.get("running_var")
            if not is_lazy(mean) and (var.device, var.dtype, var.shape) == (mean.device, mean.dtype, mean.shape):
                groups.setdefault((mean.device, mean.dtype), []).append((index, bn))
        self.blocks: list[torch.Tensor] = []
        self.layouts: list[_Layout] = []
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(bn) -> (mean, var)
        self.group: dict[int, int] = {}  # layer index -> block
        for g, ((device, dtype), members) in enumerate(groups.items()):
            sizes = [bn._buffers["running_mean"].numel() for _, bn in members]
            block = torch.zeros(2 * sum(sizes), device=device, dtype=dtype)
            parts = block.split(sizes + sizes)
            for k, (index, bn) in enumerate(members):
                mean, var = parts[k], parts[len(members) + k]
                shape = bn._buffers["running_mean"].shape
                if len(shape) != 1:  # BN buffers are (C,); a subclass's may not be
                    mean, var = mean.view(shape), var.view(shape)
                self.views[id(bn)] = (mean, var)
                self.group[index] = g
            self.blocks.append(block)
            self.layouts.append(_Layout([index for index, _ in members], sizes))
        # each layer's num_batches_tracked, copied (one stack per device and dtype): a hook or a subclass
        # may read it; PyTorch's forward adds to the copy, the direct kernel call never touches it
        counters: dict[tuple[torch.device, torch.dtype, torch.Size], list[tuple[int, torch.Tensor]]] = {}
        for _, bn in bns:
            t = bn._buffers.get("num_batches_tracked")
            if t is not None:
                counters.setdefault((t.device, t.dtype, t.shape), []).append((id(bn), t))
        self.counters: dict[int, torch.Tensor] = {}  # id(bn) -> its copy
        for members in counters.values():
            self.counters.update(zip((key for key, _ in members), torch.stack([t for _, t in members]).unbind(0)))

    def snapshots(self) -> list[_Snapshot]:
        single = len(self.blocks) == 1
        return [_Snapshot(block.clone(), layout, single) for block, layout in zip(self.blocks, self.layouts)]


def _swap_in_scratch(bn: _BatchNorm, scratch: _Scratch) -> tuple[Any, ...]:
    """Replace the running buffers by scratch tensors for a momentum-1.0 pass; return what to put back.

    The buffer dict is written directly (as ``torch.func.functional_call`` swaps tensors): no
    copy of the user's tensors is made, and none of them is written. The scratch starts at
    zero: momentum 1.0 still reads the old value (``0 * stale inf = nan``). A layer without a
    slot (lazy, or odd buffers) keeps its own: a lazy one materializes them (in place) on its first call."""
    buffers = bn._buffers
    extra = {k: v for k, v in buffers.items() if k not in _STATE and v is not None and not is_lazy(v)}
    saved = (*(buffers.get(k) for k in _STATE), bn.momentum, extra)
    object.__setattr__(bn, "momentum", 1.0)  # a plain float attribute; skip nn.Module.__setattr__'s checks
    views = scratch.views.get(id(bn))
    if views is not None:
        buffers["running_mean"], buffers["running_var"] = views
    if buffers.get("num_batches_tracked") is not None:
        buffers["num_batches_tracked"] = scratch.counters[id(bn)]
    for k, v in extra.items():  # a subclass's own buffers (a step counter, a renorm bound): its training forward may update them
        buffers[k] = v.clone()
    return saved


def _put_back(bn: _BatchNorm, saved: tuple[Any, ...]) -> None:
    *buffers, momentum, extra = saved
    object.__setattr__(bn, "momentum", momentum)
    for key, value in zip(_STATE, buffers):
        if key in bn._buffers:
            bn._buffers[key] = value
    bn._buffers.update(extra)


class _Calls:
    """One batch's BN calls in call order: ``[index, n, value, unbiased?]``, ``value`` None while the
    layer's moments are only in its scratch slot."""

    def __init__(self) -> None:
        self.records: list[list[Any]] = []
        self.latest: dict[int, int] = {}  # layer index -> its record still held by the scratch

    def clear(self) -> None:
        self.records.clear()
        self.latest.clear()


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _slot_forward(index: int, call: Callable, bn: _BatchNorm, mean: torch.Tensor, var: torch.Tensor, calls: _Calls, name: str = "") -> Callable:
    """Note the call; its moments stay in the scratch slot (``mean``, ``var``) until the batch ends.

    The call runs with momentum 1.0 (set again before each call: a hook may have changed it); a model
    that puts the layer in eval mode, or changes its momentum, within its forward gets a ModelError
    (the slot would not hold this call's moments)."""
    records, latest = calls.records, calls.latest
    buffers, attrs = bn._buffers, bn.__dict__
    where = (mean.data_ptr(), var.data_ptr())

    def forward(*args, **kwargs):
        x = _input_of(args, kwargs)
        if not attrs["training"]:
            raise _mode_error(name, bn, "is put in eval mode within the model's forward")
        at = latest.get(index)
        if at is not None:  # the slot holds this layer's earlier call of the batch, which the kernel is about to overwrite
            records[at][2] = torch.stack((mean, var))
            del latest[index]
        object.__setattr__(bn, "momentum", 1.0)
        out = call(*args, **kwargs)  # a call that raises leaves no record
        if attrs["momentum"] != 1.0:
            raise _mode_error(name, bn, f"changes its momentum within its forward (to {attrs['momentum']})")
        n = x.numel() // x.shape[1]
        if buffers["running_mean"] is mean and buffers["running_var"] is var and (mean.data_ptr(), var.data_ptr()) == where:
            latest[index] = len(records)
            records.append([index, n, None, True])
        else:  # a subclass that replaced its buffers instead of updating them in place: copy what it holds now
            records.append([index, n, torch.stack((buffers["running_mean"], buffers["running_var"])), True])
        return out

    return forward


def _mode_error(name: str, bn: _BatchNorm, what: str) -> ModelError:
    return ModelError(
        f"{name or 'a layer'} ({type(bn).__name__}, {bn.num_features} channels) {what}: evalgap's pass reads each call's batch moments from "
        "the layer in training mode with momentum 1.0, so it cannot measure this layer. Put the layer in eval mode before "
        "calling evalgap if it should keep its statistics (it is then treated as frozen), or keep its mode and momentum "
        "out of forward. The model is unchanged."
    )


#: Layer types whose forward is PyTorch's own ``_BatchNorm.forward`` (not SyncBatchNorm, lazy or parametrized classes).
_STOCK_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_stock(bn: _BatchNorm) -> bool:
    """The layer runs PyTorch's own BatchNorm forward, and its weight and bias are entries of its parameters
    or attributes of its own (``torch.nn.utils.prune`` sets one before each call): the pass may call its
    kernel directly."""
    own = bn.__dict__
    return (type(bn) in _STOCK_TYPES and type(bn).forward is _BatchNorm.forward and "forward" not in own
            and all(k in bn._parameters or k in own for k in ("weight", "bias")))


def _stock_slot_forward(index: int, call: Callable, bn: _BatchNorm, mean: torch.Tensor, var: torch.Tensor, calls: _Calls,
                        name: str = "") -> Callable:
    """:func:`_slot_forward` for a stock layer: the kernel call ``_BatchNorm.forward`` makes in training
    mode with momentum 1.0, ``torch.batch_norm(x, weight, bias, mean, var, True, 1.0, eps, cudnn)`` on the
    slot (the same op on the same input, weight, bias and eps, so the same output and moments), without
    that forward's Python work (the momentum is not read: 1.0 is passed). Anything else goes through
    :func:`_slot_forward` (PyTorch's forward, which behaves or raises as it does outside the pass): keyword
    arguments, a ``__torch_function__`` override on the input, weight or bias or an active
    TorchFunctionMode (they must see ``F.batch_norm``), eval mode set within the model's forward (an
    error), eps <= 0, one value per channel."""
    records, latest = calls.records, calls.latest
    general = _slot_forward(index, call, bn, mean, var, calls, name)
    check_dim, params, attrs = bn._check_input_dim, bn._parameters, bn.__dict__
    batch_norm, cudnn_enabled, overridden = torch.batch_norm, torch._C._get_cudnn_enabled, torch._C._has_torch_function_variadic

    def forward(*args, **kwargs):
        if len(args) != 1 or kwargs or not attrs["training"] or not attrs["eps"] > 0:  # (eval mode: an error there)
            return general(*args, **kwargs)
        x = args[0]
        weight = attrs["weight"] if "weight" in attrs else params["weight"]  # as ``bn.weight`` resolves, without __getattr__
        bias = attrs["bias"] if "bias" in attrs else params["bias"]
        if overridden(x, weight, bias):
            return general(x)
        check_dim(x)
        n = x.numel() // x.shape[1]
        if n == 1:
            return general(x)  # PyTorch's forward raises its own error (one value per channel)
        at = latest.get(index)
        if at is not None:  # the slot holds this layer's earlier call of the batch, which the kernel is about to overwrite
            records[at][2] = torch.stack((mean, var))
        out = batch_norm(x, weight, bias, mean, var, True, 1.0, attrs["eps"], cudnn_enabled())
        latest[index] = len(records)
        records.append([index, n, None, True])
        return out

    return forward


_HALF = (torch.float16, torch.bfloat16)


def _half_forward(index: int, call: Callable, bn: _BatchNorm, calls: _Calls, name: str = "") -> Callable:
    """A layer whose buffers are float16 or bfloat16: the kernel would store each call's moments in that dtype (a
    bfloat16 variance holds 3 significant digits: 1% off where the mean is large against the spread), so the input's
    moments are measured in float32 (``torch.var_mean``, biased); the layer runs as in training on its slot."""
    attrs = bn.__dict__

    def forward(*args, **kwargs):
        x = _input_of(args, kwargs)
        if not attrs["training"]:
            raise _mode_error(name, bn, "is put in eval mode within the model's forward")
        object.__setattr__(bn, "momentum", 1.0)
        out = call(*args, **kwargs)  # a call that raises leaves no record
        var, mean = torch.var_mean(x.detach().float(), dim=[d for d in range(x.dim()) if d != 1], correction=0)
        calls.records.append([index, x.numel() // x.shape[1], torch.stack((mean, var)), False])
        return out

    return forward


def _own_buffers_forward(index: int, call: Callable, bn: _BatchNorm, calls: _Calls) -> Callable:
    """A layer without a slot (lazy): copy its own buffers after each call."""

    def forward(*args, **kwargs):
        x = _input_of(args, kwargs)
        out = call(*args, **kwargs)
        # momentum 1.0: the buffers hold this call's mean and unbiased variance (made biased on the host)
        calls.records.append([index, x.numel() // x.shape[1], torch.stack((bn.running_mean, bn.running_var)), True])
        return out

    return forward


def _observing_forward(index: int, call: Callable, calls: _Calls) -> Callable:
    """A frozen layer: measure its input's moments, then run it as it is (eval mode)."""

    def forward(*args, **kwargs):
        x = _input_of(args, kwargs)
        var, mean = torch.var_mean(x.detach().float(), dim=[d for d in range(x.dim()) if d != 1], correction=0)
        calls.records.append([index, x.numel() // x.shape[1], torch.stack((mean, var)), False])
        return call(*args, **kwargs)

    return forward


def flat_to_host(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """The tensors' values, flattened and concatenated, as one float64 NumPy array: one concatenation
    on the device and one transfer when they share a device (mixed dtypes are cast on the device to
    float64 if any is float64, else float32, which holds float16 and bfloat16 exactly), else one
    transfer each."""
    if not tensors:
        return np.zeros(0)
    if len({t.device for t in tensors}) == 1:
        dtypes = {t.dtype for t in tensors}
        with torch.no_grad():
            if len(dtypes) == 1 and all(t.dim() == 1 for t in tensors):  # BN buffers: one concatenation, no per-tensor calls
                return torch.cat(tensors).to("cpu", torch.float64).numpy()
            common = dtypes.pop() if len(dtypes) == 1 else torch.float64 if torch.float64 in dtypes else torch.float32
            return torch.cat([t.reshape(-1).to(common) for t in tensors]).to("cpu", torch.float64).numpy()
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]).numpy()


def host_captures(captures: list) -> HostCaptures:
    """Captures ``(index, n, value, unbiased?)`` on the host, ``value`` a ``(2, C)`` device tensor of mean
    and variance or a :class:`_Snapshot` holding the layer's slot: every tensor moves in one transfer, and
    the unbiased variances are multiplied by ``(n - 1) / n`` in float64.

    When every batch of the flush called each layer of one block once, in block order (the usual
    case), the flush is pooled where it lies (:func:`_pooled_snapshots`): one capture per layer."""
    m = len(captures)
    index = np.fromiter((c[0] for c in captures), dtype=np.int64, count=m)
    count = np.fromiter((c[1] for c in captures), dtype=np.float64, count=m)
    values = [c[2] for c in captures]
    pooled = _pooled_snapshots(index, count, values)
    if pooled is not None:
        return pooled
    unbiased = np.fromiter((c[3] for c in captures), dtype=bool, count=m)
    mean, var, channels = _gathered(index, values)
    bessel = np.where(unbiased, (count - 1) / np.where(count > 0, count, 1), 1.0)
    return HostCaptures(index=index, count=count, channels=channels, mean=mean, var=var * np.repeat(bessel, channels))


def _pooled_snapshots(index: np.ndarray, count: np.ndarray, values: list) -> HostCaptures | None:
    """A flush of whole snapshots (k batches, each calling the block's L layers once, in block order),
    pooled per layer in float64 with :func:`evalgap.stats.pool_rows` (the snapshots hold Bessel-corrected
    variances: ``correction=1``): on a GPU where the snapshots lie, so only the pooled means and variances
    move to the host; elsewhere in NumPy after one transfer. The union of a layer's k batch moments is one
    capture of ``N = sum n_b`` values, which the engine merges as it merges any capture. None when the
    flush is not such a grid."""
    if not values or not all(type(v) is _Snapshot for v in values) or not values[0].single:
        return None
    layout = values[0].layout
    width = layout.order.size
    if index.size % width or np.any(index.reshape(-1, width) != layout.order):
        return None
    rows = range(0, len(values), width)
    if any(values[r] is not values[r + width - 1] for r in rows):  # a row of calls spans two batches
        return None
    counts = count.reshape(-1, width)
    if not np.all(counts > 0):  # an empty input (its slot still holds an earlier call): the host path weighs it 0
        return None
    per_channel = np.repeat(counts[:1] if np.all(counts == counts[:1]) else counts, layout.channels, axis=1)
    half = layout.half
    with torch.no_grad():
        block = torch.stack([values[r].block for r in rows]) if len(rows) > 1 else values[0].block[None]
        if block.device.type == "cuda":  # pooled on the GPU: k rows in, one out
            b = block.to(torch.float64)
            total, mean, m2 = pool_rows(torch.from_numpy(per_channel).to(block.device), b[:, :half], b[:, half:], correction=1)
            host = torch.cat((mean, m2 / total)).cpu().numpy()
            mean, var = host[:half], host[half:]
        else:  # the CPU pools in NumPy (as fast, fewer allocations); MPS has no float64: its rows move first
            b = block.to("cpu", torch.float64).numpy()
            total, mean, m2 = pool_rows(per_channel, b[:, :half], b[:, half:], correction=1)
            var = m2 / total
    return HostCaptures(index=layout.order, count=counts.sum(axis=0), channels=layout.channels, mean=mean, var=var)


def _gathered(index: np.ndarray, values: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Any mix of pairs and snapshots: each tensor moves once, each capture's values are gathered."""
    m = len(values)
    sources: list[torch.Tensor] = []
    base: dict[int, int] = {}
    size = 0
    starts = np.empty((2, m), dtype=np.int64)
    channels = np.empty(m, dtype=np.int64)
    for k, (i, value) in enumerate(zip(index.tolist(), values)):
        if type(value) is _Snapshot:
            t = value.block
            mean_at, var_at, c = value.layout.slots[i]
        else:
            t, c = value, value.shape[1]
            mean_at, var_at = 0, c
        b = base.get(id(t))
        if b is None:
            b = base[id(t)] = size
            sources.append(t)
            size += t.numel()
        starts[0, k], starts[1, k], channels[k] = b + mean_at, b + var_at, c
    flat = flat_to_host(sources)
    within = np.arange(int(channels.sum())) - np.repeat(np.cumsum(channels) - channels, channels)
    return flat[np.repeat(starts[0], channels) + within], flat[np.repeat(starts[1], channels) + within], channels


@contextlib.contextmanager
def moments_pass(
    model: nn.Module, layers: Sequence[NormLayer], batch_statistics: Sequence[bool], *, forward: Forward | None,
    device: torch.device, local_sync: bool = False,
) -> Iterator[Any]:
    """Yield ``run(batch) -> (captures, output)``; see the module docstring.

    ``local_sync``: SyncBatchNorm layers normalize by local batch statistics (no collective
    per batch; the engine combines processes once at the end).
    """
    with modes_kept(model, False), _pass(model, layers, batch_statistics, forward, device, local_sync) as run:
        yield run


@contextlib.contextmanager
def _pass(model, layers, batch_statistics, forward, device, local_sync) -> Iterator[Any]:
    saved: list[tuple[_BatchNorm, tuple[Any, ...]]] = []
    calls = _Calls()
    patched: list[tuple[_BatchNorm, Any]] = []
    try:
        with torch.no_grad():
            scratch = _Scratch([(i, layer.handle) for i, (layer, on_batch) in enumerate(zip(layers, batch_statistics)) if on_batch])
            for index, (layer, on_batch) in enumerate(zip(layers, batch_statistics)):
                bn = layer.handle
                own = bn.__dict__.get("forward")  # a user's instance-level forward, put back on exit
                if local_sync and on_batch and isinstance(bn, nn.SyncBatchNorm):
                    call = functools.partial(_BatchNorm.forward, bn)  # local batch statistics, no collective per batch
                else:
                    call = own if own is not None else functools.partial(type(bn).forward, bn)
                if on_batch:
                    set_training(bn, True)
                    saved.append((bn, _swap_in_scratch(bn, scratch)))
                    if index in scratch.group and scratch.views[id(bn)][0].dtype in _HALF:
                        wrapper = _half_forward(index, call, bn, calls, layer.name)
                    elif index in scratch.group:
                        slot = _stock_slot_forward if _is_stock(bn) else _slot_forward  # (no instance forward of the user's)
                        wrapper = slot(index, call, bn, *scratch.views[id(bn)], calls, layer.name)
                    else:
                        wrapper = _own_buffers_forward(index, call, bn, calls)
                else:
                    wrapper = _observing_forward(index, call, calls)
                patched.append((bn, own))
                bn.__dict__["forward"] = wrapper  # an instance attribute: no hook machinery on each call

        def run(batch: Batch):
            calls.clear()
            with torch.no_grad():
                output = call_model(model, to_device(batch.raw, device), forward)
                snapshots = scratch.snapshots() if calls.latest else []
            group = scratch.group  # value None: the layer's last call of the batch, its moments in the snapshot
            return [(i, n, snapshots[group[i]] if v is None else v, u) for i, n, v, u in calls.records], output

        yield run
    finally:
        for bn, own in patched:
            bn.__dict__.pop("forward", None)
            if own is not None:
                bn.__dict__["forward"] = own
        for bn, s in reversed(saved):
            _put_back(bn, s)
