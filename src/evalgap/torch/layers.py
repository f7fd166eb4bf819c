"""PyTorch BatchNorm layers: which there are, which are frozen, and what else the model holds."""

from __future__ import annotations

import contextlib
import copy
import functools
import types
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine import ModelFacts, NormLayer, is_training_only, scale_changed
from .data import Forward, call_model, to_device

OTHER_NORMALIZATION = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def unwrap(model):
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile`` wrappers (nested
    in any order): evalgap's passes run the eager module, whose parameters and buffers the wrappers share, so a
    compiled model is neither recompiled nor run with its graph's guards on evalgap's temporary changes."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model


def set_modes(model: nn.Module, training: bool, *, except_eval: set[int] = frozenset()) -> None:
    """Set every module's ``training`` flag directly, without calling ``train()``/``eval()``: a hook the user
    attached to those (``evalgap.torch.PreciseBN.attach``, a framework's) must not fire inside evalgap's
    passes. Modules whose ``id`` is in ``except_eval`` are set to eval mode."""
    for m in all_modules(model):
        set_training(m, training and id(m) not in except_eval)


@contextlib.contextmanager
def modes_kept(model: nn.Module, training: bool | None = None, *, except_eval: set[int] = frozenset()) -> Iterator[None]:
    """Put every module's ``training`` flag back on exit, normal or not (directly, as :func:`set_modes`).

    With ``training`` given, the modes are also set on entry as :func:`set_modes` sets them, in the
    same walk over the modules."""
    modes = [(m, m.training) for m in all_modules(model)]
    try:
        if training is not None:
            for m, _ in modes:
                set_training(m, training and id(m) not in except_eval)
        yield
    finally:
        for m, mode in modes:
            set_training(m, mode)


def all_modules(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``, in the same order, without building every module's name."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


def set_training(m: nn.Module, mode: bool) -> None:
    """``m.training = mode`` without calling ``train()`` (see :func:`set_modes`)."""
    # a plain bool attribute: object.__setattr__ skips nn.Module.__setattr__'s parameter/buffer/module
    # checks (a tenth of the cost, which adds up over every module of a large model, twice per pass)
    object.__setattr__(m, "training", mode)


def find_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants, subclasses), by name."""
    return [(name or type(model).__name__, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def overrides_train(model: nn.Module) -> bool:
    """Whether a module class of the model defines its own ``train()`` (a detectron-style model keeping its
    backbone, or its BatchNorm layers, in eval mode while it trains)."""
    return any(type(m).train is not nn.Module.train for m in all_modules(model))


def eval_in_training(model: nn.Module) -> set[int]:
    """The ``id`` of every module that the model's own ``train()`` leaves in eval mode: the modes the user's
    training loop runs. Empty unless a module class overrides ``train()`` (:func:`overrides_train`); then
    ``train(True)`` runs on a ``copy.deepcopy`` of the model (an override may do more than set modes: merge
    LoRA weights, register hooks), whose modules map back to the model's by position. Empty where the copy or
    the override fails. The model itself is not touched."""
    if not overrides_train(model):
        return set()
    try:
        side = copy.deepcopy(model)
        type(side).train(side, True)
    except Exception:
        return set()
    return {id(m) for m, twin in zip(all_modules(model), all_modules(side)) if not twin.training}


def is_frozen(bn: _BatchNorm, model: nn.Module, *, left_in_eval: set[int] | None = None, model_trains: bool | None = None) -> bool:
    """A BN layer is frozen when it normalizes with its running statistics during training.

    That is: the model's own ``train()`` leaves it in eval mode (:func:`eval_in_training`; given as
    ``left_in_eval`` where already known), or it is in eval mode while the model is in training mode,
    or it is in eval mode and its affine parameters do not require gradients while others of the model
    do (``model_trains``: some parameter requires gradients; computed when not given). When the whole
    model is in eval mode and its parameters are trainable, or none is (an EMA or inference copy, never
    trained itself), the mode says nothing and it is not frozen.
    """
    if id(bn) in (eval_in_training(model) if left_in_eval is None else left_in_eval):
        return True
    if bn.training:
        return False
    if model.training:
        return True
    params = list(bn.parameters(recurse=False))
    if not params or any(p.requires_grad for p in params):
        return False
    return any(p.requires_grad for p in model.parameters()) if model_trains is None else model_trains


def norm_layers(model: nn.Module, *, left_in_eval: set[int] | None = None) -> list[NormLayer]:
    """The BatchNorm layers as the engine sees them (module order); ``left_in_eval`` as :func:`eval_in_training`
    gives it, where already known."""
    left_in_eval = eval_in_training(model) if left_in_eval is None else left_in_eval
    trains = any(p.requires_grad for p in model.parameters())
    return [
        NormLayer(
            name=name, handle=bn, kind=type(bn).__name__, channels=int(bn.num_features), eps=float(bn.eps),
            momentum=bn.momentum, frozen=is_frozen(bn, model, left_in_eval=left_in_eval, model_trains=trains),
            tracks_statistics=bool(bn.track_running_stats and bn._buffers.get("running_mean") is not None),
            dtype=_dtype_name(bn._buffers.get("running_var")),
        )
        for name, bn in find_batchnorms(model)
    ]


def _dtype_name(buffer: torch.Tensor | None) -> str | None:
    """A floating buffer's dtype as NumPy names it (``torch.float16`` -> ``"float16"``), else None."""
    if buffer is None or not buffer.dtype.is_floating_point:
        return None
    return str(buffer.dtype).removeprefix("torch.")


#: Packages whose functions are not followed: their training-mode behaviour is the modules' own (BatchNorm, Dropout).
_LIBRARIES = ("torch", "numpy", "math", "functools", "typing", "collections", "builtins", "einops")
#: Functions followed from one method at most; beyond, the answer is "not known".
_MAX_FOLLOWED = 256


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """A code object and the functions, lambdas and comprehensions compiled inside it."""
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _codes(c)


def _reads_training(fn: Any, seen: set | None = None) -> bool | None:
    """Whether a function reads the training flag (its name ``training``), in its own code or in the plain functions
    it calls by name or holds in its closure (``helper(self, x)``), to any depth, decorators and partials followed;
    not torch's own functions (nor NumPy's, ...). None: not known (its code cannot be read, a C or Cython callable or
    a callable object; or more than ``_MAX_FOLLOWED`` functions to follow)."""
    top, seen = seen is None, set() if seen is None else seen
    found = []
    while fn is not None:
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        if not isinstance(fn, types.FunctionType):
            found.append(None if top else False)  # a callee that is not Python code (a class, a builtin): not followed
            break
        if top or (fn.__module__ or "").split(".")[0] not in _LIBRARIES:
            found.append(_function_reads(fn, seen))
        fn = fn.__dict__.get("__wrapped__")  # functools.wraps: @torch.no_grad(), @torch.autocast(...), the user's own
    return True if True in found else (None if None in found else False)


def _function_reads(fn: types.FunctionType, seen: set) -> bool | None:
    if fn.__code__ in seen:
        return False
    if len(seen) >= _MAX_FOLLOWED:
        return None
    seen.add(fn.__code__)
    codes = list(_codes(fn.__code__))
    if any("training" in c.co_names or "training" in c.co_varnames for c in codes):
        return True
    callees = [fn.__globals__[name] for c in codes for name in c.co_names if name in fn.__globals__]
    for cell in fn.__closure__ or ():
        try:
            callees.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    results = [_reads_training(callee, seen) for callee in callees if isinstance(callee, (types.FunctionType, functools.partial))]
    return True if True in results else (None if None in results else False)


def _methods(cls: type) -> Iterator[Any]:
    """The functions a module class defines (its bases' too, up to ``nn.Module``, whose ``train()`` sets the flag)."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            continue
        for value in vars(klass).values():
            if isinstance(value, property):
                yield value.fget
            elif isinstance(value, (staticmethod, classmethod)):
                yield value.__func__
            elif isinstance(value, (types.FunctionType, functools.partial)):
                yield value


@functools.lru_cache(maxsize=512)
def _class_reads_training(cls: type) -> bool | None:
    """Whether a module class's methods and properties read the training flag (``self.training``,
    ``F.dropout(x, training=...)``); None where one of them cannot be read."""
    results = [_reads_training(fn) for fn in _methods(cls) if fn is not None]
    return True if True in results else (None if None in results else False)


def mode_dependent(model: nn.Module) -> list[str] | None:
    """Modules whose code reads the training flag, BatchNorm and the training-only ones (by class name)
    apart: their outputs may differ in training mode (functional dropout in a classifier head, a branch
    on ``self.training``). An instance-level ``forward`` and the user's hooks are read too. None (not known:
    diagnose then compares T and Td) where code cannot be read: a TorchScript module, a hook or forward
    that is not Python. Plain functions the code calls by name or holds in a closure are followed, to any depth
    (not those of torch, NumPy and the like), decorators too; methods of other objects and ``module.helper`` are not."""
    out = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, _BatchNorm) or is_training_only(type(m).__name__):
                continue
            if isinstance(m, torch.jit.ScriptModule):
                return None
            own = m.__dict__.get("forward")
            hooks = [h for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()
                     if not type(h).__module__.startswith("evalgap.")]  # PreciseBN.attach's own hook reads no output
            reads = [_class_reads_training(type(m)), *(_reads_training(f) for f in ([own] if own is not None else []) + hooks)]
            if True in reads:
                out.append(name or type(m).__name__)
            elif None in reads:
                return None
    except Exception:  # an attribute that cannot be looked at: not known
        return None
    return out


def reads_last_axis(model: nn.Module, inputs: Any) -> bool:
    """Whether the model's first layer (in module order) takes a tensor input of 3 or more dimensions by its last
    axis: a Linear of that many ``in_features`` or an RNN of that ``input_size`` ((N, L, F) sequences), so its
    channels are features on the last axis, not on axis 1 as a convolution's; or a convolution (``in_channels``) or
    BatchNorm (``num_features``) whose channels number the last axis's size and not axis 1's (an (N, L, F) sequence
    or an (N, H, W, C) image that ``forward`` moves to channels first)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 3:
        return False
    last, second = int(inputs.shape[-1]), int(inputs.shape[1])
    for m in all_modules(model):
        if isinstance(m, nn.Linear):
            return m.in_features == last
        if isinstance(m, nn.RNNBase):
            return m.input_size == last
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels == last != second
        if isinstance(m, _BatchNorm):
            return m.num_features == last != second
        if isinstance(m, nn.Embedding):
            return False
    return False


#: Layers that read the input's values first in most models; the input-scale finding is about what reaches them.
_FIRST_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase, nn.Embedding, nn.EmbeddingBag, _BatchNorm, *OTHER_NORMALIZATION)


class _Reached(BaseException):  # not an Exception: a user's ``except Exception`` in forward does not swallow it
    pass


def input_transforms(model: nn.Module, raw: Any, inputs: Any, *, forward: Forward | None, device: torch.device) -> list[str]:
    """Where the model changes the scale of its input before its first layer (a Conv, Linear, RNN, Embedding or
    normalization layer, the first one called): ``["conv1 receives values in [a, b], the input [c, d]"]``, an Embedding's
    name, or ``[]`` when that layer receives the input's scale (:func:`evalgap.engine.scale_changed`: a reshape,
    a permutation, a crop, a pooling or a dtype conversion keep it). One forward of ``raw`` (the first batch) in eval mode
    without gradients, stopped where that layer is reached; modes put back. ``[]`` where this cannot be told
    (the input is not one tensor, no such layer, the forward fails)."""
    if not isinstance(inputs, torch.Tensor) or inputs.numel() == 0:
        return []
    names = {id(m): name for name, m in model.named_modules() if isinstance(m, _FIRST_LAYERS)}
    if not names:
        return []
    seen: list[tuple[nn.Module, Any]] = []

    def reached(module: nn.Module, args: tuple) -> None:
        seen.append((module, args[0] if args else None))
        raise _Reached

    handles = [m.register_forward_pre_hook(reached) for m in model.modules() if id(m) in names]
    try:
        with modes_kept(model, False), torch.no_grad():
            call_model(model, to_device(raw, device), forward)
    except _Reached:
        pass
    except Exception:
        return []
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return []
    module, got = seen[0]
    name = names[id(module)]
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return [f"{name} ({type(module).__name__})"]
    if not isinstance(got, torch.Tensor) or got is inputs or not (torch.is_floating_point(got) and got.numel()):
        return []
    given, received = _summary(inputs), _summary(got)
    if not scale_changed(given, received):
        return []
    (lo, hi, _), (got_lo, got_hi, _) = given, received
    return [f"{name} receives values in [{got_lo:.3g}, {got_hi:.3g}], the input [{lo:.3g}, {hi:.3g}]"]


def _summary(t: torch.Tensor) -> tuple[float, float, float]:
    """``(min, max, std)`` of a tensor in float64, computed where it lies (one transfer of three numbers)."""
    t = t.detach().to(torch.float64)
    lo, hi = torch.aminmax(t)
    return tuple(float(v) for v in torch.stack([lo, hi, t.std(unbiased=False)]).tolist())  # type: ignore[return-value]


def _running_instance_norm(m: nn.Module) -> bool:
    """InstanceNorm with ``track_running_stats=True``: its own statistics per sample in training mode, running
    averages in eval mode (not the same normalization in both modes, as LayerNorm's and GroupNorm's)."""
    return isinstance(m, nn.modules.instancenorm._InstanceNorm) and bool(m.track_running_stats)


def facts(model: nn.Module, world: int = 1, *, left_in_eval: set[int] | None = None) -> ModelFacts:
    """Training-only modules, per-sample normalization, processes and synchronized BN."""
    bns = find_batchnorms(model)
    if left_in_eval is None:  # e.g. the dropout of a backbone the model's train() keeps in eval mode
        left_in_eval = eval_in_training(model)
    return ModelFacts(
        training_only=[name for name, m in model.named_modules() if is_training_only(type(m).__name__) and id(m) not in left_in_eval],
        mode_dependent=mode_dependent(model),
        other_normalization=[name for name, m in model.named_modules() if isinstance(m, OTHER_NORMALIZATION) and not _running_instance_norm(m)],
        running_instance_norm=[name for name, m in model.named_modules() if _running_instance_norm(m)],
        replicas=world,
        synchronized=bool(bns) and all(isinstance(bn, nn.SyncBatchNorm) for _, bn in bns),
        per_process_batches=world > 1,
    )
