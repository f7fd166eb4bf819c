"""One jit-compiled forward of a Flax model with every BatchNorm and Dropout set by a :class:`Plan`.

The moments pass and the predictors (modes E, P, T) are the same program with different
plans: per BatchNorm layer, batch statistics or moving statistics, and whether the moments
of its input are returned; training-only layers on (with a fixed key) or off; the value of
the model's own training flag. The model never changes:

- NNX: the compiled function gets ``nnx.split(model)``'s state and merges it into a private
  copy inside the trace; the copy's BatchNorm and Dropout objects get a subclass that applies
  the plan per call (the call argument wins over any the model passes; which layers the
  model's own calls freeze is read beforehand by :func:`discover`). What the copy updates
  (moving statistics, RNG counts) is dropped with it.
- Linen: ``module.apply`` under :func:`flax.linen.intercept_methods`; each BatchNorm/Dropout
  call runs with the plan's attributes and the updated collections are dropped.

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

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ModelError
from .layers import Flag, LinenLayer, LinenModel, NnxModel, Path, like, linen_stats, replace_stats

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


# ---- NNX ---------------------------------------------------------------------------------
_NNX_CLASSES: dict[type, type] = {}


def _nnx_subclass(cls: type) -> type:
    """``cls`` (a BatchNorm or Dropout class) whose calls follow ``self._evalgap`` (set on private copies only)."""
    from flax import nnx

    if cls not in _NNX_CLASSES:
        if issubclass(cls, nnx.BatchNorm):

            def __call__(self, x, use_running_average=None, *, mask=None):
                batch, index, sink = self.__dict__["_evalgap"]
                if index is None:  # mode T (Flax's own batch statistics) or E/P (moving statistics)
                    return cls.__call__(self, x, use_running_average=not batch, mask=mask)
                count, mean, var, exact = moments(x, self.axis, mask)
                sink.append((index, count, exact, var))
                if batch:  # normalize by exactly these batch statistics (the private copy's moving ones are free)
                    self.mean[...] = mean.reshape(self.mean[...].shape).astype(self.mean[...].dtype)
                    self.var[...] = var.reshape(self.var[...].shape).astype(self.var[...].dtype)
                return cls.__call__(self, x, use_running_average=True, mask=mask)

        else:

            def __call__(self, inputs, *, deterministic=None, rngs=None):
                on, key = self.__dict__["_evalgap"]
                return cls.__call__(self, inputs, deterministic=not on, rngs=key if on else None)

        _NNX_CLASSES[cls] = type(f"EvalgapPlanned{cls.__name__}", (cls,), {"__call__": __call__})
    return _NNX_CLASSES[cls]


_NNX_RECORDING: dict[type, type] = {}


def _given(value: Any) -> bool | None:
    """A call's ``use_running_average`` as a Python bool; None when not passed or not known at trace time."""
    try:
        return None if value is None else bool(value)
    except Exception:  # a traced value: decided inside the computation
        return None


def _nnx_recording(cls: type) -> type:
    """``cls`` (a BatchNorm class) recording the ``use_running_average`` each call passes, on its moving statistics."""
    if cls not in _NNX_RECORDING:

        def __call__(self, x, use_running_average=None, *, mask=None):
            path, seen = self.__dict__["_evalgap"]
            seen.setdefault(path, _given(use_running_average))  # a shared layer: its first call, as for Linen
            return cls.__call__(self, x, use_running_average=True, mask=mask)

        _NNX_RECORDING[cls] = type(f"EvalgapRecording{cls.__name__}", (cls,), {"__call__": __call__})
    return _NNX_RECORDING[cls]


def _nnx_apply_plan(model: Any, plan: Plan, sink: list, overrides: tuple, key: Any) -> None:
    from flax import nnx

    modules = dict(nnx.iter_modules(model))
    for path, batch, index in plan.layers:
        bn = modules[path]
        object.__setattr__(bn, "axis_name", None)  # a jitted pass over sharded data sees the global batch
        object.__setattr__(bn, "_evalgap", (batch, index, sink))
        object.__setattr__(bn, "__class__", _nnx_subclass(type(bn)))
    for path, (mean, var) in zip(plan.overrides, overrides):
        modules[path].mean[...] = mean.astype(modules[path].mean[...].dtype)
        modules[path].var[...] = var.astype(modules[path].var[...].dtype)
    _nnx_dropout(modules, plan.dropout, key)


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
    sink: list = []
    _nnx_apply_plan(model, plan, sink, overrides, key)
    out = model(x, **(flag.kwargs(plan.training) if flag else {}))
    return pack(sink), out


def _nnx_discover(graphdef: Any, flag: Flag | None, seen: dict, state: Any, x: Any) -> None:
    """The training-mode call traced by :func:`discover` (``model.train()``, the flag True): BatchNorm calls recorded."""
    from flax import nnx

    model = nnx.merge(graphdef, state)
    model.set_attributes(deterministic=False, use_running_average=False, raise_if_not_found=False)  # model.train()
    modules = dict(nnx.iter_modules(model))
    for path, m in modules.items():
        if isinstance(m, nnx.BatchNorm):
            object.__setattr__(m, "_evalgap", (path, seen))
            object.__setattr__(m, "__class__", _nnx_recording(type(m)))
    _nnx_dropout(modules, False, jax.random.key(0))
    model(x, **(flag.kwargs(True) if flag else {}))


def _discover_nnx(target: NnxModel, x: Any) -> None:
    from flax import nnx

    graphdef, state = nnx.split(target.module)
    leaves, structure = jax.tree.flatten(x)
    shapes = tuple((np.shape(a), str(getattr(a, "dtype", type(a).__name__))) for a in leaves)

    def trace() -> dict:
        seen: dict = {}
        jax.eval_shape(_bound(_nnx_discover, graphdef, target.flag, seen), state, x)
        return seen

    target.calls = dict(_cached(("nnx-discover", graphdef, target.flag, structure, shapes), trace))


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


def _linen_batchnorm(next_fun, args, kwargs, module, batch: bool, index, sink: list):
    """One Linen BatchNorm call under the plan (as the NNX subclass: captured statistics normalize)."""
    args, kwargs = args[:1], {k: v for k, v in kwargs.items() if k != "use_running_average"}
    if index is None:
        return _call_with(module, {"use_running_average": not batch, "axis_name": None}, lambda: next_fun(*args, **kwargs))
    count, mean, var, exact = moments(args[0], module.axis, kwargs.get("mask"))
    sink.append((index, count, exact, var))
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


def _linen_forward(module: Any, plan: Plan, flag: Flag | None, mutable: tuple, collections: tuple, variables, x, key):
    import flax.linen as nn

    sink: list = []
    entries = {path: (batch, index) for path, batch, index in plan.layers}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(m, nn.BatchNorm):
            batch, index = entries.get(tuple(m.path), (False, None))
            return _linen_batchnorm(next_fun, args, kwargs, m, batch, index, sink)
        if isinstance(m, nn.Dropout):
            return _linen_dropout(next_fun, args, kwargs, m, plan.dropout)
        return next_fun(*args, **kwargs)

    rngs = {c: jax.random.fold_in(key, k) for k, c in enumerate(collections)} if plan.dropout else None
    with nn.intercept_methods(interceptor):
        out, _ = module.apply(variables, x, mutable=list(mutable), rngs=rngs, **(flag.kwargs(plan.training) if flag else {}))
    return pack(sink), out


class LinenProgram:
    """The compiled forward of one Linen module under one plan; variables are an argument."""

    def __init__(self, target: LinenModel, plan: Plan):
        args = (plan, target.flag, target.mutable, target.rng_collections)
        build = lambda: jax.jit(_bound(_linen_forward, target.module, *args))  # noqa: E731
        self.fn = _cached(("linen", _owner(target.module), *args), build)

    def __call__(self, variables: Any, x: Any, key: Any = None):
        return self.fn(variables, x, jax.random.key(0) if key is None else key)


def discover(target: NnxModel | LinenModel, x: Any) -> None:
    """Trace the model once in training mode (shapes only, :func:`jax.eval_shape`) and record its layers.

    NNX: fills ``target.calls`` (per BatchNorm path, the ``use_running_average`` its call
    passes after ``model.train()``, None for none; BatchNorm on moving statistics and dropout
    off in the trace). Linen: fills ``target.batchnorms`` (the BatchNorm layers called,
    in call order, then those of ``batch_stats`` the call did not reach), ``target.others``
    and ``target.rng_collections``. Cached per model structure, flag and input shapes
    (PreciseBN traces once per model).
    """
    if isinstance(target, NnxModel):
        return _discover_nnx(target, x)
    leaves, structure = jax.tree.flatten((target.variables, x))
    shapes = tuple((np.shape(a), str(getattr(a, "dtype", type(a).__name__))) for a in leaves)
    key = ("discover", _owner(target.module), target.flag, structure, shapes)
    found, _ = _cached(key, lambda: (_discover(target, x), target.module))  # the entry holds the module (see _owner)
    target.batchnorms, target.others, target.rng_collections = list(found[0]), list(found[1]), found[2]


def _discover(target: LinenModel, x: Any) -> tuple:
    seen: dict[Path, LinenLayer] = {}
    others: dict[Path, LinenLayer] = {}
    collections: set[str] = set()
    try:
        jax.eval_shape(lambda v, x: _linen_discover(target, v, x, seen, others, collections), target.variables, x)
    except Exception as exc:
        raise ModelError(_discover_failure(target, exc)) from exc
    stats = linen_stats(target.variables)
    missing = [LinenLayer(p, "BatchNorm (not called on this data)", int(np.shape(mv[0])[0])) for p, mv in stats.items() if p not in seen]
    return tuple(seen.values()) + tuple(missing), tuple(others.values()), tuple(sorted(collections))


def _discover_failure(model: LinenModel, exc: Exception) -> str:
    how = f"{model.flag.name}={model.flag.kwargs(True)[model.flag.name]}" if model.flag else "no training flag"
    hint = "" if model.flag else (
        " If the module's __call__ takes a training flag under another name, pass train_arg='<its name>'."
    )
    return (f"calling {model.name}.apply(variables, x, {how}) on the first batch failed ({type(exc).__name__}: {exc}); "
            f"check the input shape and the variables.{hint}")


def _linen_discover(target: LinenModel, variables, x, seen: dict, others: dict, collections: set):
    """The training-mode call traced by :func:`discover`: records, changes no behaviour but dropout's."""
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path, kind = tuple(m.path), type(m).__name__
        if isinstance(m, nn.BatchNorm):
            given = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
            frozen = bool(m.use_running_average if given is None else given)
            x_in = args[0]
            channels = 1
            for a in feature_axes(x_in.ndim, m.axis):
                channels *= x_in.shape[a]
            seen.setdefault(path, LinenLayer(path, kind, channels, float(m.epsilon), float(m.momentum), frozen))
            return _call_with(m, {"axis_name": None}, lambda: next_fun(*args, **kwargs))
        if isinstance(m, nn.Dropout):
            collections.add(m.rng_collection)
            others.setdefault(path, LinenLayer(path, kind))
            return _linen_dropout(next_fun, args, kwargs, m, False)
        others.setdefault(path, LinenLayer(path, kind))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        return target.module.apply(variables, x, mutable=list(target.mutable), **(target.flag.kwargs(True) if target.flag else {}))


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
