"""Keras 2 BatchNormalization layers (nested models included, by path name), frozen or not, and what else the model holds.

Keras 2 is the ``tf_keras`` package (TensorFlow 2.16+, with ``TF_USE_LEGACY_KERAS=1`` for
``tf.keras``) or ``tf.keras`` of TensorFlow up to 2.15. A layer is *frozen* when it normalizes
with its moving statistics even in ``fit``:

- ``trainable=False`` (Keras 2's ``BatchNormalization`` then runs in inference mode; the
  ``tf.compat.v1`` layer does not, it only stops updating);
- it receives ``training=False`` in a training-mode forward pass, e.g. inside a nested model
  called as ``base(x, training=False)`` (the transfer-learning recipe), or a subclassed
  model's ``self.backbone(x, training=False)``. :func:`remember_inference_only` finds these
  by tracing the model once in training mode (a symbolic trace: nothing runs, no variable
  or random state moves; cached per model).

:class:`Patches` installs per-instance replacements (``call``, ``add_update``, ...) and
always puts the originals back; :func:`stateless_patches` are the ones every evalgap pass
uses so that no variable of the model can be assigned: ``add_update`` and ``add_metric``
do nothing, and BatchNormalization's ``_assign_moving_average`` / ``_assign_new_value``
(Batch Renormalization assigns ``renorm_mean`` / ``renorm_stddev`` directly, not through
``add_update``) return the value without assigning it.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .._keras_common import facts as _facts
from .._keras_common import inference_only, traced_alone, walk
from ..engine import ModelFacts, NormLayer, tree_map


def _import_keras2():
    """``tf_keras``, else ``tf.keras`` when it is Keras 2 (TensorFlow <= 2.15)."""
    try:
        import tf_keras

        return tf_keras
    except ImportError:
        import tensorflow as tf

        if str(getattr(tf.keras, "__version__", "3")).startswith("2."):
            return tf.keras
        raise ImportError(
            "evalgap.tf_keras needs Keras 2: install tf-keras matching your TensorFlow (pip install 'tf-keras==2.21.0' "
            "for TensorFlow 2.21, or pip install 'evalgap[tf-keras]'). For Keras 3 models use evalgap.keras."
        ) from None


keras = _import_keras2()

#: Layer class names that make training mode differ from evaluation mode besides BatchNorm.


def _bn_base() -> type:
    """Keras 2's ``BatchNormalizationBase`` (V2, V1 and ``SyncBatchNormalization`` derive from it)."""
    for cls in keras.layers.BatchNormalization.__mro__:
        if cls.__name__ == "BatchNormalizationBase":
            return cls
    return keras.layers.BatchNormalization


BN_BASE = _bn_base()


def find_batchnorms(model) -> list[tuple[str, Any]]:
    """Every Keras 2 BatchNormalization layer (V2, V1, synchronized, subclasses) in the model, by path name."""
    return [(name, layer) for name, layer in walk(model) if isinstance(layer, BN_BASE)]


def is_frozen(bn) -> bool:
    """Keras 2 runs a ``trainable=False`` BatchNormalization in inference mode, even in fit.

    (Not the ``tf.compat.v1`` layer, which keeps batch statistics and only stops updating.)
    A layer called with ``training=False`` inside the model is frozen too; see the module
    docstring: that is a property of the model, which :func:`norm_layers` takes into account.
    """
    return not bn.trainable and bool(getattr(bn, "_USE_V2_BEHAVIOR", True))


def is_fused(bn) -> bool:
    """The layer runs TensorFlow's fused kernel (4D/5D input, no renorm, no virtual batches)."""
    return bool(getattr(bn, "fused", False))


def kind(bn) -> str:
    flags = [
        name for name, on in (
            ("fused", is_fused(bn)), ("renorm", getattr(bn, "renorm", False)), ("synchronized", getattr(bn, "synchronized", False)),
            (f"virtual_batch_size={getattr(bn, 'virtual_batch_size', None)}", getattr(bn, "virtual_batch_size", None) is not None),
        ) if on
    ]
    return type(bn).__name__ + (f" ({', '.join(flags)})" if flags else "")


def channel_axes(bn, rank: int) -> list[int]:
    """The normalized (channel) axes of the layer's *input* (Keras 2 shifts ``axis`` by one for virtual batches)."""
    shift = 1 if getattr(bn, "virtual_batch_size", None) is not None else 0
    return [a - shift for a in bn.axis] if shift else [a % rank for a in bn.axis]


# ---- patching --------------------------------------------------------------------------
class Patches:
    """Per-instance attribute replacements, removed on exit (normal or not); re-entrant per use."""

    def __init__(self):
        self._items: list[tuple[Any, str, Any]] = []
        self._saved: list[tuple[Any, str, bool, Any]] = []

    def add(self, obj: Any, name: str, value: Any) -> "Patches":
        self._items.append((obj, name, value))
        return self

    def __enter__(self) -> "Patches":
        try:
            for obj, name, value in self._items:
                d = obj.__dict__
                self._saved.append((obj, name, name in d, d.get(name)))
                d[name] = value  # bypasses Keras's attribute tracking on purpose
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, had, old in reversed(self._saved):
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)
        self._saved.clear()


def _no_op(*args, **kwargs) -> None:
    return None


def _not_assigned(variable, value, *args, **kwargs):
    import tensorflow as tf

    return tf.identity(tf.cast(value, variable.dtype))


def stateless_patches(model, patches: Patches | None = None) -> Patches:
    """Patches under which a forward pass of ``model`` assigns no variable (module docstring).

    Also keeps the seed counter of random layers (``Dropout(seed=...)``: Keras 2 takes the next
    seed each time it traces one) as it was, so that evalgap's traces do not shift the masks
    of the user's later ones.
    """
    patches = patches or Patches()
    for layer in [model, *(layer for _, layer in walk(model))]:
        patches.add(layer, "add_update", _no_op).add(layer, "add_metric", _no_op)
        if isinstance(layer, BN_BASE):
            patches.add(layer, "_assign_moving_average", _not_assigned).add(layer, "_assign_new_value", _not_assigned)
        generator = layer.__dict__.get("_random_generator")
        if generator is not None and "_seed" in getattr(generator, "__dict__", {}):
            patches.add(generator, "_seed", generator.__dict__["_seed"])
    return patches


def autograph_off(fn: Callable) -> Callable:
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(fn)


def input_specs(inputs: Any, open_batch: bool = True) -> Any:
    """``tf.TensorSpec`` s of a batch's inputs, the batch dimension left open unless ``open_batch=False``."""
    import tensorflow as tf

    def spec(a):
        a = np.asarray(a) if not hasattr(a, "dtype") or not hasattr(a, "shape") else a
        return tf.TensorSpec(((None,) if open_batch else tuple(a.shape)[:1]) + tuple(a.shape)[1:], tf.as_dtype(a.dtype))

    return tree_map(spec, inputs)


# ---- layers called with training=False inside the model -------------------------------
_INFERENCE_ONLY: "weakref.WeakKeyDictionary[Any, tuple[int, frozenset[int]]]" = weakref.WeakKeyDictionary()


def remember_inference_only(model, inputs: Any) -> frozenset[int]:
    """Ids of the BN layers that get ``training=False`` in every call of a training-mode forward
    (:func:`evalgap._keras_common.inference_only`). The forward: a symbolic trace of
    ``model(x, training=True)`` (nothing runs), with the batch's own shape where an open batch
    dimension cannot be traced (``x.shape[0]`` in a call); the trace does not raise here."""
    import tensorflow as tf

    def trace(replacements) -> None:
        patches = stateless_patches(model)
        for bn, call in replacements:
            patches.add(bn, "call", call)
        with patches:
            traced = tf.function(autograph_off(traced_alone(lambda x: model(x, training=True), "frozen_trace")))
            try:
                traced.get_concrete_function(input_specs(inputs))
            except Exception:  # a model that needs the batch size: the batch's own shape (the recorders record again)
                traced.get_concrete_function(input_specs(inputs, open_batch=False))

    return inference_only(model, [bn for _, bn in find_batchnorms(model)], _INFERENCE_ONLY, trace, identity=tf.identity,
                          wrap=autograph_off)


def norm_layers(model) -> list[NormLayer]:
    inference_only = _INFERENCE_ONLY.get(model, (0, frozenset()))[1]
    return [
        NormLayer(
            name=name, handle=bn, kind=kind(bn), channels=int(np.prod(bn.moving_mean.shape)), eps=float(bn.epsilon),
            momentum=float(bn.momentum), frozen=is_frozen(bn) or id(bn) in inference_only, dtype=bn.moving_variance.dtype.name,
        )
        for name, bn in find_batchnorms(model)
    ]


#: BatchNormalization's statistics variables (Batch Renormalization adds the last three).
STAT_ATTRS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def facts(model, first_inputs=None) -> ModelFacts:
    return _facts(model, find_batchnorms(model), first_inputs, lambda t: t.numpy() if hasattr(t, "numpy") else np.asarray(t))


def stat_attrs(bn) -> list[str]:
    return [name for name in STAT_ATTRS if name in bn.__dict__]


def statistics(bns: Sequence[Any], *, local: bool) -> list[list[Any]]:
    """Per layer, the current values of its statistics variables, as tensors read once, eagerly.

    ``local``: a distributed variable's first local component (under MultiWorkerMirroredStrategy
    a read in cross-replica context would be a collective across workers); else the value
    Keras reads (the mean of the replicas' copies under MirroredStrategy).
    """
    import tensorflow as tf

    def value(variable):
        components = getattr(variable, "values", None) if local else None
        return tf.identity(components[0] if components else variable)

    return [[value(bn.__dict__[name]) for name in stat_attrs(bn)] for bn in bns]


@contextlib.contextmanager
def substituted(bns: Sequence[Any], values: Sequence[Sequence[Any]]) -> Iterator[None]:
    """Inside a traced function: the layers' statistics attributes are the given tensors, then the variables again.

    The graph reads the function's arguments instead of the variables (no read of a
    distributed variable, new values need no new trace); Keras's attribute tracking is
    bypassed, so the layers' weight lists never change.
    """
    saved = [(bn, {name: bn.__dict__[name] for name in stat_attrs(bn)}) for bn in bns]
    try:
        for (bn, names), tensors in zip(saved, values):
            bn.__dict__.update(zip(names, tensors))
        yield
    finally:
        for bn, names in saved:
            bn.__dict__.update(names)
