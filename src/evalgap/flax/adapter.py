"""The Flax adapter (NNX and Linen): answers the engine's framework questions (:mod:`evalgap.engine.protocol`)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from ..engine import Batch, NormLayer
from ..engine.moments import captures_to_host
from ..errors import ModelError
from . import data, distributed, forward, layers, moments, predict
from .layers import LinenModel, NnxModel
from .metrics import FlaxMetrics
from .remedies import REMEDIES


class FlaxAdapter:
    """One call's Flax options: ``train_arg`` (the name of the model's training flag, if not detected).

    NNX statistics are read and written on the module's ``nnx.BatchNorm`` objects (in place);
    Linen statistics on :attr:`target`'s variables, which a write replaces by a new tree
    (the user's variables are never modified): the api returns ``target.variables``. Read
    flat (one float64 vector per layer, C order: several feature axes, stacked layers), written
    in each variable's own shape and dtype.
    """

    api = "evalgap.flax"
    convention = "keras"  # moving = momentum * moving + (1 - momentum) * batch, default 0.99
    frozen_means = "use_running_average=True while the model trains"
    one_sample_batches = True  # a batch of one normalizes to beta in training (BatchNorm does not refuse it)
    target_keys = data.TARGET_KEYS  # where a dict batch holds its targets
    remedies = REMEDIES
    bn_kind = "BatchNorm layer (flax.nnx.BatchNorm, or flax.linen.BatchNorm with variables['batch_stats'])"

    def __init__(self, *, train_arg: str | None = None):
        self.train_arg = train_arg
        self.target: NnxModel | LinenModel | None = None
        self._first: Any = None

    def framework(self, model: Any) -> str:
        return "flax/linen" if isinstance(model, LinenModel) else "flax/nnx"

    def batches(self, source: Any, *, batch_size=None, shuffle=True, seed=0, targets=False):
        return data.batches(source, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=targets)

    def prepare(self, model: Any, first: Batch) -> NnxModel | LinenModel:
        """The wrapped model, its training-mode call traced once on the first batch (:func:`forward.discover`).

        A failed trace: a DataError for a dict batch without an input key; Linen's ModelError;
        NNX goes on without the call arguments (the passes then name the failing batch).
        """
        target = layers.wrap(model, train_arg=self.train_arg)
        if isinstance(target, NnxModel) and target.calls is None or isinstance(target, LinenModel) and not target.batchnorms:
            try:
                forward.discover(target, first.inputs)
            except Exception as exc:
                error = data.unkeyed_dict(first.raw, exc.__cause__ or exc)
                if error is not None:
                    raise error from exc
                if isinstance(target, LinenModel):
                    raise
        self.target, self._first = target, first.inputs
        return target

    def layers(self, model: NnxModel | LinenModel) -> list[NormLayer]:
        return model.norm_layers()

    def moments_pass(self, model, norm_layers: Sequence[NormLayer], batch_statistics: Sequence[bool]):
        return moments.moments_pass(model, norm_layers, batch_statistics)

    def host_captures(self, captures):
        host = captures_to_host(captures, self.to_host)
        if host.count.size and host.count.min() < 0:  # a slot from inside a lifted transform (forward.SLOTS)
            tracked = [layer for layer in self.target.norm_layers() if layer.tracks_statistics] if self.target is not None else []
            layer = tracked[int(host.index[np.argmin(host.count)])].name if tracked else "?"
            if host.count.min() == forward.UNEQUAL_COUNTS:
                why = ("the layers a lifted transform stacks into it (nn.scan, nn.vmap) normalized different numbers of "
                       "values in one batch (different masks per stacked layer), which one capture per layer cannot hold")
            else:
                why = "no moments came out of the lifted transform it is called in (it does not carry the layer's state out)"
            raise ModelError(f"BatchNorm layer {layer}: {why}; recalibrate and diagnose do not support this model. "
                             "Nothing was changed.")
        return host

    def to_host(self, values: Sequence[Any]) -> list[np.ndarray]:
        return forward.to_host(list(values))

    def read(self, norm_layers: Sequence[NormLayer]):
        if isinstance(self.target, LinenModel):
            stats = layers.linen_stats(self.target.variables)
            found = jax.device_get([stats.get(layer.handle.path) for layer in norm_layers])
            return [None if s is None else (layers.flat(s[0]), layers.flat(s[1])) for s in found]
        host = jax.device_get([(layer.handle.module.mean.get_value(), layer.handle.module.var.get_value()) for layer in norm_layers])
        return [(layers.flat(mean), layers.flat(var)) for mean, var in host]

    def write(self, norm_layers: Sequence[NormLayer], stats) -> None:
        if isinstance(self.target, LinenModel):
            old = layers.linen_stats(self.target.variables)
            was = [old.get(layer.handle.path, (None, None)) for layer in norm_layers]
        else:
            was = [(layer.handle.module.mean.get_value(), layer.handle.module.var.get_value()) for layer in norm_layers]
        new = layers.like([v for pair in stats for v in pair], [o for pair in was for o in pair])  # all converted first
        pairs = list(zip(new[::2], new[1::2]))
        if isinstance(self.target, LinenModel):
            updates = {layer.handle.path: pair for layer, pair in zip(norm_layers, pairs)}
            self.target.variables = layers.replace_stats(self.target.variables, updates)
            return
        for layer, (mean, var) in zip(norm_layers, pairs):  # the assignments themselves cannot fail halfway
            layer.handle.module.mean.set_value(mean)
            layer.handle.module.var.set_value(var)

    def predictor(self, model, mode: str, norm_layers=(), stats=()):
        return predict.predictor(model, mode, norm_layers, stats)

    def metrics(self, model, batch: Batch, outputs: Any, *, loss_fn=None, metrics=None) -> FlaxMetrics:
        return FlaxMetrics.choose(batch, outputs, loss_fn=loss_fn, metrics=metrics, collective=self.collective(model))

    def facts(self, model: NnxModel | LinenModel, first: Batch | None = None):
        facts = model.facts()
        shards = distributed.data_shards(self._first)
        collective = self.collective(model)
        facts.replicas = collective.world if collective is not None else shards
        facts.synchronized = collective is None and shards > 1  # a jitted step normalizes the global batch
        facts.per_process_batches = collective is not None
        return facts

    def collective(self, model: Any):
        return distributed.collective(self._first)

    def input_array(self, inputs: Any) -> tuple[np.ndarray, int] | None:
        x = inputs
        if not hasattr(x, "dtype") or not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.uint8):
            return None
        return np.asarray(jax.device_get(x)), -1

    def hint(self, exc: Exception) -> str | None:
        text = str(exc)
        if "merge_param" in text or "use_running_average" in text or "deterministic" in text:
            return ("The model's mode could not be set: pass train_arg='<name of its training flag>' if its __call__ "
                    "takes one under another name.")
        return None


__all__ = ["FlaxAdapter"]
