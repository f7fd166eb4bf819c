"""The Keras 3 adapter: answers the engine's framework questions (:mod:`evalgap.engine.protocol`)."""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np

from .._keras_common import adds_own_loss, check_batched, overrides, user_metrics
from ..engine import Batch, NormLayer
from ..errors import ModelError
from . import data, distributed, layers, moments, predict, transfer
from .metrics import KerasMetrics
from .remedies import REMEDIES


class KerasAdapter:
    """Keras 3 on the TensorFlow, JAX and PyTorch backends."""

    api = "evalgap.keras"
    convention = "keras"
    frozen_means = "trainable=False: inference mode even in fit"
    one_sample_batches = True  # a batch of one normalizes to beta in training, as fit trains on it
    remedies = REMEDIES
    bn_kind = "BatchNormalization layer"

    def framework(self, model: Any) -> str:
        return f"keras/{keras.backend.backend()}"

    def batches(self, source: Any, *, batch_size=None, shuffle=True, seed=0, targets=False):
        return data.batches(source, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=targets)

    def needs_targets(self, model: Any, first: Batch) -> bool:
        """False for a model compiled with neither a loss nor metrics whose loss is its own: an overridden
        ``compute_loss``, or losses its layers add from the inputs (``add_loss``, an endpoint layer reading its targets
        from the inputs: :func:`evalgap._keras_common.adds_own_loss`), as ``fit(x)`` trains it. Weight regularization
        alone is no loss to measure."""
        compiled = getattr(model, "compiled", False)
        if not compiled or getattr(model, "_compile_loss", None) is not None or user_metrics(getattr(model, "_compile_metrics", None)):
            return True
        if overrides(model, "compute_loss"):
            return False
        return not adds_own_loss(predict.predictor, model, first.inputs)

    def prepare(self, model: Any, first: Batch):
        if not isinstance(model, (keras.Model, keras.layers.Layer)):
            if any(cls.__module__.split(".")[0] == "tf_keras" or cls.__module__.startswith("keras.src.engine.") for cls in type(model).__mro__):
                raise ModelError(
                    f"{type(model).__name__} is a Keras 2 model (tf_keras, or tf.keras with TF_USE_LEGACY_KERAS=1): use "
                    "evalgap.tf_keras (the same recalibrate, diagnose, PreciseBN and GapMonitor, with the same arguments)."
                )
            raise ModelError(f"expected a Keras model, got {type(model).__name__}.")
        check_batched(model, first.inputs)
        if not model.built:
            model(first.inputs, training=False)  # builds the variables; inference mode changes no statistic
        layers.remember_inference_only(model, first.inputs)
        return model

    def layers(self, model) -> list[NormLayer]:
        return layers.norm_layers(model)

    def moments_pass(self, model, norm_layers: Sequence[NormLayer], batch_statistics: Sequence[bool]):
        return moments.moments_pass(model, [layer.handle for layer in norm_layers], list(batch_statistics))

    def host_captures(self, captures):
        return moments.PackedMoments.to_host_captures(captures, self.to_host)

    def to_host(self, values: Sequence[Any]) -> list[np.ndarray]:
        if keras.backend.backend() == "jax":
            import jax

            return [np.asarray(v) for v in jax.device_get(list(values))]

        return [v if isinstance(v, np.ndarray) else np.asarray(keras.ops.convert_to_numpy(v)) for v in values]

    def read(self, norm_layers: Sequence[NormLayer]):
        """Each layer's (moving_mean, moving_variance) as float64 arrays: one transfer for all. A renorm layer's
        ``moving_stddev`` is kept too (with the pair it goes with), for :meth:`write` to put back exactly."""
        renorm = [layer.handle for layer in norm_layers if getattr(layer.handle, "renorm", False)]
        host = transfer.read([v for layer in norm_layers for v in (layer.handle.moving_mean, layer.handle.moving_variance)]
                             + [bn.moving_stddev for bn in renorm])
        pairs = [(host[2 * i].astype(np.float64), host[2 * i + 1].astype(np.float64)) for i in range(len(norm_layers))]
        held = dict(zip(map(id, renorm), host[2 * len(norm_layers):]))
        self._stddev_read = {id(layer.handle): (pair, held[id(layer.handle)]) for layer, pair in zip(norm_layers, pairs)
                             if id(layer.handle) in held}
        return pairs

    def write(self, norm_layers: Sequence[NormLayer], stats) -> None:
        """Assign (mean, var) pairs, cast to each variable's dtype, from one host-to-device transfer (all or
        nothing: every array is checked first). A Batch Renormalization layer (``renorm=True``) also gets
        ``moving_stddev = sqrt(var + eps)``, from which Keras recomputes its moving variance at every training step
        (else the next step would undo the recalibration); the pair :meth:`read` returned gets back the
        ``moving_stddev`` read with it (a rollback is exact)."""
        variables, values = [], []
        kept = getattr(self, "_stddev_read", {})
        for layer, (mean, var) in zip(norm_layers, stats):
            bn = layer.handle
            variables += [bn.moving_mean, bn.moving_variance]
            values += [mean, var]
            if getattr(bn, "renorm", False):
                read = kept.get(id(bn))
                same = read is not None and all(np.array_equal(np.asarray(a, np.float64).reshape(-1), np.asarray(b).reshape(-1))
                                                for a, b in zip((mean, var), read[0]))
                variables.append(bn.moving_stddev)
                values.append(read[1] if same else np.sqrt(np.asarray(var, np.float64) + bn.epsilon))
        transfer.assign(variables, values)

    def predictor(self, model, mode: str, norm_layers=(), stats=()):
        return predict.predictor(model, mode, norm_layers, stats)

    def metrics(self, model, batch: Batch, outputs: Any) -> KerasMetrics:
        distributed.refuse_inside_scope()
        return KerasMetrics(model, batch, outputs, distributed.collective(model))

    def facts(self, model, first: Batch | None = None):
        return layers.facts(model, None if first is None else first.inputs)

    def collective(self, model):
        return distributed.collective(model)

    def input_array(self, inputs: Any) -> tuple[np.ndarray, int] | None:
        if isinstance(inputs, (dict, list, tuple)):
            return None
        return np.asarray(keras.ops.convert_to_numpy(inputs)), -1

    def hint(self, exc: Exception) -> str | None:
        return None


ADAPTER = KerasAdapter()
