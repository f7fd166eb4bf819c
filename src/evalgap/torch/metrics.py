"""The user's loss and metrics for PyTorch, torchmetrics included; defaults only where shapes leave no doubt.

``loss_fn`` is any ``(output, target) -> scalar`` callable or ``nn.Module`` loss; ``metrics``
maps names to such callables (batch means) or to torchmetrics ``Metric`` objects. Callables
are averaged over samples (each batch's value weighted by its size, summed on the device and
moved to the host once); a torchmetrics object runs on a fresh copy per mode
(``update`` per batch, ``compute`` at the end, its own synchronization across processes), so
the user's object is left as it was. Without ``loss_fn``/``metrics`` the defaults of
:mod:`evalgap.engine.tasks` apply, with PyTorch's own functions.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from .._checks import check_labels
from ..engine import Batch, Collective
from ..engine.tasks import NOTES, default_task
from ..errors import DataError, ModelError
from .data import to_device

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


def prediction(output: Any) -> torch.Tensor:
    """The prediction tensor in a model's output: the tensor, a dict's logits/output/out, a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "output", "out"):
            if key in output:
                return output[key]
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot find the model's prediction in an output of type {type(output).__name__}: return a tensor, or pass forward=.")


def is_torchmetric(m: Any) -> bool:
    return all(hasattr(m, a) for a in ("update", "compute", "reset")) and not isinstance(m, nn.modules.loss._Loss)


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.argmax(1) == target).float().mean()


def _binary_accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output > 0).float() == target.reshape(output.shape).float()).float().mean()


def _bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(output, target.reshape(output.shape).float())


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target.reshape(output.shape).to(output.dtype))


DEFAULTS: dict[str, tuple[Metric, dict[str, Metric]]] = {
    "classification": (nn.functional.cross_entropy, {"accuracy": _accuracy}),
    "segmentation": (nn.functional.cross_entropy, {"accuracy": _accuracy}),
    "binary": (_bce, {"accuracy": _binary_accuracy}),
    "regression": (_mse, {}),
}


def _task(output: torch.Tensor, target: Any) -> str:
    if not isinstance(target, torch.Tensor):
        raise DataError(f"the targets are {type(target).__name__}, not a tensor: pass loss_fn= and metrics= that take them.")
    t = target.detach()
    binary = bool(t.numel()) and bool(((t == 0) | (t == 1)).all())
    task = default_task(output.shape, t.shape, not torch.is_floating_point(t), binary)
    if task is None:
        raise DataError(
            f"cannot choose a loss for outputs of shape {tuple(output.shape)} and {t.dtype} targets of shape {tuple(t.shape)}: "
            "pass loss_fn=(output, target) -> scalar (e.g. torch.nn.BCEWithLogitsLoss()) and metrics={'name': ...} "
            "(callables or torchmetrics objects)."
        )
    if task in ("classification", "segmentation"):
        check_labels(t.cpu().numpy(), int(output.shape[1]))
        p = output.detach().float()
        if bool((p >= 0).all()) and bool(torch.allclose(p.sum(1), torch.ones_like(p.sum(1)), atol=1e-4)):
            raise DataError(
                "the outputs look like probabilities (non-negative, summing to 1), and cross-entropy expects logits: "
                "return logits, or pass loss_fn= (e.g. lambda p, t: torch.nn.functional.nll_loss(p.log(), t))."
            )
    return task


class TorchMetrics:
    """:class:`evalgap.engine.Metrics` for PyTorch (see the module docstring)."""

    def __init__(self, loss_fn: Metric, metrics: Mapping[str, Any], *, given: list[str], notes: list[str], collective: Collective | None):
        self.loss_fn, self.metrics, self.collective = loss_fn, dict(metrics), collective
        self.names = ["loss", *self.metrics]
        self.given, self.notes = given, notes

    @classmethod
    def choose(cls, batch: Batch, outputs: Any, *, loss_fn=None, metrics=None, collective=None) -> "TorchMetrics":
        """The user's loss and metrics, completed with the defaults the shapes imply."""
        if metrics is not None and not isinstance(metrics, Mapping):
            raise DataError("metrics must be a dict {'name': callable or torchmetrics.Metric}.")
        notes = []
        given = list(metrics) if metrics else []
        if loss_fn is None or metrics is None:
            out = prediction(outputs)
            task = _task(out, batch.targets)
            default_loss, default_metrics = DEFAULTS[task]
            notes.append(f"{'loss and metrics' if loss_fn is None and metrics is None else 'loss' if loss_fn is None else 'metrics'}: "
                         f"{NOTES[task]}; pass loss_fn=/metrics= to measure your own.")
            loss_fn = loss_fn or default_loss
            metrics = metrics if metrics is not None else default_metrics
        return cls(loss_fn, metrics, given=given, notes=notes, collective=collective)

    def new(self) -> "_State":
        return _State(self)


class _State:
    def __init__(self, spec: TorchMetrics):
        self.spec = spec
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.objects = {name: copy.deepcopy(m) for name, m in spec.metrics.items() if is_torchmetric(m)}
        for m in self.objects.values():
            m.reset()

    def update(self, batch: Batch, outputs: Any) -> None:
        if batch.weights is not None:
            raise DataError(
                "sample weights were given, but PyTorch losses and metrics here are batch means: weight the loss in "
                "loss_fn (e.g. with reduction='none') and pass (x, y) without weights."
            )
        out = prediction(outputs)
        out = out.float() if torch.is_floating_point(out) else out
        target = to_device(batch.targets, out.device)
        k = int(out.shape[0])
        with torch.no_grad():
            for name, fn in (("loss", self.spec.loss_fn), *self.spec.metrics.items()):
                if name in self.objects:
                    self.objects[name].to(out.device).update(out, target)
                else:
                    value = torch.as_tensor(fn(out, target), dtype=torch.float64).detach() * k
                    self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += k

    def result(self) -> dict[str, float]:
        keys = [n for n in self.spec.names if n not in self.objects]
        values = np.array([float(self.sums[k]) for k in keys] + [float(self.count)], dtype=np.float64)
        if self.spec.collective is not None:  # per-sample sums and counts over every process
            values = self.spec.collective.sum(values)
        out = {k: v / values[-1] for k, v in zip(keys, values[:-1])}
        out.update({name: float(m.compute()) for name, m in self.objects.items()})
        return {name: float(out[name]) for name in self.spec.names}
