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
the training-mode trace (the call's argument, else the attribute); a module that holds its mode
as a field (``Net(train=False)``, ``use_running_average=not self.train``) is traced as
``module.clone(train=True)``, so a layer the mode alone puts on its averages is not frozen.

Without moving statistics in use (``tracks_statistics=False``, status ``no-running-stats``, as
PyTorch's ``track_running_stats=False``): a BatchNorm on batch statistics in the model's
evaluation-mode call too (a second abstract trace, the flag False). NNX: the call passes
``use_running_average=False`` after ``model.eval()``; Linen, where the model has a training flag:
``use_running_average`` is False there (the call's argument, else the attribute:
``nn.BatchNorm(use_running_average=False)``). It runs on batch statistics in every mode and is
never written.

A subclass of ``BatchNorm`` is seen where its base class's ``__call__`` runs (``super().__call__``):
the call arguments, channels and statistics are those the base gets.

Statistics are handed to the engine flat, one vector per layer: a layer normalizing over several
feature axes (``BatchNorm(axis=(1, 2))``) or stacked by a lifted transform (``nn.scan``/``nn.vmap``,
``nnx.vmap``-created layers) has ``mean.size`` channels, in the variable's C order, and a write
gives each vector the variable's shape back.
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
    """The model's own training mode: its name, whether True means training, and whether it is a
    field of the (Linen) module (``Net(train=False)``: the mode is set by ``module.clone(train=...)``)
    rather than a call argument."""

    name: str
    training_when_true: bool
    attribute: bool = False

    def kwargs(self, training: bool) -> dict[str, bool]:
        return {self.name: training if self.training_when_true else not training}


def field_flag(module: Any, name: str | None = None) -> Flag | None:
    """A boolean dataclass field of a Linen module that sets its mode (``train``, ``deterministic``, ...), or None.

    ``name`` forces the field (``train_arg=``); otherwise the first of :data:`TRAIN_FLAGS`, then
    :data:`EVAL_FLAGS`, that the module holds as a ``bool``.
    """
    import dataclasses

    fields = {f.name for f in dataclasses.fields(module)} if dataclasses.is_dataclass(module) else set()
    for candidate in (name,) if name is not None else TRAIN_FLAGS + EVAL_FLAGS:
        if candidate in fields and isinstance(getattr(module, candidate, None), bool):
            return Flag(candidate, candidate not in EVAL_FLAGS, attribute=True)
    return None


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
    #: BatchNorm paths whose evaluation-mode call passes ``use_running_average=False``: no moving statistics in use.
    always_batch: tuple[Path, ...] = ()
    #: How the model changes its input before its first Conv/Linear/Embed (None: passes it as it is, or not known).
    input_transform: str | None = None

    @property
    def name(self) -> str:
        return type(self.module).__name__

    def norm_layers(self) -> list[NormLayer]:
        batchnorms, training = _nnx_batchnorms(self.module)
        given = [(self.calls or {}).get(path) for path, _ in batchnorms]
        return [
            NormLayer(
                name=path_name(path) or type(bn).__name__, handle=BNRef(path, bn),
                kind=stacked_kind(type(bn).__name__, _size(bn.mean) // max(int(bn.num_features), 1)),
                channels=_size(bn.mean), eps=float(bn.epsilon), momentum=float(bn.momentum),
                frozen=bn.use_running_average is True and training if call is None else call,
                tracks_statistics=path not in self.always_batch,
            )
            for (path, bn), call in zip(batchnorms, given)
        ]

    def facts(self) -> ModelFacts:
        mods = [(path_name(p), type(m).__name__, m) for p, m in nnx_modules(self.module) if p]
        return ModelFacts(
            training_only=[n for n, kind, m in mods if is_training_only(kind) and getattr(m, "rate", 1) != 0],
            other_normalization=[n for n, kind, _ in mods if kind in OTHER_NORMALIZATION],
            input_transforms=[self.input_transform] if self.input_transform else [],
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
    #: False where the evaluation-mode call runs it on batch statistics too.
    tracks_statistics: bool = True


@dataclass
class LinenModel:
    """A Linen module with its variables (replaced, never modified, by a write) and its training flag."""

    module: Any
    variables: Mapping
    flag: Flag | None = None
    batchnorms: list[LinenLayer] = field(default_factory=list)
    others: list[LinenLayer] = field(default_factory=list)
    rng_collections: tuple[str, ...] = ()
    #: How the model changes its input before its first Conv/Dense/Embed (None: passes it as it is, or not known).
    input_transform: str | None = None

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
                      momentum=b.momentum, frozen=b.frozen, tracks_statistics=b.tracks_statistics)
            for b in self.batchnorms
        ]

    def facts(self) -> ModelFacts:
        return ModelFacts(
            training_only=[path_name(o.path) for o in self.others if is_training_only(o.kind)],
            other_normalization=[path_name(o.path) for o in self.others if o.kind in OTHER_NORMALIZATION],
            input_transforms=[self.input_transform] if self.input_transform else [],
        )


def linen_call(module: Any, flag: Flag | None, training: bool) -> tuple[Any, dict[str, bool]]:
    """The Linen module and call arguments for one mode: the flag as a call argument, or a clone with the flag field set."""
    if flag is None:
        return module, {}
    if flag.attribute:
        return module.clone(**flag.kwargs(training)), {}
    return module, flag.kwargs(training)


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

    Every subtree keeps its container type (a ``FrozenDict`` stays a ``FrozenDict``, a dict a
    dict, at any depth), so a TrainState holding the new tree has the old one's treedef.
    """

    def copy(tree: Any) -> Any:
        return {k: copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree

    def restore(tree: Any, like: Any) -> Any:
        if not isinstance(tree, dict):
            return tree
        out = {k: restore(v, like.get(k) if isinstance(like, Mapping) else None) for k, v in tree.items()}
        return _same_type(like, out) if isinstance(like, Mapping) and type(like) is not dict else out

    stats = copy(variables.get("batch_stats", {}))
    for path, (mean, var) in updates.items():
        node = stats
        for key in path:
            node = node.setdefault(key, {})
        node["mean"], node["var"] = mean, var
    out = {k: v for k, v in variables.items()}
    out["batch_stats"] = restore(stats, variables.get("batch_stats"))
    return _same_type(variables, out) if type(variables) is not dict else out


def _same_type(like: Mapping, items: dict) -> Mapping:
    """``items`` in ``like``'s Mapping type (a FrozenDict, a dict, a subclass), else a dict."""
    try:
        return type(like)(items)
    except Exception:  # a Mapping type that cannot be built from a dict
        return items


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
        if flag is not None and getattr(module, flag.name, None) is not None:
            flag = field_flag(module, flag.name)  # also set as a field (Linen refuses it twice): by clone, if a bool
        elif flag is None or train_arg is not None and not _call_parameter(module, train_arg):
            flag = field_flag(module, train_arg) or flag  # the mode as a field: Net(train=False)
        return LinenModel(module, variables, flag)
    if isinstance(model, nn.Module):
        raise ModelError("a Linen module holds no variables: pass (module, variables), e.g. "
                         "(model, {'params': state.params, 'batch_stats': state.batch_stats}).")
    raise ModelError(f"expected an flax.nnx.Module or a Linen (module, variables) pair, got {type(model).__name__}.")


def _call_parameter(module: Any, name: str) -> bool:
    try:
        return name in inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        return False


def find_batchnorms(model: Any) -> list[tuple[str, Any]]:
    """The BatchNorm layers by path name: NNX ``nnx.BatchNorm`` objects; Linen ``{'mean', 'var'}`` of ``batch_stats``."""
    target = wrap(model)
    if isinstance(target, NnxModel):
        return [(path_name(p) or type(bn).__name__, bn) for p, bn in _nnx_batchnorms(target.module)[0]]
    return [(path_name(p), {"mean": m, "var": v}) for p, (m, v) in linen_stats(target.variables).items()]


def _size(variable: Any) -> int:
    """The number of values of an NNX Variable (a stacked layer's: every layer's)."""
    return int(np.size(variable.get_value()))


def stacked_kind(kind: str, stacked: int) -> str:
    """A layer's kind, with how many layers a lifted transform stacks into its variables (``BatchNorm (x3 stacked)``)."""
    return kind if stacked <= 1 else f"{kind} (x{stacked} stacked)"


def flat(value: Any) -> np.ndarray:
    """Statistics as the engine's float64 vector (several feature axes, stacked layers: C order)."""
    return np.asarray(value, dtype=np.float64).reshape(-1)


def like(values: list[np.ndarray], olds: list[Any]) -> list[Any]:
    """Each value as a JAX array of the matching old array's dtype and shape, in one transfer per placement.

    A flat vector takes the old array's shape (several feature axes, stacked layers); a value
    without an old array stays as it is.

    A value whose old array spans several devices gets its sharding (replicated statistics
    stay replicated); the others go to the default device, uncommitted, as initialized arrays are.
    """
    host = [np.asarray(v).astype(np.dtype(getattr(o, "dtype", np.float32))) for v, o in zip(values, olds)]
    host = [h.reshape(np.shape(o)) if o is not None and h.size == np.size(o) else h for h, o in zip(host, olds)]
    spread = {i for i, o in enumerate(olds) if getattr(o, "sharding", None) is not None and len(o.sharding.device_set) > 1}
    local = [i for i in range(len(host)) if i not in spread]
    placed = dict(zip(local, jax.device_put([host[i] for i in local])))
    if spread:
        placed.update(zip(sorted(spread), jax.device_put([host[i] for i in sorted(spread)], [olds[i].sharding for i in sorted(spread)])))
    return [placed[i] for i in range(len(host))]
