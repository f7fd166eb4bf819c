"""One jit-compiled forward of a Flax model with every BatchNorm and Dropout set by a :class:`Plan`.

The moments pass and the predictors (modes E, P, T) are the same program with different
plans: per BatchNorm layer, batch statistics or moving statistics, and whether the moments
of its input are returned; training-only layers on (with a fixed key) or off; the value of
the model's own training flag. The model never changes:

- NNX: the compiled function gets ``nnx.split(model)``'s state and merges it into a private
  copy inside the trace; the copy's BatchNorm and Dropout objects get a subclass that applies
  the plan per call (the call argument wins over any the model passes; which layers the
  model's own calls freeze, or run on batch statistics in evaluation mode, is read beforehand
  by :func:`discover`). What the copy updates (moving statistics, RNG counts) is dropped with it.
- Linen: ``module.apply`` under :func:`flax.linen.intercept_methods`; each BatchNorm/Dropout
  call runs with the plan's attributes and the updated collections are dropped. The training
  flag is a call argument, or a field of the module (``Net(train=False)``), set by
  ``module.clone(train=...)``.

Both intercept the base class's ``__call__`` (``nnx.BatchNorm``, ``nn.BatchNorm``, the Dropouts),
not a user subclass's: the subclass's ``__call__`` runs as written, with its own signature, and
the plan applies where it calls ``super().__call__``, to the tensor the base normalizes, once per
normalization (NNX: :func:`_intercepted`; Linen: :func:`_base_call`).

A BatchNorm called inside a lifted transform (Linen ``nn.remat``/``nn.scan``/``nn.vmap``, NNX
``nnx.remat``/``nnx.scan``/``nnx.vmap``; found by comparing JAX's trace state with the forward's
own) cannot hand its moments out of the transform's trace; they leave as the model's state,
which the transforms carry: a slot (:data:`SLOTS`: count, shift, mean - shift, variance, calls) shaped
like the layer's moving mean, created in the forward (NNX: Variables on the private copy's layer;
Linen: entries beside ``mean``/``var`` in the ``batch_stats`` collection given to ``apply``,
which every transform that lets a BatchNorm train carries), so a stacked layer (scan, vmap)
gets one slot per stacked layer.
Every call merges its ``(n, mean, var)`` into the slot (Chan's update, relative to the first
call's shift: a layer a scan carries and calls several times is pooled), and the forward returns
the slots as one capture per layer (mean and variance flat, stacked layers side by side).

Captured moments, per BatchNorm call, over every axis but the feature axis, in at least
float32 (:func:`moments`: two-pass, never ``E[x^2] - E[x]^2``). A layer on batch statistics
then normalizes by exactly these statistics: they are put in the place of its moving
statistics (in the private copy / the dropped collection) and the layer runs Flax's own
normalization on them, so nothing is computed twice. On a batch sharded over several devices
the reductions run over the global batch (XLA inserts the cross-device sums), as a jitted
training step normalizes it.

Compiled functions are cached per model structure and plan (NNX: the ``GraphDef``, which
holds the module's structure and static attributes; Linen: the module, a hashable
description), the most recent :data:`MAX_COMPILED` of them, so a PreciseBN after every epoch
traces once, and so does a clone of the model.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from .input_scale import confirm, input_transform
from ..errors import ModelError
from .layers import Flag, LinenLayer, LinenModel, NnxModel, Path, like, linen_call, linen_stats, path_name, replace_stats, stacked_kind

#: One BN layer in a plan: (path, normalize by batch statistics, capture index or None).
Entry = tuple[Path, bool, "int | None"]


@dataclass(frozen=True)
class Plan:
    """How each layer runs in one compiled forward (hashable: it is part of the cache key)."""

    layers: tuple[Entry, ...]
    dropout: bool = False
    training: bool = False
    overrides: tuple[Path, ...] = ()


#: How many compiled functions are kept (least recently used ones go first).
MAX_COMPILED = 64
_CACHE: "OrderedDict[tuple, Callable]" = OrderedDict()


class _Key(tuple):
    """A cache key that hashes once (a large model's GraphDef is slow to hash)."""

    def __hash__(self) -> int:
        if "_hash" not in self.__dict__:
            self.__dict__["_hash"] = tuple.__hash__(self)
        return self.__dict__["_hash"]


def _cached(key: tuple, build: Callable[[], Callable]) -> Callable:
    key = _Key(key)
    fn = _CACHE.get(key)
    if fn is not None:
        _CACHE.move_to_end(key)
        return fn
    fn = _CACHE[key] = build()
    while len(_CACHE) > MAX_COMPILED:
        _CACHE.popitem(last=False)
    return fn


# ---- moments -----------------------------------------------------------------------------
def feature_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted({a % ndim for a in axes}))


def moments(x: jax.Array, axis: Any, mask: Any = None) -> tuple[Any, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """``(count per channel, mean, biased variance, (s, d))`` of ``x`` over every axis but ``axis``, in at least float32.

    Two-pass: the mean, then ``var = mean((x - mean)^2)``; never ``E[x^2] - E[x]^2``, which in
    float32 loses ``eps * mean^2 / var`` of the variance (all of it for inputs near 1e4 with a
    spread of 1), where an error ``e`` in the mean costs the two-pass variance only ``e^2``.
    The first pass sums ``x - s`` with ``s`` the first value of each channel, so that the
    mean travels to the host as ``s + d`` in float64 (``(s, d)``, both float32, ``d`` of the
    order of the spread): exact to float32 precision of the spread even where a float32 mean
    is not (values near 1e3 or 1e4), which the exact merge of batches needs. Each input is read
    once more than by Flax's own one-pass statistics. ``mask`` (as Flax's ``BatchNorm(mask=...)``)
    restricts both passes to the masked values.
    """
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    features = feature_axes(x.ndim, axis)
    axes = tuple(i for i in range(x.ndim) if i not in features)
    channels = 1
    for a in features:
        channels *= x.shape[a]
    where = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    first = jax.lax.stop_gradient(x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))])
    d = (x - first).mean(axes, where=where)
    mean = first.reshape(d.shape) + d
    var = jnp.square(x - jnp.expand_dims(mean, axes)).mean(axes, where=where)
    count = x.size // channels if where is None else jnp.sum(where) // channels
    return count, mean.reshape(-1), var.reshape(-1), (first.reshape(-1), d.reshape(-1))


def to_host(values: list) -> list[np.ndarray]:
    """Device values as NumPy in one transfer; a captured mean ``(s, d)`` as the float64 ``s + d``."""
    host = jax.device_get(list(values))
    return [np.asarray(v[0], np.float64) + np.asarray(v[1], np.float64) if isinstance(v, tuple) else np.asarray(v) for v in host]


def pack(sink: list) -> dict[str, tuple]:
    """Captures as a dict whose keys carry the call order, the capture index and a static count."""
    out = {}
    for k, (index, count, mean, var) in enumerate(sink):
        static = isinstance(count, int)
        out[f"{k:06d}/{index}/{count if static else -1}"] = (mean, var) if static else (count, mean, var)
    return out


def unpack(packed: dict[str, tuple]) -> list[tuple[int, Any, Any, Any]]:
    """The engine's captures ``(index, count, mean, var)`` in call order."""
    out = []
    for key in sorted(packed):
        _, index, count = key.split("/")
        values = packed[key]
        out.append((int(index), int(count), *values) if int(count) >= 0 else (int(index), *values))
    return out


# ---- captures: in call order; inside a lifted transform, through slots ---------------------
def _trace_state() -> Any:
    """JAX's current trace (compared, never kept past the forward's trace)."""
    return jax.extend.core.get_opaque_trace_state(convention="nnx")


#: A slot's entries (Linen: variable names in ``batch_stats``; NNX: attributes of the layer): count, shift, mean - shift,
#: var, and the number of calls merged in (a call that normalized nothing, a mask with no value, still counts: the
#: layer is then unreached, as at the top level, where a slot no call came out of is a transform that drops it).
SLOTS = ("evalgap_n", "evalgap_s", "evalgap_d", "evalgap_var", "evalgap_calls")
#: A slot capture's count when its stacked layers saw different numbers of values, or when no call came out of it.
UNEQUAL_COUNTS, NOT_CARRIED = -1, -2


class _Sink:
    """The captures of one traced forward, in call order.

    A call at the forward's own trace level adds its values; a call inside a lifted transform
    (another trace) has merged them into its layer's slot and adds the slot's place (a layer
    once, at its first call).
    """

    def __init__(self) -> None:
        self.top = _trace_state()
        self.entries: list[tuple] = []

    def nested(self) -> bool:
        return _trace_state() != self.top

    def add(self, index: int, count: Any, exact: Any, var: Any) -> None:
        self.entries.append(("value", index, count, exact, var))

    def slot(self, index: int, path: Path) -> None:
        self.entries.append(("slot", index, path))

    @contextlib.contextmanager
    def transforms(self) -> Iterator[None]:
        """Around the model's call: a failure after a call inside a lifted transform names that layer (a ModelError)."""
        try:
            yield
        except ModelError:
            raise
        except Exception as exc:
            nested = [entry[2] for entry in self.entries if entry[0] == "slot"]
            if not nested:
                raise
            raise _outside_transform(path_name(nested[-1]), exc) from exc

    def captures(self, read: Callable[[Path], tuple]) -> list[tuple]:
        """``(index, count, (s, d), var)`` per call; a slot's as one capture per layer (:func:`_slot_capture`)."""
        out, seen = [], set()
        for entry in self.entries:
            if entry[0] == "value":
                out.append(entry[1:])
            elif entry[1] not in seen:
                seen.add(entry[1])
                out.append(_slot_capture(entry[1], read(entry[2])))
        return out


def empty_slot(mean: Any) -> tuple:
    """A slot for a layer whose moving mean is ``mean``: zero counts and calls, float32 (or wider) moments, its shape."""
    shape, dtype = jnp.shape(mean), jnp.promote_types(jnp.asarray(mean).dtype, jnp.float32)
    return (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
            jnp.zeros(shape, jnp.int32))


def merge_slot(slot: tuple, count: Any, exact: tuple, var: Any) -> tuple:
    """``slot`` (n, s, d, var) with one call's moments merged in (Chan), relative to the slot's shift.

    With ``w = n1 / (n0 + n1)`` and ``delta`` the difference of the means (``(s1 - s0) + d1 - d0``,
    never a difference of two large means): ``d = d0 + w delta``, ``var = (1 - w) var0 + w var1 +
    w (1 - w) delta^2`` (biased). An empty slot takes the call as it is (its shift too). One more call.
    """
    n0, s0, d0, v0, calls = slot
    shape = jnp.shape(s0)
    s1, d1 = (jnp.reshape(a, shape).astype(s0.dtype) for a in exact)
    v1 = jnp.reshape(var, shape).astype(v0.dtype)
    n1 = jnp.broadcast_to(jnp.asarray(count, jnp.int32), shape)
    total = n0 + n1
    w = (n1 / jnp.maximum(total, 1)).astype(s0.dtype)
    delta = (s1 - s0) + d1 - d0
    empty = n0 == 0
    return (total, jnp.where(empty, s1, s0), jnp.where(empty, d1, d0 + w * delta),
            jnp.where(empty, v1, (1 - w) * v0 + w * v1 + w * (1 - w) * jnp.square(delta)), calls + 1)


def _slot_capture(index: int, slot: tuple) -> tuple:
    """A slot as one capture: flat moments and one count, 0 where the calls normalized nothing (unreached, as at the top
    level); :data:`NOT_CARRIED` where no call came out of the transform, :data:`UNEQUAL_COUNTS` where the stacked layers
    differ."""
    n, s, d, var, calls = slot
    n, calls = jnp.reshape(n, -1), jnp.reshape(calls, -1)
    count = jnp.where(jnp.any(calls <= 0), NOT_CARRIED, jnp.where(jnp.all(n == n[0]), n[0], UNEQUAL_COUNTS))
    return index, count, (jnp.reshape(s, -1), jnp.reshape(d, -1)), jnp.reshape(var, -1)


def _outside_transform(layer: str, transform_error: Exception) -> ModelError:
    return ModelError(
        f"BatchNorm layer {layer} is called inside a lifted transform (nn.scan, nn.vmap, nn.remat, nnx.scan, ...) that "
        f"does not let its statistics out ({type(transform_error).__name__}: {str(transform_error)[:200]}): evalgap hands "
        "a layer's moments out of a transform as the layer's state ('batch_stats'), which the transform must carry as "
        "it does in training (Linen: variable_axes={'params': 0, 'batch_stats': 0}; NNX: the layer's state in the "
        "transform's in_axes/state_axes). Nothing was changed."
    )


# ---- NNX ---------------------------------------------------------------------------------
_NNX_CLASSES: dict[tuple[type, str], type] = {}


def _intercepted(cls: type, base: type, role: str, call: Callable) -> type:
    """``cls`` (``base`` or a subclass of it) with ``base.__call__`` replaced by ``call`` (cached per class and role).

    ``call`` sits in a class between ``base`` and ``cls`` in the method resolution order (``cls``,
    its own bases, the hook, ``base``): a subclass's own ``__call__`` runs as written, with its
    own signature, and ``call`` runs where it calls ``super().__call__``, once per call of the
    base, on what the base is given (a channels-first port's transposed input).
    """
    if (cls, role) not in _NNX_CLASSES:
        if (base, role) not in _NNX_CLASSES:
            _NNX_CLASSES[base, role] = type(f"Evalgap{role}{base.__name__}", (base,), {"__call__": call})
        if cls is not base:
            _NNX_CLASSES[cls, role] = type(f"Evalgap{role}{cls.__name__}", (cls, _NNX_CLASSES[base, role]), {})
    return _NNX_CLASSES[cls, role]


def _planned_batchnorm(self, x, use_running_average=None, *, mask=None):
    """``nnx.BatchNorm.__call__`` under ``self._evalgap`` (the call's own ``use_running_average`` is overridden)."""
    from flax import nnx

    batch, index, sink, path = self.__dict__["_evalgap"]
    if index is None:  # mode T (Flax's own batch statistics) or E/P (moving statistics), or a layer without them
        return nnx.BatchNorm.__call__(self, x, use_running_average=not batch, mask=mask)
    count, mean, var, exact = moments(x, self.axis, mask)
    if sink.nested():  # inside a lifted transform: through the slot Variables the transform carries out
        slot = [getattr(self, name) for name in SLOTS]
        for variable, value in zip(slot, merge_slot(tuple(v.get_value() for v in slot), count, exact, var)):
            variable.set_value(value)
        sink.slot(index, path)
    else:
        sink.add(index, count, exact, var)
    if batch:  # normalize by exactly these batch statistics (the private copy's moving ones are free)
        self.mean[...] = mean.reshape(self.mean[...].shape).astype(self.mean[...].dtype)
        self.var[...] = var.reshape(self.var[...].shape).astype(self.var[...].dtype)
    return nnx.BatchNorm.__call__(self, x, use_running_average=True, mask=mask)


def _planned_dropout(self, inputs, *, deterministic=None, rngs=None):
    """``nnx.Dropout.__call__`` on (the plan's key) or off, whatever the call passes."""
    from flax import nnx

    on, key = self.__dict__["_evalgap"]
    return nnx.Dropout.__call__(self, inputs, deterministic=not on, rngs=key if on else None)


def _nnx_subclass(cls: type) -> type:
    """``cls`` (a BatchNorm or Dropout class) whose base calls follow ``self._evalgap`` (set on private copies only)."""
    from flax import nnx

    if issubclass(cls, nnx.BatchNorm):
        return _intercepted(cls, nnx.BatchNorm, "Planned", _planned_batchnorm)
    return _intercepted(cls, nnx.Dropout, "Planned", _planned_dropout)


def _given(value: Any) -> bool | None:
    """A call's ``use_running_average`` as a Python bool; None when not passed or not known at trace time."""
    try:
        return None if value is None else bool(value)
    except Exception:  # a traced value: decided inside the computation
        return None


def _recording_batchnorm(self, x, use_running_average=None, *, mask=None):
    """``nnx.BatchNorm.__call__`` on its moving statistics, recording the ``use_running_average`` the call passes."""
    from flax import nnx

    path, seen = self.__dict__["_evalgap"]
    seen.setdefault(path, _given(use_running_average))  # a shared layer: its first call, as for Linen
    return nnx.BatchNorm.__call__(self, x, use_running_average=True, mask=mask)


def _slot_class() -> type:
    from flax import nnx

    global _SLOT
    if _SLOT is None:
        # a BatchStat: every transform state axes that carry the layer's moving statistics (``nnx.StateAxes({(nnx.Param,
        # nnx.BatchStat): 0, ...: None})``, a filter on BatchStat) carry the slot the same way, stacked as they are
        _SLOT = type("EvalgapSlot", (nnx.BatchStat,), {"__doc__": "A private copy's BatchNorm moments from inside a lifted transform."})
    return _SLOT


_SLOT: type | None = None


def _nnx_apply_plan(model: Any, plan: Plan, sink: _Sink, overrides: tuple, key: Any) -> dict:
    from flax import nnx

    modules = dict(nnx.iter_modules(model))
    for path, batch, index in plan.layers:
        bn = modules[path]
        object.__setattr__(bn, "axis_name", None)  # a jitted pass over sharded data sees the global batch
        object.__setattr__(bn, "_evalgap", (batch, index, sink, path))
        object.__setattr__(bn, "__class__", _nnx_subclass(type(bn)))
        if index is not None:  # a slot, for calls inside a lifted transform (stacked like the moving mean)
            for name, value in zip(SLOTS, empty_slot(bn.mean.get_value())):
                setattr(bn, name, _slot_class()(value))
    for path, (mean, var) in zip(plan.overrides, overrides):
        shape = modules[path].mean[...].shape  # flat vectors: several feature axes, stacked layers
        modules[path].mean[...] = mean.reshape(shape).astype(modules[path].mean[...].dtype)
        modules[path].var[...] = var.reshape(shape).astype(modules[path].var[...].dtype)
    _nnx_dropout(modules, plan.dropout, key)
    return modules


def _nnx_dropout(modules: dict, on: bool, key: Any) -> None:
    """Every Dropout (and other module with ``deterministic``) of a private copy on (fixed key) or off."""
    from flax import nnx

    for k, (path, m) in enumerate(sorted(modules.items(), key=lambda item: str(item[0]))):
        if isinstance(m, nnx.Dropout):
            object.__setattr__(m, "_evalgap", (on, jax.random.fold_in(key, k)))
            object.__setattr__(m, "__class__", _nnx_subclass(type(m)))
        elif path and hasattr(m, "deterministic") and not isinstance(m, nnx.BatchNorm):
            object.__setattr__(m, "deterministic", not on)


def _nnx_forward(graphdef: Any, plan: Plan, flag: Flag | None, state: Any, x: Any, overrides: tuple, key: Any):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    sink = _Sink()
    modules = _nnx_apply_plan(model, plan, sink, overrides, key)
    with sink.transforms():
        out = model(x, **(flag.kwargs(plan.training) if flag else {}))
    return pack(sink.captures(lambda path: tuple(getattr(modules[path], name).get_value() for name in SLOTS))), out


_NNX_FIRST: dict[type, type] = {}


def _first_layers(nn: Any) -> tuple[type, ...]:
    """The layer classes whose input is "what reaches the model" (Conv, Dense/Linear, Embed, Einsum) of ``flax.linen`` or ``nnx``."""
    names = ("Conv", "ConvTranspose", "ConvLocal", "Dense", "DenseGeneral", "Linear", "LinearGeneral", "Embed", "Einsum")
    return tuple(getattr(nn, n) for n in names if isinstance(getattr(nn, n, None), type))


def _nnx_first(cls: type) -> type:
    """``cls`` (a Conv/Linear/Embed class) recording the first such call's input (None inside a lifted transform)."""
    if cls not in _NNX_FIRST:

        def __call__(self, inputs, *args, **kwargs):
            path, first, top = self.__dict__["_evalgap_first"]
            if not first:
                first.append((path, type(self).__mro__[1], inputs if _trace_state() == top else None))
            return cls.__call__(self, inputs, *args, **kwargs)

        _NNX_FIRST[cls] = type(f"EvalgapFirst{cls.__name__}", (cls,), {"__call__": __call__})
    return _NNX_FIRST[cls]


def _nnx_discover(graphdef: Any, flag: Flag | None, seen: dict, first: list, state: Any, x: Any) -> Any:
    """The calls traced by :func:`discover`: the training-mode call (``model.train()``, the flag True), then the
    evaluation-mode call (``model.eval()``, the flag False), each on a copy; ``seen[mode][path]`` gets the
    ``use_running_average`` each BatchNorm's call passes (mode True: training). Returns the input of the first
    Conv/Linear/Embed of the training-mode call (None: none, or inside a lifted transform)."""
    from flax import nnx

    top, kinds = _trace_state(), _first_layers(nnx)
    for training in (True, False):
        model = nnx.merge(graphdef, state)
        model.set_attributes(deterministic=not training, use_running_average=not training, raise_if_not_found=False)
        modules = dict(nnx.iter_modules(model))
        for path, m in modules.items():
            if isinstance(m, nnx.BatchNorm):
                object.__setattr__(m, "_evalgap", (path, seen.setdefault(training, {})))
                object.__setattr__(m, "__class__", _intercepted(type(m), nnx.BatchNorm, "Recording", _recording_batchnorm))
            elif training and isinstance(m, kinds):
                object.__setattr__(m, "_evalgap_first", (path, first, top))
                object.__setattr__(m, "__class__", _nnx_first(type(m)))
        _nnx_dropout(modules, False, jax.random.key(0))
        model(x, **(flag.kwargs(training) if flag else {}))
    return first[0][2] if first else None


def _discover_nnx(target: NnxModel, x: Any) -> None:
    from flax import nnx

    graphdef, state = nnx.split(target.module)
    leaves, structure = jax.tree.flatten(x)
    shapes = tuple((np.shape(a), str(getattr(a, "dtype", type(a).__name__))) for a in leaves)

    def trace() -> tuple[dict, tuple]:
        seen: dict = {}
        first: list = []
        jaxpr = jax.make_jaxpr(_bound(_nnx_discover, graphdef, target.flag, seen, first))(state, x)
        return seen, input_transform(target.name, first, jaxpr, len(leaves), nnx.Embed)

    calls, transform = _cached(("nnx-discover", graphdef, target.flag, structure, shapes), trace)
    target.calls = dict(calls.get(True, {}))
    target.always_batch = tuple(path for path, given in calls.get(False, {}).items() if given is False)
    target.input_transform = confirm(*transform, (state, x), x)  # by this batch's values: not cached


def _bound(fn: Callable, *static: Any) -> Callable:
    """``fn`` with its leading arguments bound, named as ``fn`` (a partial's repr, in JAX's errors, holds the whole model)."""

    def call(*args):
        return fn(*static, *args)

    call.__name__ = call.__qualname__ = fn.__name__
    return call


class NnxProgram:
    """The compiled forward of one NNX model under one plan; split the model once per pass."""

    def __init__(self, target: NnxModel, plan: Plan):
        from flax import nnx

        self.graphdef, self.state = nnx.split(target.module)
        build = lambda: jax.jit(_bound(_nnx_forward, self.graphdef, plan, target.flag))  # noqa: E731
        self.fn = _cached(("nnx", self.graphdef, plan, target.flag), build)

    def __call__(self, x: Any, overrides: tuple = (), key: Any = None):
        return self.fn(self.state, x, overrides, jax.random.key(0) if key is None else key)


# ---- Linen -------------------------------------------------------------------------------
def _owner(module: Any) -> tuple:
    """A Linen module as a cache key: the module itself (a hashable description), else its identity."""
    try:
        return (module, hash(module))
    except TypeError:  # unhashable fields: by identity (the cached function holds the module, so the id stays unique)
        return (id(module), module.__class__)


def _call_with(module: Any, attributes: dict, call: Callable[[], Any]) -> Any:
    """``call()`` with ``attributes`` set on the (bound, per-call) Linen module, then put back."""
    saved = {k: getattr(module, k) for k in attributes}
    for k, v in attributes.items():
        object.__setattr__(module, k, v)
    try:
        return call()
    finally:
        for k, v in saved.items():
            object.__setattr__(module, k, v)


def _base_call(context: Any, base: type) -> bool:
    """Whether an intercepted Linen call is ``base.__call__`` itself (inherited or reached through ``super().__call__``).

    A subclass's own ``__call__`` is not: it runs as written, and its base call, on what the base
    normalizes, is intercepted once per normalization.
    """
    fn = getattr(context.orig_method, "func", context.orig_method)  # Flax passes partial(method, module)
    return context.method_name == "__call__" and isinstance(context.module, base) and inspect.unwrap(fn) is inspect.unwrap(base.__call__)


def _linen_batchnorm(next_fun, args, kwargs, module, batch: bool, index, sink: _Sink):
    """One Linen BatchNorm call under the plan (as the NNX subclass: captured statistics normalize)."""
    args, kwargs = args[:1], {k: v for k, v in kwargs.items() if k != "use_running_average"}
    if index is None:
        return _call_with(module, {"use_running_average": not batch, "axis_name": None}, lambda: next_fun(*args, **kwargs))
    count, mean, var, exact = moments(args[0], module.axis, kwargs.get("mask"))
    if sink.nested():  # inside a lifted transform: through the slot in 'batch_stats', which the transform carries out
        path = tuple(module.path)
        try:
            slot = tuple(module.get_variable("batch_stats", name) for name in SLOTS)
            if any(v is None for v in slot):
                raise KeyError("the layer's 'batch_stats' do not reach it inside the transform")
            for name, value in zip(SLOTS, merge_slot(slot, count, exact, var)):
                module.put_variable("batch_stats", name, value)
        except Exception as exc:  # 'batch_stats' not lifted, or immutable inside the transform (variable_broadcast)
            raise _outside_transform(path_name(path), exc) from exc
        sink.slot(index, path)
    else:
        sink.add(index, count, exact, var)
    if batch:  # the collection is mutable in the pass, and what it holds afterwards is dropped
        x = args[0]
        shape = tuple(x.shape[a] for a in feature_axes(x.ndim, module.axis))
        dtype = jnp.float32 if getattr(module, "force_float32_reductions", True) else module.param_dtype
        module.put_variable("batch_stats", "mean", mean.reshape(shape).astype(dtype))
        module.put_variable("batch_stats", "var", var.reshape(shape).astype(dtype))
    return _call_with(module, {"use_running_average": True, "axis_name": None}, lambda: next_fun(*args, **kwargs))


def _linen_dropout(next_fun, args, kwargs, module, on: bool):
    rng = kwargs.get("rng", args[2] if len(args) > 2 else None)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("deterministic", "rng")}
    if rng is not None:
        kwargs["rng"] = rng
    return _call_with(module, {"deterministic": not on}, lambda: next_fun(args[0], **kwargs))


def _with_slots(variables: Mapping, paths: list[Path]) -> Mapping:
    """``variables`` with an empty slot (:data:`SLOTS`) beside ``mean``/``var`` of each path in ``batch_stats``."""
    stats = linen_stats(variables)
    paths = [p for p in paths if p in stats]
    if not paths:
        return variables

    def copy(tree: Any) -> Any:
        return {k: copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree

    out = dict(variables.items())
    out["batch_stats"] = copy(variables["batch_stats"])
    for path in paths:
        node = out["batch_stats"]
        for key in path:
            node = node[key]
        node.update(zip(SLOTS, empty_slot(node["mean"])))
    return out


def _slot_of(updated: Mapping, path: Path) -> tuple:
    node = updated["batch_stats"]
    for key in path:
        node = node[key]
    return tuple(node[name] for name in SLOTS)


def _linen_forward(module: Any, plan: Plan, flag: Flag | None, mutable: tuple, collections: tuple, variables, x, key):
    import flax.linen as nn

    sink = _Sink()
    entries = {path: (batch, index) for path, batch, index in plan.layers}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if _base_call(context, nn.BatchNorm):
            batch, index = entries.get(tuple(m.path), (False, None))
            return _linen_batchnorm(next_fun, args, kwargs, m, batch, index, sink)
        if _base_call(context, nn.Dropout):
            return _linen_dropout(next_fun, args, kwargs, m, plan.dropout)
        return next_fun(*args, **kwargs)

    rngs = {c: jax.random.fold_in(key, k) for k, c in enumerate(collections)} if plan.dropout else None
    module, kwargs = linen_call(module, flag, plan.training)
    variables = _with_slots(variables, [path for path, _, index in plan.layers if index is not None])
    with nn.intercept_methods(interceptor), sink.transforms():
        out, updated = module.apply(variables, x, mutable=list(mutable), rngs=rngs, **kwargs)
    return pack(sink.captures(lambda path: _slot_of(updated, path))), out


class LinenProgram:
    """The compiled forward of one Linen module under one plan; variables are an argument."""

    def __init__(self, target: LinenModel, plan: Plan):
        args = (plan, target.flag, target.mutable, target.rng_collections)
        build = lambda: jax.jit(_bound(_linen_forward, target.module, *args))  # noqa: E731
        self.fn = _cached(("linen", _owner(target.module), *args), build)

    def __call__(self, variables: Any, x: Any, key: Any = None):
        return self.fn(variables, x, jax.random.key(0) if key is None else key)


def discover(target: NnxModel | LinenModel, x: Any) -> None:
    """Trace the model in training mode, then in evaluation mode (shapes only, :func:`jax.make_jaxpr`) and record its layers.

    NNX: fills ``target.calls`` (per BatchNorm path, the ``use_running_average`` its call
    passes after ``model.train()``, None for none; BatchNorm on moving statistics and dropout
    off in the trace) and ``target.always_batch`` (the paths whose call passes False after
    ``model.eval()``). Linen: fills ``target.batchnorms`` (the BatchNorm layers called,
    in call order, then those of ``batch_stats`` the call did not reach; ``tracks_statistics``
    False where the evaluation-mode call, with a training flag, runs one on batch statistics), ``target.others``
    and ``target.rng_collections`` (every Dropout's, and every collection the model asks a key
    of with ``make_rng``: the trace is retried with a key for it). Both: ``target.input_transform``
    (:func:`evalgap.flax.input_scale.input_transform`, read from the trace's jaxpr, then confirmed on this batch's values by
    :func:`~evalgap.flax.input_scale.confirm`). Cached per model structure, flag and input shapes (PreciseBN traces once per
    model); the values are compared on every call.
    """
    if isinstance(target, NnxModel):
        return _discover_nnx(target, x)
    leaves, structure = jax.tree.flatten((target.variables, x))
    shapes = tuple((np.shape(a), str(getattr(a, "dtype", type(a).__name__))) for a in leaves)
    key = ("discover", _owner(target.module), target.flag, structure, shapes)
    found, _ = _cached(key, lambda: (_discover(target, x), target.module))  # the entry holds the module (see _owner)
    target.batchnorms, target.others = list(found[0]), list(found[1])
    target.rng_collections = found[2]
    target.input_transform = confirm(*found[3], (target.variables, x), x)  # by this batch's values: not cached


def _missing_rng(exc: BaseException) -> str | None:
    """The collection of a ``make_rng`` that found no key (``flax.errors.InvalidRngError``), else None."""
    from flax import errors

    found = re.search(r'needs PRNG for "([^"]+)"', str(exc)) if isinstance(exc, errors.InvalidRngError) else None
    return found.group(1) if found else None


def _discover(target: LinenModel, x: Any) -> tuple:
    import flax.linen as nn

    keys: list[str] = []  # collections the model asked a key of (DropPath, a noise layer): given one on the next try
    while True:
        seen: dict[Path, LinenLayer] = {}
        others: dict[Path, LinenLayer] = {}
        collections: set[str] = set()
        first: list = []
        try:
            trace = lambda v, x: _linen_discover(target, v, x, seen, others, collections, first, keys)  # noqa: E731
            jaxpr = jax.make_jaxpr(trace)(target.variables, x)
            break
        except Exception as exc:
            name = _missing_rng(exc)
            if name is None or name in keys:
                raise ModelError(_discover_failure(target, exc)) from exc
            keys.append(name)
    stats = linen_stats(target.variables)
    for p, layer in seen.items():  # channels as stored: several feature axes, layers stacked by a lifted transform
        size = int(np.size(stats[p][0])) if p in stats else layer.channels
        if layer.channels and size != layer.channels:
            layer.kind, layer.channels = stacked_kind(layer.kind, size // layer.channels), size
    missing = [LinenLayer(p, "BatchNorm (not called on this data)", int(np.size(mv[0]))) for p, mv in stats.items() if p not in seen]
    transform = input_transform(target.name, first, jaxpr, len(jax.tree.leaves(x)), nn.Embed)
    return tuple(seen.values()) + tuple(missing), tuple(others.values()), tuple(sorted(collections | set(keys))), transform


def _discover_failure(model: LinenModel, exc: Exception) -> str:
    if model.flag is None:
        how = f"{model.name}.apply(variables, x, no training flag)"
    elif model.flag.attribute:
        how = f"{model.name}({model.flag.name}={model.flag.kwargs(True)[model.flag.name]}).apply(variables, x)"
    else:
        how = f"{model.name}.apply(variables, x, {model.flag.name}={model.flag.kwargs(True)[model.flag.name]})"
    hint = "" if model.flag else (
        " If the module's __call__ takes a training flag under another name, pass train_arg='<its name>'."
    )
    return f"calling {how} on the first batch failed ({type(exc).__name__}: {exc}); check the input shape and the variables.{hint}"


def _linen_discover(target: LinenModel, variables, x, seen: dict, others: dict, collections: set, first: list, keys: list):
    """The calls traced by :func:`discover`: records, changes no behaviour but dropout's (off). The training-mode call
    gives the layers; then, where the model has a training flag, the evaluation-mode call marks a BatchNorm whose first
    call there runs on batch statistics (``use_running_average`` False, the call's or the attribute) as not tracking
    statistics. Returns the input of the first Conv/Dense/Embed (None: none, or inside a lifted transform)."""
    import flax.linen as nn

    top, kinds = _trace_state(), _first_layers(nn)
    training, evaluated = [True], set()

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path, kind = tuple(m.path), type(m).__name__
        if isinstance(m, nn.BatchNorm):
            if not _base_call(context, nn.BatchNorm):  # a subclass's own __call__: its base call is recorded
                return next_fun(*args, **kwargs)
            given = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
            uses = m.use_running_average if given is None else given
            if training[0]:
                x_in = args[0]
                channels = 1
                for a in feature_axes(x_in.ndim, m.axis):
                    channels *= x_in.shape[a]
                seen.setdefault(path, LinenLayer(path, kind, channels, float(m.epsilon), float(m.momentum), bool(uses)))
            elif path in seen and path not in evaluated:
                evaluated.add(path)
                seen[path].tracks_statistics = _given(uses) is not False
            return _call_with(m, {"axis_name": None}, lambda: next_fun(*args, **kwargs))
        if training[0]:
            if isinstance(m, kinds) and not first:
                first.append((path, type(m), args[0] if args and _trace_state() == top else None))
            others.setdefault(path, LinenLayer(path, kind))
        if _base_call(context, nn.Dropout):
            collections.add(m.rng_collection)
            return _linen_dropout(next_fun, args, kwargs, m, False)
        return next_fun(*args, **kwargs)

    rngs = {c: jax.random.key(k) for k, c in enumerate(keys)} or None
    for mode in (True, False) if target.flag is not None else (True,):
        training[0] = mode
        module, kwargs = linen_call(target.module, target.flag, mode)
        with nn.intercept_methods(interceptor):
            module.apply(variables, x, mutable=list(target.mutable), rngs=rngs, **kwargs)
    return first[0][2] if first else None


def bind(target: NnxModel | LinenModel, plan: Plan, stats: dict[Path, tuple[Any, Any]] | None = None) -> Callable[[Any, Any], tuple]:
    """``call(x, key) -> (packed captures, output)`` for this model and plan, ``stats`` substituted (mode P).

    NNX: the statistics are written into the private copy inside the trace; Linen: into a
    new variables tree (the given one is shared, not modified).
    """
    if isinstance(target, NnxModel):
        plan = Plan(plan.layers, plan.dropout, plan.training, tuple(stats or ()))
        program = NnxProgram(target, plan)
        overrides = tuple((jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32)) for m, v in (stats or {}).values())
        return lambda x, key=None: program(x, overrides, key)
    variables = target.variables
    if stats:
        old = linen_stats(variables)
        paths = list(stats)
        new = like([v for p in paths for v in stats[p]], [o for p in paths for o in old.get(p, (None, None))])
        variables = replace_stats(variables, {p: (new[2 * i], new[2 * i + 1]) for i, p in enumerate(paths)})
    program = LinenProgram(target, plan)
    return lambda x, key=None: program(variables, x, key)
