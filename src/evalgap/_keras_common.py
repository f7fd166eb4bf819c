"""What the Keras 3 (``evalgap.keras``) and Keras 2 (``evalgap.tf_keras``) adapters share.

Both Keras versions have the same layer tree (``_flatten_layers``), the same compile-time
metric objects (``from_config``/``get_config``) and the same distribution attribute, so these
helpers are written once; each adapter passes in what differs (its ``Metric`` class, its loss
classes). Framework-free: nothing here imports Keras.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
import types
from typing import Any, Callable, Iterator

import numpy as np

from .engine import ModelFacts, is_training_only, scale_changed, tree_leaves, value_summary

#: Per-sample normalization layers: the same in both modes.
NON_BN_NORMALIZATION = ("LayerNormalization", "GroupNormalization", "UnitNormalization", "RMSNormalization")


#: Layers through which the model transforms its own inputs (rescales, normalizes, embeds or looks them up):
#: the raw inputs' scale then says nothing about what reaches the first BatchNorm.
INPUT_TRANSFORMS = ("Rescaling", "Normalization", "Embedding", "CategoryEncoding", "StringLookup", "IntegerLookup",
                    "Hashing", "TextVectorization", "Discretization")


#: Layers that read the input's values first in most models, by class name in the layer's MRO (Keras 3 and Keras 2):
#: the input-scale finding is about what reaches them (:func:`received_range`).
FIRST_LAYERS = frozenset({"BaseConv", "BaseDepthwiseConv", "BaseSeparableConv", "BaseConvTranspose", "Conv", "Dense",
                          "EinsumDense", "BatchNormalization", "BatchNormalizationBase", "LayerNormalization",
                          "GroupNormalization", "RNN"})


#: Keras's own layers whose call takes ``training`` but computes the same in both modes (containers and
#: wrappers hand it to their sublayers, which are looked at themselves).
MODE_INERT = ("Functional", "Sequential", "InputLayer", "Dense", "EinsumDense", "Resizing", "CenterCrop", "TimeDistributed",
              "Bidirectional")


_OWN_CODE = itertools.count()


def traced_alone(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` behind a code object of its own, to give to ``tf.function``.

    TensorFlow counts the traces of all functions with the same code together and, past five,
    warns of a function "re-traced in a loop". evalgap's compiled steps are one per model, pass
    and mode, each traced once or twice (a ragged last batch), so across modes and models they
    would add up to that warning; each gets a code object named ``evalgap_<name>_<n>``."""

    def step(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    step.__code__ = step.__code__.replace(co_name=f"evalgap_{name}_{next(_OWN_CODE)}")
    return step


def by_dtype(values: Any) -> dict[Any, list[int]]:
    """Indices of ``values`` grouped by dtype (the arrays' own dtype objects: NumPy's, TensorFlow's, torch's, all
    hashable), in first-seen order: what bulk transfers concatenate together."""
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v.dtype, []).append(i)
    return groups


def mode_dependent(layer: Any) -> bool:
    """Whether a layer's output may depend on the training flag (BatchNorm and training-only layers are
    counted apart): its call takes ``training`` and it is user code, or one of Keras's own layers not known
    to ignore it (a dropout rate above 0, a preprocessing layer)."""
    takes = getattr(layer, "_call_has_training_arg", None)
    if not (getattr(layer, "_expects_training_arg", False) if takes is None else takes):
        return False
    names = [c.__name__ for c in type(layer).__mro__]
    if "BatchNormalization" in names or is_training_only(names[0]):
        return False
    if not type(layer).__module__.startswith(("keras.", "tf_keras.")):
        return True  # the user's own call(..., training): it may branch on it
    if names[0] in MODE_INERT:
        return False
    try:
        config = layer.get_config()
    except Exception:  # pragma: no cover - a layer without a config
        return True
    rates = [v for k, v in config.items() if "dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return not rates or any(rates)


def walk(model: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every sub-layer with a path name (``outer/inner/layer``), depth first, each once."""
    seen: set[int] = set()

    def visit(layer, path):
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{path}/{child.name}" if path else child.name
            yield name, child
            yield from visit(child, name)

    yield from visit(model, prefix)


def replicas(model: Any) -> int:
    """Replicas of the model's ``tf.distribute`` strategy (1 without one)."""
    strategy = getattr(model, "distribute_strategy", None)
    try:
        return int(getattr(strategy, "num_replicas_in_sync", 1) or 1)
    except Exception:  # pragma: no cover - strategy objects vary
        return 1


def facts(model: Any, bns: list[tuple[str, Any]], first_inputs: Any = None,
          to_numpy: Callable[[Any], np.ndarray] = np.asarray) -> ModelFacts:
    """Training-only layers, per-sample normalization, replicas, synchronized BN and input transforms of a Keras model:
    layers of the classes in :data:`INPUT_TRANSFORMS`, else, given the first batch's inputs, what its first layer
    receives (:func:`received_range`)."""
    layers = list(walk(model))
    transforms = [name for name, layer in layers if any(c.__name__ in INPUT_TRANSFORMS for c in type(layer).__mro__)]
    if not transforms and first_inputs is not None:
        transforms = received_range(model, first_inputs, to_numpy)
    return ModelFacts(
        training_only=[name for name, layer in layers if is_training_only(type(layer).__name__)],
        other_normalization=[name for name, layer in layers if type(layer).__name__ in NON_BN_NORMALIZATION],
        replicas=replicas(model),
        synchronized=bool(bns) and all(getattr(bn, "synchronized", False) for _, bn in bns),
        input_transforms=transforms,
        mode_dependent=[name for name, layer in [(model.name, model), *layers] if mode_dependent(layer)],
        input_channel_axis=input_channel_axis(layers),
        notes=_replica_copies_note(bns),
    )


def repeats_forever(data: Any) -> bool:
    """A ``tf.data.Dataset`` whose cardinality is infinite (``.repeat()`` without a count); TensorFlow is looked up,
    never imported (data of no other kind repeat forever so)."""
    tf = sys.modules.get("tensorflow")
    cardinality = getattr(data, "cardinality", None)
    if tf is None or cardinality is None or not hasattr(data, "element_spec"):
        return False
    try:
        return int(cardinality()) == int(tf.data.INFINITE_CARDINALITY)
    except Exception:  # not TensorFlow's
        return False


def adds_own_loss(predictor: Callable[..., Any], model: Any, inputs: Any) -> bool:
    """Whether the model's layers add a loss that depends on its inputs (``add_loss``, an endpoint layer reading its
    targets from the inputs), not only weight regularization, which is the same for any input: the losses of the
    first sample and of the second, each one inference-mode call through an adapter's cached E step
    (``predictor(model, "E")``; no variable is assigned), differ. One sample: any loss counts."""
    from .engine import Batch, tree_leaves, tree_map

    count = int(tree_leaves(inputs)[0].shape[0])
    totals = []
    with predictor(model, "E") as run:
        for start in range(min(count, 2)):
            _, losses = run(Batch(tree_map(lambda a, s=start: a[s:s + 1], inputs), size=1))
            if not losses:
                return False
            totals.append(float(np.sum([np.asarray(loss, dtype=np.float64) for loss in losses])))
    return len(totals) == 1 or totals[0] != totals[1]


def user_metrics(container: Any) -> list:
    """The metrics a model was compiled with (Keras 3 ``CompileMetrics``, Keras 2 ``MetricsContainer``), weighted
    ones too, flattened; [] for None."""
    if container is None:
        return []
    return tree_leaves([getattr(container, "_user_metrics", None), getattr(container, "_user_weighted_metrics", None)])


def distributed_copies(variable: Any) -> tuple | None:
    """The per-replica components of a ``tf.distribute`` variable (Keras 3 wraps it: ``.value`` is the tf variable,
    a property there, a method on tf's), or None where it has fewer than two."""
    inner = getattr(variable, "value", variable)
    copies = getattr(variable if callable(inner) else inner, "values", None)
    return copies if isinstance(copies, tuple) and len(copies) >= 2 else None


def _largest_copy_difference(bns: list[tuple[str, Any]]) -> tuple[float, str | None]:
    """The largest absolute difference between replicas' copies of a moving statistic, and where it is."""
    worst, where = 0.0, None
    for name, bn in bns:
        for attr in ("moving_mean", "moving_variance"):
            copies = distributed_copies(getattr(bn, attr, None))
            if copies is None:
                continue
            try:
                arrays = [np.asarray(c.numpy(), dtype=np.float64) for c in copies]
            except Exception:  # pragma: no cover - a copy that cannot be read here
                continue
            spread = float(max(np.max(np.abs(a - arrays[0])) for a in arrays[1:]))
            if spread > worst:
                worst, where = spread, f"{name}.{attr}"
    return worst, where


def copies_differ(bns: list[tuple[str, Any]]) -> bool:
    """Whether the replicas hold different copies of any BatchNorm layer's moving statistics."""
    return _largest_copy_difference(bns)[0] > 0.0


class _Reached(BaseException):  # not an Exception: a user's ``except Exception`` in a call does not swallow it
    pass


@contextlib.contextmanager
def calls_replaced(replacements: list[tuple[Any, Callable[..., Any]]]) -> Iterator[None]:
    """Each layer's ``call`` replaced on the instance by the given function (Keras's ``__call__`` reaches it), and put
    back on exit, normal or not, as it was: removed, or the instance-level ``call`` someone had set before."""
    missing = object()
    saved = [(layer, vars(layer).get("call", missing)) for layer, _ in replacements]
    try:
        for layer, fn in replacements:
            object.__setattr__(layer, "call", fn)
        yield
    finally:
        for layer, before in reversed(saved):
            if before is missing:
                if "call" in vars(layer):
                    object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", before)


def inference_only(model: Any, bns: list, cache: Any, trace: Callable[[list[tuple[Any, Callable[..., Any]]]], None],
                   identity: Callable[[Any], Any] = lambda t: t, wrap: Callable[[Any], Any] = lambda f: f) -> frozenset[int]:
    """Ids of the BN layers ``bns`` that receive ``training=False`` in every call of a training-mode forward (a
    backbone called as ``base(x, training=False)``): fit runs them in inference mode, as frozen layers; cached per
    model in ``cache`` (a weak dict: model -> (number of layers, ids)). ``trace(replacements)`` runs one
    training-mode forward with each layer's ``call`` replaced by its recorder (``wrap``-ped), the identity
    (``identity``) that records the ``training`` it receives; what it raises propagates."""
    cached = cache.get(model)
    if cached is not None and cached[0] == len(bns):
        return cached[1]
    received: dict[int, list[Any]] = {id(bn): [] for bn in bns}

    def recorder(bn: Any) -> Callable[..., Any]:
        def call(inputs, training=None, mask=None, **kwargs):
            received[id(bn)].append(training)
            return identity(inputs)

        return wrap(call)

    trace([(bn, recorder(bn)) for bn in bns])
    found = frozenset(i for i, values in received.items()
                      if values and all(v is False or (isinstance(v, int) and not isinstance(v, bool) and v == 0) for v in values))
    cache[model] = (len(bns), found)
    return found


def received_range(model: Any, inputs: Any, to_numpy: Callable[[Any], np.ndarray]) -> list[str]:
    """Where the model changes its input's scale before its first layer (a convolution, Dense, BatchNormalization,
    RNN or LayerNormalization layer, the first one called), in code no layer class names: a
    ``Lambda(preprocess_input)``, ``preprocess_input(inputs)`` on the Keras tensor (ops nodes), ids one-hot encoded
    in a ``Lambda``, arithmetic in a subclass's ``call``. ``["conv1 receives values in [a, b], the input [c, d]"]``,
    or ``[]`` where that layer receives the input's scale (:func:`evalgap.engine.scale_changed`) or where this cannot
    be told (the input is not one array of numbers, no such layer, the call fails). One eager call of the first
    batch in inference mode (which assigns no variable), stopped where that layer is reached: the candidate layers'
    ``call`` is replaced on the instance for that call (:func:`calls_replaced`)."""
    if isinstance(inputs, (dict, list, tuple)):
        return []
    try:
        x = np.asarray(to_numpy(inputs))
    except Exception:  # pragma: no cover - an input that is not an array
        return []
    if x.size == 0 or x.dtype.kind not in "iuf":
        return []
    candidates = [(name, layer) for name, layer in walk(model) if FIRST_LAYERS & {c.__name__ for c in type(layer).__mro__}]
    seen: list[tuple[str, Any]] = []

    def stop(name: str) -> Callable[..., Any]:
        def call(*args, **kwargs):
            seen.append((name, args[0] if args else next(iter(kwargs.values()), None)))
            raise _Reached

        return call

    try:
        with calls_replaced([(layer, stop(name)) for name, layer in candidates]):
            model(inputs, training=False)
    except _Reached:
        pass
    except Exception:
        return []
    if not seen:
        return []
    name, got = seen[0]
    try:
        got = np.asarray(to_numpy(got), dtype=np.float64)
    except Exception:
        return []
    if got.size == 0 or not (np.all(np.isfinite(got)) and np.all(np.isfinite(x))):
        return []
    given, received = value_summary(x), value_summary(got)
    if not scale_changed(given, received):
        return []
    return [f"{name} receives values in [{received[0]:.3g}, {received[1]:.3g}], the input [{given[0]:.3g}, {given[1]:.3g}]"]


def _replica_copies_note(bns: list[tuple[str, Any]]) -> list[str]:
    """Under a ``tf.distribute`` strategy, BatchNorm layers that are not synchronized keep one copy of their moving
    statistics per replica, each updated from its own share of the batches in ``fit``. ``evaluate``, and diagnose's
    E with it (:func:`per_replica`), normalize each replica's share of a batch with its own copy; P, T and the drift
    table use one set: the note says how far apart the copies are."""
    worst, where = _largest_copy_difference(bns)
    if where is None or worst <= 1e-6:
        return []
    return [f"the replicas hold different copies of the moving statistics (largest difference {worst:.3g}, {where}): "
            "evaluate, and E with it, normalize each replica's share of a batch with its own copy, while the drift "
            "table reads one set; recalibrate writes one exact set to every replica."]


def replica_shares(size: int, replicas: int) -> list[slice]:
    """How ``tf.distribute`` splits a global batch of ``size`` samples among ``replicas`` (``evaluate`` under a
    MirroredStrategy): ``ceil(size / replicas)`` samples each, in order, so the last replicas may get fewer or none."""
    each = -(-size // replicas)
    return [slice(min(r * each, size), min((r + 1) * each, size)) for r in range(replicas)]


def training_shares(model: Any, bns: list) -> int:
    """Into how many shares ``fit`` splits each of this process's batches for training mode: the local replicas of the
    model's ``tf.distribute`` strategy (a MirroredStrategy's devices, a worker's under MultiWorkerMirroredStrategy),
    each normalizing its ``ceil(b / replicas)`` samples (:func:`replica_shares`) by their own batch statistics; 1
    without a strategy, or where every BatchNorm layer is synchronized (normalizing the whole batch)."""
    if replicas(model) < 2:
        return 1
    try:
        local = len(model.distribute_strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):  # the default strategy has no worker devices to list
        return 1
    if local <= 1 or (bns and all(getattr(bn, "synchronized", False) for bn in bns)):
        return 1
    return local


def per_replica(step: Callable[[Any, Any], tuple], inputs: Any, size: int, copies: list[Any]) -> tuple:
    """``step(inputs, values) -> (y_pred, losses, marks)`` on each replica's share of a batch (:func:`replica_shares`)
    with that replica's ``copies[r]`` of the variables, as ``evaluate`` runs it under a MirroredStrategy: the outputs
    and their marks (:func:`output_marks`) concatenated in sample order, each model loss (``add_loss``) the shares'
    mean weighted by their size, as ``evaluate`` weights each replica's total loss. The training-mode passes run the
    same split with one set of values per share (:func:`training_shares`). TensorFlow only (the strategy's
    framework)."""
    import tensorflow as tf

    size = size or int(tf.shape(tf.nest.flatten(inputs)[0])[0])
    parts = []
    for share, values in zip(replica_shares(size, len(copies)), copies):
        if share.stop > share.start:
            parts.append((share.stop - share.start, step(tf.nest.map_structure(lambda a, s=share: a[s], inputs), values)))
    if len(parts) == 1:
        return parts[0][1]
    y_pred = tf.nest.map_structure(lambda *a: tf.concat(a, 0), *[out[0] for _, out in parts])
    losses = [tf.add_n([out[1][i] * (n / size) for n, out in parts]) for i in range(len(parts[0][1][1]))]
    marks = [None if any(out[2][i] is None for _, out in parts) else tf.concat([out[2][i] for _, out in parts], 0)
             for i in range(len(parts[0][1][2]))]
    return y_pred, losses, marks


def input_channel_axis(layers: list[tuple[str, Any]]) -> int | None:
    """1 when the first layer that has a ``data_format`` (a convolution, a pooling) reads channels first, -1 when
    it reads them last, None without one (features on the last axis, the adapter's default)."""
    for _, layer in layers:
        fmt = getattr(layer, "data_format", None)
        if fmt in ("channels_first", "channels_last"):
            return 1 if fmt == "channels_first" else -1
    return None


def ignored_labels(*specs: Any) -> set[int]:
    """The ``ignore_class`` values of the losses and metrics in ``specs`` (nested as compiled): labels
    that the model's own loss and metrics skip, so no label check may refuse them."""
    out = set()
    for obj in tree_leaves(list(specs)):
        value = getattr(obj, "ignore_class", None)
        if value is None:
            value = (getattr(obj, "_fn_kwargs", None) or {}).get("ignore_class")
        if value is not None:
            out.add(int(value))
    return out


#: Keras's own losses and metrics that read their targets as class indices, by the name of their class or function
#: (or the function a wrapper calls), lower case without underscores; Keras 2's sparse accuracies wrap ``*_matches``.
CLASS_INDEX_READERS = frozenset({"sparsecategoricalcrossentropy", "sparsecategoricalaccuracy", "sparsetopkcategoricalaccuracy",
                                 "sparsecategoricalmatches", "sparsetopkcategoricalmatches"})


def _plain(name: str) -> str:
    return name.lower().replace("_", "")


def _keras_own(obj: Any) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] in ("keras", "tf_keras", "tensorflow")


def reads_class_indices(obj: Any) -> bool:
    """Whether one compiled loss or metric, in any form ``compile`` takes (a name, a function, an object), is one of
    Keras's own that read the targets as class indices: the sparse categorical cross-entropy, sparse (top-k)
    categorical accuracy, a Keras wrapper around one of their functions (``fn``, ``_fn``), and IoU metrics with
    ``sparse_y_true``. A user's loss or metric (a subclass of Keras's too) may read integer targets as anything (counts,
    a void label its own code skips), and Keras's generic ``"accuracy"`` takes the targets in the form they come: no."""
    if isinstance(obj, str):
        return _plain(obj) in CLASS_INDEX_READERS
    if isinstance(obj, functools.partial):
        return reads_class_indices(obj.func)
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
        return _keras_own(obj) and _plain(obj.__name__) in CLASS_INDEX_READERS
    if isinstance(obj, type) or not _keras_own(type(obj)):
        return False
    return (_plain(type(obj).__name__) in CLASS_INDEX_READERS or getattr(obj, "sparse_y_true", None) is True
            or any(reads_class_indices(getattr(obj, attr, None)) for attr in ("fn", "_fn")))


def label_classes(pred: Any, *specs: Any) -> int | None:
    """The number of classes a single output's integer targets are checked against (:func:`check_class_indices`):
    its last axis (> 1) where a loss or metric in ``specs`` (nested as compiled) reads its targets as class indices
    (:func:`reads_class_indices`); None otherwise: a user's loss and metrics get the targets as they are, as
    ``evaluate`` gives them, and a model of several outputs is not checked."""
    shape = getattr(pred, "shape", None)
    if shape is None or len(shape) < 2 or not shape[-1] or shape[-1] <= 1:
        return None
    return int(shape[-1]) if any(reads_class_indices(obj) for obj in tree_leaves(list(specs))) else None


def check_class_indices(y: Any, pred: Any, classes: int | None, ignored: set[int], to_numpy: Callable[[Any], np.ndarray]) -> None:
    """:func:`evalgap._checks.check_labels` on one batch's targets, given the classes of :func:`label_classes`:
    where they are one array of class indices as Keras's sparse losses take them, shaped like the output without its
    class axis or with an axis of 1 there. A tensor (a batch given as tensors) is read with ``to_numpy``, so the check
    is the same for every kind of data. Out-of-range labels are a DataError, not NaN or an op error in the loss."""
    from ._checks import check_labels

    if not classes or isinstance(y, (dict, list, tuple)) or getattr(y, "shape", None) is None:
        return
    shape, out = tuple(y.shape), tuple(pred.shape)
    if not (len(shape) == len(out) - 1 or (len(shape) == len(out) and shape and shape[-1] == 1)) or None in shape:
        return  # one-hot or soft targets; a ragged tensor
    if not isinstance(y, np.ndarray):
        try:
            y = to_numpy(y)
        except Exception:  # not one dense array (a tf.SparseTensor): the loss reads it as it is
            return
    check_labels(y, classes, ignored)


def metric_copies(spec: Any, metric_class: type, borrowed: list) -> Any:
    """``spec`` (metrics as compiled: nested lists and dicts) with every Keras Metric re-created from its config.

    Only Keras's own classes say all their constructor arguments in ``get_config``; a custom Metric (or one
    whose re-creation fails) is appended to ``borrowed`` and used as it is, the caller resetting it for each
    mode and putting its state back afterwards: a custom ``__init__(self, threshold=0.5)`` without
    ``get_config`` would come back with its defaults. (``copy.deepcopy`` goes through the config too.)"""
    if isinstance(spec, dict):
        return {k: metric_copies(v, metric_class, borrowed) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(metric_copies(v, metric_class, borrowed) for v in spec)
    if isinstance(spec, metric_class):
        if type(spec).__module__.split(".")[0] in ("keras", "tf_keras"):
            try:
                return type(spec).from_config(spec.get_config())
            except Exception:
                pass
        if not any(m is spec for m in borrowed):
            borrowed.append(spec)
        return spec
    return spec


def unique(items: Any) -> list:
    """The items in their order, each object once (a metric variable may be tracked by two containers)."""
    seen: set[int] = set()
    return [v for v in items if not (id(v) in seen or seen.add(id(v)))]


def sum_over_workers(variables: list, collective: Any, read: Callable[[Any], np.ndarray],
                     assign: Callable[[Any, np.ndarray], None]) -> None:
    """Every worker's metric state combined in place, as Keras combines a metric variable's replicas under
    ``tf.distribute``: by its ``aggregation``, summed over the workers (``"sum"``, the default of every Keras metric:
    totals, counts, confusion counts, AUC's histograms), averaged (``"mean"``) or the chief's
    (``"only_first_replica"``). A metric's result from the combined state is the metric over the union of the
    workers' data (an AUC too, which an average of the workers' AUCs is not). Collective: every worker calls it
    with the same metrics, once per state. Side effect: ``variables`` hold the combined values."""
    if collective is None or not variables:
        return
    values = [np.asarray(read(v), dtype=np.float64) for v in variables]
    flat = np.concatenate([a.ravel() for a in values])
    how = [str(getattr(v, "aggregation", "sum")).lower() for v in variables]
    summed = np.asarray(collective.sum(flat))
    first = np.asarray(collective.broadcast(flat)) if any("first" in h for h in how) else None
    start = 0
    for v, a, h in zip(variables, values, how):
        part = slice(start, start + a.size)
        start += a.size
        combined = first[part] if "first" in h else summed[part] / collective.world if "mean" in h else summed[part]
        assign(v, combined.reshape(a.shape))


def one_number_results(values: dict[str, Any], spec: Any) -> dict[str, float]:
    """The results that are one number each, as floats. A metric that gives several (per class, per threshold)
    is left out, with its reason and fix in ``spec.notes`` and ``spec.left_out``; the others are measured."""
    out: dict[str, float] = {}
    for name, value in values.items():
        a = np.asarray(value)
        if a.size == 1:
            out[name] = float(a.reshape(()))
            continue
        why = (f"metric {name!r} gives {a.size} values (shape {tuple(a.shape)}), not one number, so it is left out of the "
               "diagnosis (the loss and the other metrics are measured). To diagnose it, compile it to give one number: "
               "F1Score/FBetaScore(average='macro') (or 'micro', 'weighted') instead of average=None, Precision/Recall "
               "with one threshold (thresholds=0.5, not a list), or one class (class_id=...).")
        spec.left_out.setdefault(name, why)
        if why not in spec.notes:
            spec.notes.append(why)
    return out


def overrides(model: Any, method: str) -> bool:
    """Whether ``type(model)`` defines ``method`` outside Keras (``keras``, ``tf_keras``): a user's subclass."""
    owner = next((c for c in type(model).__mro__ if method in vars(c)), None)
    return owner is not None and owner.__module__.split(".")[0] not in ("keras", "tf_keras")


def test_step_note(model: Any) -> str:
    return (f"{type(model).__name__} overrides test_step: evaluate runs that code and may differ from E, which is the "
            "compiled loss and metrics as Keras's own test_step computes them.")


def classifier_defaults(y: Any, pred: np.ndarray, sparse: Callable[..., Any], categorical: Callable[..., Any], error: type) -> tuple[Any, list[str]]:
    """What an uncompiled classifier is measured with: cross-entropy (from logits unless the outputs are
    probabilities) and accuracy; ``error`` is raised for anything that is not class scores."""
    p = np.asarray(pred)
    y = None if y is None else np.asarray(y)
    if y is None or p.ndim < 2 or p.shape[-1] < 2 or not (np.issubdtype(y.dtype, np.integer) or y.shape == p.shape):
        raise error(
            "the model is not compiled and its outputs are not class scores: compile it with its training loss and "
            "metrics (model.compile(loss=..., metrics=[...])) so that diagnose can measure them."
        )
    probs = bool(np.all(p >= 0) and np.allclose(p.sum(-1), 1.0, atol=1e-3))
    loss = categorical if y.shape == p.shape else sparse
    return loss(from_logits=not probs), ["accuracy"]


def reshuffles_each_iteration(data: Any) -> bool:
    """A ``tf.data.Dataset`` with a ``shuffle`` that reshuffles on every iteration anywhere in its pipeline.

    Each iteration of such a dataset advances its shuffle's seed, so a pass over the very object
    ``fit`` trains on changes the batch order of fit's later epochs. Read from the pipeline's
    attributes (``_inputs()``, ``_reshuffle_each_iteration``); nothing is imported or iterated.
    """
    seen: set[int] = set()
    stack = [data]
    while stack:
        d = stack.pop()
        if id(d) in seen or not hasattr(d, "element_spec"):
            continue
        seen.add(id(d))
        if "Shuffle" in type(d).__name__ and getattr(d, "_reshuffle_each_iteration", False):
            return True
        try:
            stack.extend(d._inputs())
        except Exception:  # not a tf.data pipeline we can walk
            pass
    return False


def reshuffle_warning(who: str) -> str:
    return (f"{who}: this tf.data.Dataset reshuffles on every iteration. If fit trains on this same Dataset object, "
            f"each of {who}'s passes advances its shuffle seed, so fit's later epochs draw another batch order than they "
            "would without the callback (the model itself is not touched). To leave training exactly as it is, give "
            f"{who} the same pipeline built a second time (its own seed), or arrays with batch_size=. (A second build "
            "reads the same here: if that is what you passed, all is well; logger 'evalgap' carries this warning.)")


def check_batched(model: Any, inputs: Any) -> None:
    """A ``DataError`` when a one-input model's batches are shaped like one of its samples, as an
    unbatched ``tf.data.Dataset`` gives them (before a pass fails on the shapes). A batch that only
    lacks a trailing axis of size 1 (``(n,)`` for ``Input((1,))``) is fine: Keras adds it."""
    from .errors import DataError

    try:
        specs = list(model.inputs)
    except Exception:  # a subclassed model, or a Sequential without an Input: no declared shape
        return
    leaves = [leaf for leaf in tree_leaves(inputs) if hasattr(leaf, "shape")]
    if len(specs) != 1 or len(leaves) != 1:
        return
    expected, given = tuple(specs[0].shape), tuple(leaves[0].shape)
    if not given:  # not an array of samples (a tf.distribute PerReplica value): Keras's own data path checks it
        return
    per_sample = expected[1:]  # a batch shaped like one sample (Keras itself adds a missing trailing axis of 1)
    if len(given) == len(per_sample) and all(e is None or int(e) == int(g) for e, g in zip(per_sample, given)):
        raise DataError(
            f"the model takes inputs of shape {expected}, but the data's batches hold inputs of shape {given}: one "
            "dimension short, as an unbatched tf.data.Dataset gives. Call .batch(batch_size) on it (fit's batch size)."
        )
    if len(given) == len(expected) - 1 and expected[-1] == 1:  # (n,) for Input((1,)): Keras adds the axis
        given = (*given, 1)
    elif len(given) == len(expected) + 1 and given[-1] == 1:  # (n, 28, 28, 1) for Input((28, 28)): Keras squeezes it
        given = given[:-1]
    if len(given) != len(expected) or any(e is not None and g is not None and int(e) != int(g) for e, g in zip(expected[1:], given[1:])):
        raise DataError(
            f"the model takes inputs of shape {expected}, but the data's batches hold inputs of shape {given}, which "
            "fit and evaluate refuse: give data of the model's input shape (images resized as in training)."
        )


def check_not_arrays_in_a_list(data: Any, batch_size: int | None) -> None:
    """A ``DataError`` for ``[x, y]`` (or ``[x, y, w]``) with ``batch_size=``: a list is a list of batches, each
    used whole, but arrays of one length larger than the batch size are samples meant to be cut into batches."""
    from .errors import DataError

    if batch_size is None or not isinstance(data, list) or not 2 <= len(data) <= 3 or not all(len(getattr(a, "shape", ())) for a in data):
        return
    lengths = {int(a.shape[0]) for a in data}
    if len(lengths) == 1 and lengths.pop() > batch_size:
        raise DataError(
            f"data is a list of {len(data)} arrays of the same length with batch_size={batch_size}: a list is read as a list "
            "of batches, each used whole (batch_size= does not apply). To cut arrays into batches pass a tuple, (x, y) "
            "(several inputs: ([x1, x2], y)); for batches, leave batch_size= out."
        )


def check_no_number_lists(data: Any) -> None:
    """A ``DataError`` for ``(x, y[, w])`` whose ``y`` or ``w`` is a Python list of numbers, which Keras's
    ``fit`` and ``evaluate`` fail on with an ``IndexError`` (a list of arrays is one per output: fine)."""
    from .errors import DataError

    if not (isinstance(data, tuple) and 2 <= len(data) <= 3):
        return
    for name, part in zip(("y", "sample_weight"), data[1:]):
        if isinstance(part, list) and any(np.ndim(leaf) == 0 for leaf in part):
            raise DataError(f"{name} is a Python list of numbers: pass it as an array (np.asarray({name})), as fit and evaluate need it.")


def _attribute_mask(t: Any) -> Any:
    return getattr(t, "_keras_mask", None)


def _set_attribute_mask(t: Any, mask: Any) -> None:
    t._keras_mask = mask


def output_marks(outputs: list, *, logits: bool = True, get_mask: Callable[[Any], Any] = _attribute_mask) -> list:
    """What Keras marks its outputs with and a compiled function drops, read inside the traced function and returned
    beside the outputs (see :func:`mark_outputs`): per output the logits its softmax or sigmoid marked
    (``_keras_logits``; where ``logits``, TensorFlow), then per output its mask (``_keras_mask``, e.g. from
    ``Embedding(mask_zero=True)``; Keras 3 passes its own getter, which also reads a JAX tracer's); None where unmarked."""
    return [getattr(t, "_keras_logits", None) if logits else None for t in outputs] + [get_mask(t) for t in outputs]


def mark_outputs(outputs: list, marks: list, *, set_mask: Callable[[Any, Any], None] = _set_attribute_mask) -> None:
    """Put :func:`output_marks` back on the outputs. On TensorFlow, Keras 3 and Keras 2 compute their cross-entropy
    losses and metrics from the marked logits, exactly, where the probabilities saturate (else they clip them at 1e-7);
    and every compiled loss and metric weights its values by the output's mask (``evaluate`` averages a padded
    sequence's loss over its real positions): inside ``evaluate``'s graph the marks are there, so the losses must see
    them here too for E to equal ``evaluate``. (An output of a bare ``tf.nn.softmax``, unmarked, is known to those
    losses by its op inside a graph only: it is scored from its clipped probabilities.)"""
    count = len(outputs)
    for t, logit, mask in zip(outputs, marks[:count], marks[count:]):
        if logit is not None:
            t._keras_logits = logit
        if mask is not None:
            set_mask(t, mask)

