"""The Keras 2 adapter: answers the engine's framework questions (:mod:`evalgap.engine.protocol`)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from .._keras_common import adds_own_loss, by_dtype, check_batched, user_metrics
from ..engine import Batch, NormLayer
from ..engine.moments import captures_to_host
from ..errors import ModelError, RecalibrationError
from . import data, distributed, layers, moments, predict
from .layers import keras
from .metrics import TfKerasMetrics
from .remedies import REMEDIES

logger = logging.getLogger("evalgap.tf_keras")


def _is_keras3(model: Any) -> bool:
    return any(cls.__module__.split(".")[0] == "keras" and cls.__name__ in ("Layer", "Operation") for cls in type(model).__mro__)


class TfKerasAdapter:
    """Keras 2: ``tf_keras`` (TensorFlow 2.16+) or ``tf.keras`` of TensorFlow <= 2.15."""

    api = "evalgap.tf_keras"
    convention = "keras"
    frozen_means = "trainable=False, or called with training=False (e.g. base(x, training=False)): inference mode even in fit"
    one_sample_batches = True  # a batch of one normalizes to beta in training, as fit trains on it
    remedies = REMEDIES
    bn_kind = "BatchNormalization layer"

    def framework(self, model: Any) -> str:
        return f"tf_keras/{keras.__version__}"

    def batches(self, source: Any, *, batch_size=None, shuffle=True, seed=0, targets=False):
        return data.batches(source, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=targets)

    def needs_targets(self, model: Any, first: Batch) -> bool:
        """False for a model compiled with neither a loss nor metrics whose layers add losses from the inputs
        (``add_loss``, an endpoint layer reading its targets from the inputs:
        :func:`evalgap._keras_common.adds_own_loss`), as ``fit(x)`` trains it. Weight regularization alone is no
        loss to measure."""
        if not getattr(model, "_is_compiled", False):
            return True
        if getattr(getattr(model, "compiled_loss", None), "_user_losses", None) is not None or user_metrics(getattr(model, "compiled_metrics", None)):
            return True
        return not adds_own_loss(predict.predictor, model, first.inputs)

    def prepare(self, model: Any, first: Batch):
        """The model, built (an eager call in inference mode changes no statistic); its inference-only BN layers found."""
        if not isinstance(model, keras.layers.Layer):
            if _is_keras3(model):
                raise ModelError(f"{type(model).__name__} is a Keras 3 model: use evalgap.keras (same functions and arguments).")
            raise ModelError(f"expected a Keras 2 (tf_keras) model, got {type(model).__name__}.")
        check_batched(model, first.inputs)
        if not model.built:
            model(first.inputs, training=False)
        try:
            layers.remember_inference_only(model, first.inputs)
        except Exception as exc:  # never guess which layers are frozen: say it, as a pass failing at batch 0 would
            raise RecalibrationError(
                f"the statistics pass failed at batch 0: {model.name} cannot be traced in training mode on it "
                f"({type(exc).__name__}: {exc}); the model was restored exactly as it was. Check that the data fit the model."
            ) from exc
        return model

    def layers(self, model) -> list[NormLayer]:
        return layers.norm_layers(model)

    def moments_pass(self, model, norm_layers: Sequence[NormLayer], batch_statistics: Sequence[bool]):
        return moments.moments_pass(model, [layer.handle for layer in norm_layers], list(batch_statistics))

    def host_captures(self, captures):
        return captures_to_host(captures, self.to_host)

    def to_host(self, values: Sequence[Any]) -> list[np.ndarray]:
        return moments.to_host(values)

    def read(self, norm_layers: Sequence[NormLayer]):
        """Each layer's (moving_mean, moving_variance), flat float64: one transfer for all."""
        host = _read([v for layer in norm_layers for v in (layer.handle.moving_mean, layer.handle.moving_variance)])
        return [(host[2 * i].astype(np.float64).reshape(-1), host[2 * i + 1].astype(np.float64).reshape(-1)) for i in range(len(norm_layers))]

    def write(self, norm_layers: Sequence[NormLayer], stats) -> None:
        """Assign moving mean and variance (and a renorm layer's ``moving_stddev = sqrt(var + eps)``, from which
        Keras 2 recomputes its moving variance at every step); a layer that already holds them is left untouched,
        and a failure puts back every value this call assigned."""
        bns = [layer.handle for layer in norm_layers]
        variables = [v for bn in bns for v in (bn.moving_mean, bn.moving_variance, *((bn.moving_stddev,) if getattr(bn, "renorm", False) else ()))]
        held = dict(zip(map(id, variables), _read(variables)))  # one transfer: what each variable holds now
        targets: list[tuple[Any, np.ndarray]] = []
        for bn, (mean, var) in zip(bns, stats):
            mean, var = np.asarray(mean, np.float64).reshape(-1), np.asarray(var, np.float64).reshape(-1)
            if np.array_equal(held[id(bn.moving_mean)].astype(np.float64).reshape(-1), mean) and \
                    np.array_equal(held[id(bn.moving_variance)].astype(np.float64).reshape(-1), var):
                continue
            targets += [(bn.moving_mean, mean), (bn.moving_variance, var)]
            if getattr(bn, "renorm", False):
                targets.append((bn.moving_stddev, np.sqrt(var + bn.epsilon)))
        values = [value.reshape(tuple(variable.shape)).astype(variable.dtype.as_numpy_dtype) for variable, value in targets]
        done: list[Any] = []
        try:
            for (variable, _), tensor in zip(targets, _to_device(values)):
                done.append(variable)
                variable.assign(tensor)
        except BaseException:
            for variable in reversed(done):  # each on its own: one that fails again must not keep the others back
                try:
                    variable.assign(held[id(variable)])
                except Exception:
                    logger.exception("could not put back %s", getattr(variable, "name", variable))
            raise

    def predictor(self, model, mode: str, norm_layers=(), stats=()):
        return predict.predictor(model, mode, norm_layers, stats)

    def metrics(self, model, batch: Batch, outputs: Any) -> TfKerasMetrics:
        return TfKerasMetrics(model, batch, outputs, distributed.collective(model))

    def facts(self, model, first: Batch | None = None):
        return layers.facts(model, None if first is None else first.inputs)

    def collective(self, model):
        return distributed.collective(model)

    def input_array(self, inputs: Any) -> tuple[np.ndarray, int] | None:
        if isinstance(inputs, (dict, list, tuple)):
            return None
        return np.asarray(inputs), -1

    def hint(self, exc: Exception) -> str | None:
        text = str(exc)
        if "Reshape" in text and ("evenly divisible" in text or "Input to reshape" in text):
            return ("A BatchNormalization layer with virtual_batch_size needs batches whose size is a multiple of it: "
                    "use the training batch size.")
        return None


def _read(variables: Sequence[Any]) -> list[np.ndarray]:
    """The variables' values, each its own shape and dtype: one device-to-host copy per dtype (not one per variable,
    each a synchronization on a GPU). A distributed variable gives what its ``.numpy()`` gives (the primary copy of a
    mirrored one, the replicas' mean of a sync-on-read one)."""
    import tensorflow as tf

    out: list[Any] = [None] * len(variables)
    for indices in by_dtype(variables).values():
        host = tf.concat([tf.reshape(tf.convert_to_tensor(variables[i]), [-1]) for i in indices], 0).numpy()
        start = 0
        for i in indices:
            shape = tuple(variables[i].shape)
            size = int(np.prod(shape, dtype=np.int64))
            out[i] = host[start:start + size].reshape(shape)
            start += size
    return out


def _to_device(values: Sequence[np.ndarray]) -> list[Any]:
    """Host arrays as tensors on TensorFlow's default device: one host-to-device copy per dtype."""
    import tensorflow as tf

    out: list[Any] = [None] * len(values)
    for indices in by_dtype(values).values():
        flat = tf.constant(np.concatenate([values[i].reshape(-1) for i in indices]))
        parts = tf.split(flat, [values[i].size for i in indices]) if len(indices) > 1 else [flat]
        for i, part in zip(indices, parts):
            out[i] = tf.reshape(part, values[i].shape)
    return out


ADAPTER = TfKerasAdapter()
