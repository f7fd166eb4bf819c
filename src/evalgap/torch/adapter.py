"""The PyTorch adapter: answers the engine's framework questions (:mod:`evalgap.engine.protocol`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.nn.parameter import is_lazy

from ..engine import Batch, NormLayer
from ..errors import ModelError
from . import data, layers, moments, predict
from .metrics import TorchMetrics
from .distributed import collective
from .remedies import REMEDIES


_INFERENCE_TENSORS = (
    "The BatchNorm buffers are inference tensors (the model was built or loaded under torch.inference_mode), which no "
    "code outside inference mode may write: build or load the model outside inference_mode, or replace the buffers "
    "with clones (bn.running_mean = bn.running_mean.clone(), likewise running_var)."
)


class TorchAdapter:
    """One call's PyTorch options: ``forward(model, batch)`` and the ``process_group``."""

    api = "evalgap.torch"
    convention = "torch"
    frozen_means = "eval mode during training"
    one_sample_batches = False  # BatchNorm raises on one value per channel in training mode
    target_keys = data.TARGET_KEYS  # where a dict batch holds its targets
    remedies = REMEDIES
    bn_kind = "BatchNorm layer (torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm or a _BatchNorm subclass)"

    def __init__(self, *, forward=None, process_group=None):
        self.forward, self.process_group = forward, process_group
        self.device = torch.device("cpu")
        self._collective = None
        self._tuple_input = False  # the first batch's input is a tuple or list (for hint)
        self._features_last = False  # the model's first layer reads the input's last axis (input_array)
        self._left_in_eval: set[int] | None = None  # modules the model's own train() keeps in eval mode

    def framework(self, model: Any) -> str:
        return "torch"

    def batches(self, source: Any, *, batch_size=None, shuffle=True, seed=0, targets=False):
        return data.batches(source, batch_size=batch_size, shuffle=shuffle, seed=seed, targets=targets)

    def prepare(self, model: Any, first: Batch) -> nn.Module:
        model = layers.unwrap(model)  # no per-batch collectives; uneven batches per rank allowed
        if not isinstance(model, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}.")
        self.device = data.model_device(model)
        self._collective = collective(self.process_group)  # now, not at construction: the group may start later
        self._tuple_input = self.forward is None and isinstance(first.inputs, (list, tuple)) \
            and not isinstance(first.inputs, PackedSequence)  # a NamedTuple, passed whole
        self._features_last = layers.reads_last_axis(model, first.inputs)
        self._left_in_eval = layers.eval_in_training(model)  # once per call: it may copy the model
        return model

    def layers(self, model: nn.Module) -> list[NormLayer]:
        return layers.norm_layers(model, left_in_eval=self._left_in_eval)

    def refuses_one_sample(self, model: nn.Module, norm_layers: Sequence[NormLayer], batch: Batch) -> bool:
        """Whether training mode refuses this batch of one sample: BatchNorm raises a ValueError on one value
        per channel ((N, C) inputs), not on a feature map. One forward in the moments pass (the model is put
        back); any other error is left to the passes, which name it. A lazy layer not yet materialized is not
        tried (the pass would materialize it on this one sample): refused."""
        if not norm_layers:
            return False
        tracked = [layer for layer in norm_layers if layer.tracks_statistics]
        if any(is_lazy(layer.handle.running_mean) for layer in tracked):
            return True
        try:
            with self.moments_pass(model, tracked, [not layer.frozen for layer in tracked]) as run:
                run(batch)
        except ValueError:
            return True
        except Exception:
            return False
        return False

    def moments_pass(self, model, norm_layers, batch_statistics):
        return moments.moments_pass(
            model, norm_layers, batch_statistics, forward=self.forward, device=self.device, local_sync=self._collective is not None,
        )

    def host_captures(self, captures):
        return moments.host_captures(captures)

    def to_host(self, values: Sequence[Any]) -> list[np.ndarray]:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        flat = moments.flat_to_host(tensors)
        parts = iter(np.split(flat, np.cumsum([t.numel() for t in tensors])[:-1]) if tensors else ())
        out = []
        for v in values:
            if isinstance(v, torch.Tensor):
                part = next(parts)
                out.append(part if v.dim() == 1 else part.reshape(tuple(v.shape)))
            else:
                out.append(np.asarray(v))
        return out

    def read(self, norm_layers: Sequence[NormLayer]):
        """Each layer's (running_mean, running_var) as float64 arrays (None if lazy): one transfer for all."""
        buffers = [layer.handle._buffers for layer in norm_layers]  # the buffer dict: no nn.Module.__getattr__ per read
        pairs = [(b.get("running_mean"), b.get("running_var")) for b in buffers]
        lazy = [mean is None or is_lazy(mean) for mean, _ in pairs]
        host = iter(self.to_host([t for pair, z in zip(pairs, lazy) if not z for t in pair]))
        return [None if z else (next(host), next(host)) for z in lazy]

    def write(self, norm_layers: Sequence[NormLayer], stats) -> None:
        """Copy float64 (mean, var) pairs into the running buffers: per (device, dtype) of the buffers one
        host-to-device transfer and one ``_foreach_copy_`` of equal dtypes (CUDA's fused path; a float64
        source would fall back to a copy kernel per buffer). float32 buffers get the values rounded on the
        host (NumPy's float64 -> float32 cast rounds to nearest, as torch's does), others get float64
        values cast by torch. Every size is checked before any write (a ModelError)."""
        buffers = [b[k] for b in (layer.handle._buffers for layer in norm_layers) for k in ("running_mean", "running_var")]
        if not buffers:
            return
        if not torch.is_inference_mode_enabled() and any(buf.is_inference() for buf in buffers):  # before any write
            raise ModelError(f"cannot write the statistics. {_INFERENCE_TENSORS} The model is unchanged.")
        values = [np.asarray(v, dtype=np.float64).reshape(-1) for pair in stats for v in pair]
        wrong = next((i for i, (v, buf) in enumerate(zip(values, buffers)) if v.size != buf.numel()), None)
        if wrong is not None or len(values) != len(buffers):
            at = "" if wrong is None else f": {norm_layers[wrong // 2].name} has {buffers[wrong].numel()} channels, got {values[wrong].size} values"
            raise ModelError(f"cannot write the statistics{at} (one (mean, var) pair per layer, one value per channel). The model is unchanged.")
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, buf in enumerate(buffers):
            groups.setdefault((buf.device, buf.dtype), []).append(i)
        copies = []
        for (device, dtype), members in groups.items():
            host = np.concatenate([values[i] for i in members])
            sources = torch.from_numpy(host.astype(np.float32) if dtype == torch.float32 else host).to(device)
            parts = sources.split([buffers[i].numel() for i in members])
            targets = [buffers[i] for i in members]
            copies.append((targets, [part if buf.dim() == 1 else part.view(buf.shape) for part, buf in zip(parts, targets)]))
        with torch.no_grad():
            for targets, sources in copies:
                torch._foreach_copy_(targets, sources)

    def predictor(self, model, mode, norm_layers=(), stats=()):
        return predict.predictor(model, mode, norm_layers, stats, forward=self.forward, device=self.device,
                                 local_sync=self._collective is not None, left_in_eval=self._left_in_eval)

    def metrics(self, model, batch: Batch, outputs: Any, *, loss_fn=None, metrics=None):
        return TorchMetrics.choose(batch, outputs, loss_fn=loss_fn, metrics=metrics, collective=self._collective)

    def facts(self, model: nn.Module, first: Batch | None = None):
        found = layers.facts(model, 1 if self._collective is None else self._collective.world, left_in_eval=self._left_in_eval)
        if first is not None:  # where the model's first layer reads its input
            found.input_transforms = layers.input_transforms(model, first.raw, first.inputs, forward=self.forward, device=self.device)
        return found

    def collective(self, model: Any):
        if self._collective is None:  # asked anew on every call: one process (None again), or before prepare ran
            return collective(self.process_group)
        return self._collective

    def input_array(self, inputs: Any) -> tuple[np.ndarray, int] | None:
        x = inputs
        if not isinstance(x, torch.Tensor) or not (torch.is_floating_point(x) or x.dtype == torch.uint8):
            return None
        x = x.detach().cpu()
        x = x if x.dtype in (torch.float32, torch.float64, torch.uint8) else x.float()  # bf16/fp16: NumPy has no bf16
        return x.numpy(), (1 if x.dim() >= 3 and not self._features_last else -1)

    def hint(self, exc: Exception) -> str | None:
        if "inference tensor" in str(exc).lower():
            return _INFERENCE_TENSORS
        if "more than 1 value per channel" in str(exc):
            return ("A batch with one value per channel (one sample of a (N, C) input) has no batch statistics, so "
                    "training-mode BatchNorm refuses it: give data of at least 2 samples, in batches of the training "
                    "batch size (> 1).")
        if isinstance(exc, TypeError) and "forward() missing" in str(exc) and "required positional argument" in str(exc):
            return ("The model's forward takes several inputs: give each batch as ((input1, input2, ...), target), "
                    "which evalgap passes unpacked, or pass forward=lambda model, batch: model(batch[0], batch[1]).")
        if self._tuple_input and isinstance(exc, (TypeError, AttributeError)) and "tuple" in str(exc):
            return ("The model got a tuple as its input: a tuple input is passed unpacked only to a forward that requires "
                    "several positional arguments; for forward(self, x, extra=None) pass "
                    "forward=lambda model, batch: model(*batch[0]).")
        return None


__all__ = ["TorchAdapter"]
