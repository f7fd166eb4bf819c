"""The user's loss and metrics for PyTorch, torchmetrics included; defaults only where shapes leave no doubt.

``loss_fn`` is any ``(output, target) -> value`` callable or ``nn.Module`` loss, called as an
evaluation loop calls it: ``loss_fn(model(x), y)``, with the model's output as it returns it
(a tensor, a tuple, a dict) and the batch's targets as they come (a ``(y, w)`` pair stays a
pair). ``metrics`` maps names to such callables or to torchmetrics ``Metric`` objects. A
callable's value on a batch is its batch mean (one number), its sum (one number, only from an
object whose ``reduction`` is ``'sum'``, such as ``nn.CrossEntropyLoss(reduction='sum')``: a
plain function's one number is taken as a mean), or one value per sample (``reduction='none'``)
(:func:`evalgap.engine.tasks.batch_total`); the totals are summed on the device and moved to the
host once, so every mode gives the per-sample mean over all batches. A torchmetrics object runs
on a fresh copy per mode (``update`` per batch, ``compute`` at the end, reduced by torchmetrics' own
synchronization over exactly the processes of ``process_group``, as everything else is: :func:`fresh_copy`),
so the user's object is left as it was (its process group and settings too); the direction it states
(``higher_is_better``, when not None) is the report's for that name. Without
``loss_fn``/``metrics`` the defaults of :mod:`evalgap.engine.tasks` apply, with PyTorch's own
functions, on the prediction in the output (:func:`prediction`), in its dtype where that is float32 or float64
(a float64 model's loss and accuracy stay float64), else in float32.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..engine import Batch, Collective
from ..engine.tasks import batch_total, check_class_labels, completed, default_task, two_class_axes
from ..errors import DataError, ModelError
from .data import to_device

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


def prediction(output: Any) -> torch.Tensor:
    """The prediction tensor in a model's output: the tensor, a dict's (or a dataclass's) logits/output/out,
    a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        output = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    if isinstance(output, Mapping):
        for key in ("logits", "output", "out"):
            if key in output:
                return output[key]
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot find the model's prediction in an output of type {type(output).__name__}: return a tensor (or a "
                     "dict or dataclass with 'logits'), pass loss_fn= and metrics= that take the output as it is, or pass forward=.")


def is_torchmetric(m: Any) -> bool:
    return all(hasattr(m, a) for a in ("update", "compute", "reset")) and not isinstance(m, nn.modules.loss._Loss)


def _labels(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class indices shaped as the scores without their class axis: (N, 1) labels as (N,) (engine.tasks)."""
    return target.reshape(output.shape[:1] + output.shape[2:])


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, _labels(output, target).long())  # int32/int16 labels too, as NumPy gives them


def _dtype(output: torch.Tensor) -> torch.dtype:
    """The dtype a default computes in: the output's (float64 stays float64), float32 for any other."""
    return output.dtype if output.dtype in (torch.float32, torch.float64) else torch.float32


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.argmax(1) == _labels(output, target)).to(_dtype(output)).mean()


def _binary_accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dtype = _dtype(output)
    return ((output > 0).to(dtype) == target.reshape(output.shape).to(dtype)).to(dtype).mean()


def _bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    output = output.to(_dtype(output))
    return nn.functional.binary_cross_entropy_with_logits(output, target.reshape(output.shape).to(output.dtype))


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target.reshape(output.shape).to(output.dtype))


DEFAULTS: dict[str, tuple[Metric, dict[str, Metric]]] = {
    "classification": (_cross_entropy, {"accuracy": _accuracy}),
    "segmentation": (_cross_entropy, {"accuracy": _accuracy}),
    "binary": (_bce, {"accuracy": _binary_accuracy}),
    "regression": (_mse, {}),
}


def _task(output: torch.Tensor, target: Any) -> str:
    if not isinstance(target, torch.Tensor):
        raise DataError(f"the targets are {type(target).__name__}, not a tensor: pass loss_fn= and metrics= that take them.")
    t = target.detach()
    binary = bool(t.numel()) and bool(((t == 0) | (t == 1)).all())
    soft = _probability_rows(t)
    integer = not torch.is_floating_point(t)
    task = default_task(output.shape, t.shape, integer, binary, soft, classes_last_too=True)
    if task is None:
        example = "torch.nn.BCEWithLogitsLoss()"
        why = (" The targets look like class probabilities (soft labels: label smoothing, mixup, distillation): "
               "torch.nn.CrossEntropyLoss() takes them as targets." if soft else "")
        if integer and two_class_axes(output.shape, t.shape):
            example = "lambda o, t: torch.nn.functional.cross_entropy(o.flatten(0, -2), t.flatten()) for per-token scores"
            why = (" These shapes fit two readings: the classes on axis 1 (segmentation: scores (N, C, ...), one label per "
                   "position) or on the last axis (per token: scores (N, L, C), one label per token), and each gives a "
                   "different loss and accuracy.")
        raise DataError(
            f"cannot choose a loss for outputs of shape {tuple(output.shape)} and {t.dtype} targets of shape {tuple(t.shape)}: "
            f"pass loss_fn=(output, target) -> scalar (e.g. {example}) and metrics={{'name': ...}} "
            f"(callables or torchmetrics objects).{why}"
        )
    if task in ("classification", "segmentation"):
        check_class_labels(t.cpu().numpy(), int(output.shape[1]), _ignore_fix)
        p = output.detach().float()
        if bool((p >= 0).all()) and bool(torch.allclose(p.sum(1), torch.ones_like(p.sum(1)), atol=1e-4)):
            raise DataError(
                "the outputs look like probabilities (non-negative, summing to 1), and cross-entropy expects logits: "
                "return logits, or pass loss_fn= (e.g. lambda p, t: torch.nn.functional.nll_loss(p.log(), t))."
            )
    return task


def _ignore_fix(marker: int, classes: int) -> str:
    """The loss and metric that leave a 'no label' ``marker`` out (:func:`evalgap.engine.tasks.check_class_labels`)."""
    return (f"loss_fn=torch.nn.CrossEntropyLoss(ignore_index={marker}) and metrics={{'accuracy': "
            f"torchmetrics.classification.MulticlassAccuracy({classes}, ignore_index={marker}, average='micro')}}")


#: A loss that leaves non-finite targets out, for the error that asks for one (:func:`evalgap.engine.tasks.non_finite_error`).
MASKED_EXAMPLE = "loss_fn=lambda o, t: torch.nn.functional.mse_loss(o[t.isfinite()], t[t.isfinite()])"


def _non_finite(target: Any) -> tuple[int, int]:
    """How many values of a floating-point target tensor are NaN or Inf, and of how many (0, 0 for anything else)."""
    if not isinstance(target, torch.Tensor) or not torch.is_floating_point(target):
        return 0, 0
    return int((~torch.isfinite(target.detach())).sum()), int(target.numel())


def _probability_rows(t: torch.Tensor) -> bool:
    """Float targets of at least two classes on axis 1, non-negative, each row summing to 1 (class probabilities)."""
    if not torch.is_floating_point(t) or t.dim() < 2 or t.shape[1] < 2 or not t.numel():
        return False
    f = t.float()  # not float64: MPS has none
    return bool((f >= 0).all()) and bool(torch.allclose(f.sum(1), torch.ones((), dtype=f.dtype, device=f.device), atol=1e-4))


class TorchMetrics:
    """:class:`evalgap.engine.Metrics` for PyTorch (see the module docstring)."""

    def __init__(self, loss_fn: Metric, metrics: Mapping[str, Any], *, given: list[str], notes: list[str], collective: Collective | None,
                 defaults: frozenset[str] = frozenset()):
        self.loss_fn, self.metrics, self.collective = loss_fn, dict(metrics), collective
        self.names = ["loss", *self.metrics]
        self.given, self.notes = given, notes
        self.defaults = defaults  # names computed by evalgap's defaults, on prediction(output)
        self.tensor_output = True  # the first output seen was a tensor (see _State.update)
        # the direction a torchmetrics object states (MeanAbsoluteError: False), over what its name says
        self.higher_is_better: dict[str, bool] = {
            name: bool(m.higher_is_better) for name, m in (("loss", loss_fn), *self.metrics.items())
            if is_torchmetric(m) and isinstance(getattr(m, "higher_is_better", None), bool)
        }

    @classmethod
    def choose(cls, batch: Batch, outputs: Any, *, loss_fn=None, metrics=None, collective=None) -> "TorchMetrics":
        """The user's loss and metrics, completed with the defaults the shapes imply."""
        if metrics is not None and not isinstance(metrics, Mapping):
            raise DataError("metrics must be a dict {'name': callable or torchmetrics.Metric}.")
        given = list(metrics) if metrics else []
        loss_fn, metrics, defaults, notes = completed(loss_fn, metrics, lambda: _task(prediction(outputs), batch.targets), DEFAULTS,
                                                      lambda: _non_finite(batch.targets), MASKED_EXAMPLE)
        if getattr(loss_fn, "reduction", None) == "sum":
            notes.append("loss: loss_fn sums over each batch (reduction='sum'); the loss reported is its total over the data "
                         "divided by the number of samples.")
        raw = batch.raw
        if isinstance(raw, (list, tuple)) and not hasattr(raw, "_fields") and len(raw) > 2:
            notes.append(f"the batches hold {len(raw)} elements; the first is the input, the second the targets, the rest is not "
                         "used: to weight the loss by sample, pass the weights with the targets, (x, (y, w)), and a loss_fn "
                         "that applies them.")
        spec = cls(loss_fn, metrics, given=given, notes=notes, collective=collective, defaults=defaults)
        spec.tensor_output = isinstance(outputs, torch.Tensor)
        return spec

    def new(self) -> "_State":
        return _State(self)


class _State:
    def __init__(self, spec: TorchMetrics):
        self.spec = spec
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.objects = {name: fresh_copy(m, spec.collective) for name, m in (("loss", spec.loss_fn), *spec.metrics.items())
                        if is_torchmetric(m)}

    def update(self, batch: Batch, outputs: Any) -> None:
        if batch.weights is not None:
            raise DataError(
                "sample weights were given as a third array, but a PyTorch loss_fn sees (output, target): pass the weights "
                "with the targets, (x, (y, w)), and a loss_fn that applies them, e.g. "
                "loss_fn=lambda out, t: (torch.nn.functional.cross_entropy(out, t[0], reduction='none') * t[1]).mean()."
            )
        spec = self.spec
        if spec.tensor_output and not isinstance(outputs, torch.Tensor):
            # a model that returns more in training mode (InceptionV3, GoogLeNet: logits and auxiliary logits) than the
            # tensor it returns in evaluation mode: the user's callables get what an evaluation loop gives them
            outputs = prediction(outputs)
            note = ("the model returns more than a tensor in training mode (auxiliary outputs): T uses its prediction "
                    "(a tuple's first element, a dict's logits), as the evaluation mode's output is a tensor.")
            if note not in spec.notes:
                spec.notes.append(note)
        pred = None
        if spec.defaults:
            pred = prediction(outputs)
            pred = pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred
        device = (pred if pred is not None else _first_tensor(outputs)).device
        target = to_device(batch.targets, device)
        k = batch.size if batch.size is not None else int(prediction(outputs).shape[0])
        with torch.no_grad():
            for name, fn in (("loss", spec.loss_fn), *spec.metrics.items()):
                out = pred if name in spec.defaults else outputs
                if name in self.objects:
                    self.objects[name].to(device).update(out, target)
                    continue
                value = fn(out, target)
                value = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
                how = batch_total(name if name != "loss" else "loss_fn", tuple(value.shape), k, getattr(fn, "reduction", None) == "sum")
                value = value.to(torch.float64)
                total = value.sum() if how == "each" else value.reshape(()) if how == "sum" else value.reshape(()) * k
                self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.count += k

    def result(self) -> dict[str, float]:
        keys = [n for n in self.spec.names if n not in self.objects]
        values = np.array([float(self.sums[k]) for k in keys] + [float(self.count)], dtype=np.float64)
        if self.spec.collective is not None:  # per-sample sums and counts over every process
            values = self.spec.collective.sum(values)
        out = {k: v / values[-1] for k, v in zip(keys, values[:-1])}
        out.update({name: _one_number(name, m) for name, m in self.objects.items()})
        return {name: float(out[name]) for name in self.spec.names}


def _metrics_in(obj: Any) -> list[Any]:
    """``obj`` and the torchmetrics ``Metric`` objects inside it (a wrapper's, a collection's), by their sync attributes."""
    found = obj.modules() if isinstance(obj, nn.Module) else [obj]
    return [m for m in found if all(hasattr(m, a) for a in ("process_group", "sync_on_compute", "_to_sync", "sync"))]


def _distributed() -> bool:
    return True


def fresh_copy(metric: Any, collective: Collective | None) -> Any:
    """A reset deep copy of a torchmetrics object whose ``compute()`` reduces its states (with torchmetrics' own
    ``sync``: each state's ``dist_reduce_fx``, the user's ``dist_sync_fn``) over exactly ``collective.group``, and
    over no process at all without a collective (one process, a group of one).

    No side effect on ``metric``: the copy shares its process groups (which cannot be copied) and nothing else;
    ``process_group``, ``sync_on_compute``, ``dist_sync_on_step`` and ``distributed_available_fn`` are set on the
    copy (and on the metrics inside it) only.
    """
    shared = {id(m.process_group): m.process_group for m in _metrics_in(metric) if m.process_group is not None}
    copied = copy.deepcopy(metric, shared)
    copied.reset()
    for m in _metrics_in(copied):
        m.process_group = None if collective is None else collective.group  # a collective's None: the default group
        m.sync_on_compute = m._to_sync = collective is not None
        m._should_unsync = True
        m.dist_sync_on_step = False  # update() only, never forward(): nothing is synchronized per batch
        if collective is not None:
            m.distributed_available_fn = _distributed  # every process of the group reduces, whatever the object says
    return copied


def _one_number(name: str, metric: Any) -> float:
    """A torchmetrics object's ``compute()`` as one number; anything else (per-class values, a collection's dict)
    is a DataError naming the metric."""
    value = metric.compute()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    got = f"a {type(value).__name__} of {len(value)} entries" if isinstance(value, Mapping) else \
        f"values of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
    raise DataError(
        f"metric {name!r} ({type(metric).__name__}) computed {got}, not one number: configure it to give one (e.g. "
        "average='micro' or 'macro' instead of None), or pass each metric of a collection under its own name in metrics={...}."
    )


def _first_tensor(output: Any) -> torch.Tensor:
    """The first tensor in a (nested) output, for its device."""
    from ..engine import tree_leaves

    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise ModelError(f"the model's output ({type(output).__name__}) holds no tensor: return one, or pass forward=.")
