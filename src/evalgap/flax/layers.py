"""Flax models as the engine sees them: NNX modules and Linen ``(module, variables)`` pairs.

An NNX module holds its BatchNorm statistics (``nnx.BatchNorm.mean`` / ``.var``, ``BatchStat``
variables) and its modes (``use_running_average``, ``deterministic``) as attributes. A Linen
model is a module (a description) and a variables tree; its BatchNorm statistics live in
``variables["batch_stats"]`` under each layer's scope path, and its modes are call arguments
(usually a ``train`` flag) or module attributes, so its layers are found by one abstract
trace of the model in training mode (:func:`evalgap.flax.forward.discover`: shapes only).

Frozen: a BatchNorm layer that normalizes with its moving statistics during training. NNX:
the ``use_running_average`` its call passes in the model's training-mode call (after
``model.train()``, with the training flag True; one abstract trace,
:func:`evalgap.flax.forward.discover`): ``self.bn(x, use_running_average=True)`` is frozen,
``use_running_average=not train`` is not. A call that passes none: the attribute
``use_running_average=True`` while the model is in training mode (another BatchNorm or a
Dropout is in training mode); when the whole model is in evaluation mode (``model.eval()``)
the attribute says nothing and no layer is frozen. Linen: ``use_running_average`` is True in
the training-mode trace (the call's argument, else the attribute).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from ..engine import ModelFacts, NormLayer, is_training_only
from ..errors import ModelError

Path = tuple

#: Boolean call arguments that say "training mode" (True in training) or its opposite.
TRAIN_FLAGS = ("train", "training", "is_training")
EVAL_FLAGS = ("deterministic", "eval", "inference", "evaluation", "use_running_average")
OTHER_NORMALIZATION = ("LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm")


def path_name(path: Path) -> str:
    """``('blocks', 0, 'bn')`` -> ``'blocks/0/bn'`` (the root module itself: its class name)."""
    return "/".join(str(p) for p in path)


@dataclass(frozen=True)
class Flag:
    """The model's own training-mode argument: its name and whether True means training."""

    name: str
    training_when_true: bool

    def kwargs(self, training: bool) -> dict[str, bool]:
        return {self.name: training if self.training_when_true else not training}


def call_flag(fn: Callable, name: str | None = None) -> Flag | None:
    """The training flag among ``fn``'s parameters (``train``, ``training``, ``deterministic``, ...), or None.

    ``name`` forces the argument (``train_arg=``): its meaning is inverted for the names
    of :data:`EVAL_FLAGS`.
    """
    if name is not None:
        return Flag(name, name not in EVAL_FLAGS)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    for candidate in TRAIN_FLAGS:
        if candidate in params:
            return Flag(candidate, True)
    for candidate in EVAL_FLAGS:
        if candidate in params:
            return Flag(candidate, False)
    return None


@dataclass(frozen=True)
class BNRef:
    """A NormLayer handle: the layer's path, and (NNX) the ``nnx.BatchNorm`` object itself."""

    path: Path
    module: Any = None


# ---- NNX ---------------------------------------------------------------------------------
def _nnx():
    from flax import nnx

    return nnx


def nnx_modules(model: Any) -> Iterator[tuple[Path, Any]]:
    """Every sub-module of an NNX model with its path (shared modules once)."""
    return _nnx().iter_modules(model)


def _nnx_batchnorms(model: Any) -> tuple[list[tuple[Path, Any]], bool]:
    """The ``nnx.BatchNorm`` layers with their paths, and whether the model is set up for training.

    Training: some BatchNorm uses batch statistics, or some Dropout is on (one walk of the graph).
    """
    nnx = _nnx()
    found, training = [], False
    for path, m in nnx_modules(model):
        if isinstance(m, nnx.BatchNorm):
            found.append((path, m))
            training = training or m.use_running_average is False
        elif isinstance(m, nnx.Dropout) and m.deterministic is False and m.rate > 0:
            training = True
    return found, training


def is_frozen(bn: Any, model: Any) -> bool:
    """An ``nnx.BatchNorm`` is frozen when it uses its moving statistics while the model is in training mode.

    By the attributes alone; recalibrate and diagnose also see a call's ``use_running_average``.
    """
    return bn.use_running_average is True and _nnx_batchnorms(model)[1]


@dataclass
class NnxModel:
    """An NNX module and how to call it (its training flag, if its ``__call__`` takes one)."""

    module: Any
    flag: Flag | None = None
    #: Per BatchNorm path, the ``use_running_average`` its training-mode call passes (None: none); None: not traced.
    calls: dict[Path, bool | None] | None = None

    @property
    def name(self) -> str:
        return type(self.module).__name__

    def norm_layers(self) -> list[NormLayer]:
        batchnorms, training = _nnx_batchnorms(self.module)
        given = [(self.calls or {}).get(path) for path, _ in batchnorms]
        return [
            NormLayer(
                name=path_name(path) or type(bn).__name__, handle=BNRef(path, bn), kind=type(bn).__name__,
                channels=int(bn.num_features), eps=float(bn.epsilon), momentum=float(bn.momentum),
                frozen=bn.use_running_average is True and training if call is None else call,
            )
            for (path, bn), call in zip(batchnorms, given)
        ]

    def facts(self) -> ModelFacts:
        mods = [(path_name(p), type(m).__name__, m) for p, m in nnx_modules(self.module) if p]
        return ModelFacts(
            training_only=[n for n, kind, m in mods if is_training_only(kind) and getattr(m, "rate", 1) != 0],
            other_normalization=[n for n, kind, _ in mods if kind in OTHER_NORMALIZATION],
        )


# ---- Linen -------------------------------------------------------------------------------
@dataclass
class LinenLayer:
    """What the training-mode trace saw of one Linen BatchNorm (or another module of interest)."""

    path: Path
    kind: str
    channels: int = 0
    eps: float = 1e-5
    momentum: float | None = None
    frozen: bool = False


@dataclass
class LinenModel:
    """A Linen module with its variables (replaced, never modified, by a write) and its training flag."""

    module: Any
    variables: Mapping
    flag: Flag | None = None
    batchnorms: list[LinenLayer] = field(default_factory=list)
    others: list[LinenLayer] = field(default_factory=list)
    rng_collections: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return type(self.module).__name__

    @property
    def mutable(self) -> tuple[str, ...]:
        """Collections a training-mode call may update (never the parameters)."""
        return tuple(sorted({c for c in self.variables if c != "params"} | {"batch_stats"}))

    def norm_layers(self) -> list[NormLayer]:
        return [
            NormLayer(name=path_name(b.path) or b.kind, handle=BNRef(b.path), kind=b.kind, channels=b.channels, eps=b.eps,
                      momentum=b.momentum, frozen=b.frozen)
            for b in self.batchnorms
        ]

    def facts(self) -> ModelFacts:
        return ModelFacts(
            training_only=[path_name(o.path) for o in self.others if is_training_only(o.kind)],
            other_normalization=[path_name(o.path) for o in self.others if o.kind in OTHER_NORMALIZATION],
        )


def linen_stats(variables: Mapping) -> dict[Path, tuple[Any, Any]]:
    """``{path: (mean, var)}`` of every layer in ``variables["batch_stats"]``."""
    out: dict[Path, tuple[Any, Any]] = {}

    def walk(tree: Mapping, path: Path) -> None:
        if "mean" in tree and "var" in tree and not isinstance(tree["mean"], Mapping):
            out[path] = (tree["mean"], tree["var"])
            return
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))

    walk(variables.get("batch_stats", {}), ())
    return out


def replace_stats(variables: Mapping, updates: Mapping[Path, tuple[Any, Any]]) -> Mapping:
    """A new variables tree with ``batch_stats`` of the given paths replaced (the rest shared, nothing modified).

    A ``FrozenDict`` gives a ``FrozenDict``, a dict a dict.
    """

    def copy(tree: Any) -> Any:
        return {k: copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree

    from flax.core import FrozenDict, freeze

    out = {k: (copy(v) if k == "batch_stats" else v) for k, v in variables.items()}
    out.setdefault("batch_stats", {})
    for path, (mean, var) in updates.items():
        node = out["batch_stats"]
        for key in path:
            node = node.setdefault(key, {})
        node["mean"], node["var"] = mean, var
    return freeze(out) if isinstance(variables, FrozenDict) else out


# ---- both --------------------------------------------------------------------------------
def wrap(model: Any, *, train_arg: str | None = None) -> NnxModel | LinenModel:
    """The model to work on: an NNX module, or a Linen ``(module, variables)`` pair."""
    import flax.linen as nn

    nnx = _nnx()
    if isinstance(model, (NnxModel, LinenModel)):
        return model
    if isinstance(model, nnx.Module):
        return NnxModel(model, call_flag(type(model).__call__, train_arg))
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        module, variables = model
        if not isinstance(variables, Mapping) or "params" not in variables and "batch_stats" not in variables:
            raise ModelError("a Linen model is passed as (module, variables), where variables = module.init(...) "
                             f"holds 'params' and 'batch_stats'; got {type(variables).__name__} as variables.")
        flag = call_flag(module.__call__, train_arg)
        if flag is not None and train_arg is None and getattr(module, flag.name, None) is not None:
            flag = None  # set as an attribute (nn.BatchNorm(use_running_average=...)): Linen refuses it twice
        return LinenModel(module, variables, flag)
    if isinstance(model, nn.Module):
        raise ModelError("a Linen module holds no variables: pass (module, variables), e.g. "
                         "(model, {'params': state.params, 'batch_stats': state.batch_stats}).")
    raise ModelError(f"expected an flax.nnx.Module or a Linen (module, variables) pair, got {type(model).__name__}.")


def find_batchnorms(model: Any) -> list[tuple[str, Any]]:
    """The BatchNorm layers by path name: NNX ``nnx.BatchNorm`` objects; Linen ``{'mean', 'var'}`` of ``batch_stats``."""
    target = wrap(model)
    if isinstance(target, NnxModel):
        return [(path_name(p) or type(bn).__name__, bn) for p, bn in _nnx_batchnorms(target.module)[0]]
    return [(path_name(p), {"mean": m, "var": v}) for p, (m, v) in linen_stats(target.variables).items()]


def like(values: list[np.ndarray], olds: list[Any]) -> list[Any]:
    """Each value as a JAX array of the matching old array's dtype, in one transfer per placement.

    A value whose old array spans several devices gets its sharding (replicated statistics
    stay replicated); the others go to the default device, uncommitted, as initialized arrays are.
    """
    host = [np.asarray(v).astype(np.dtype(getattr(o, "dtype", np.float32))) for v, o in zip(values, olds)]
    spread = {i for i, o in enumerate(olds) if getattr(o, "sharding", None) is not None and len(o.sharding.device_set) > 1}
    local = [i for i in range(len(host)) if i not in spread]
    placed = dict(zip(local, jax.device_put([host[i] for i in local])))
    if spread:
        placed.update(zip(sorted(spread), jax.device_put([host[i] for i in sorted(spread)], [olds[i].sharding for i in sorted(spread)])))
    return [placed[i] for i in range(len(host))]
