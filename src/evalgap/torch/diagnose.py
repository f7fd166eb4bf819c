"""``evalgap.torch.diagnose``: measure a PyTorch model in every mode on the same data and explain the gap.

Passes over the probe batches (whole batches; a ragged last batch is left out):

1. evaluation mode with the current running statistics (E), on the model itself;
2. on a side copy (``copy.deepcopy``): :func:`evalgap.torch.recalibrate`'s pass, BN on batch
   statistics and dropout off (Td), which also gathers the population statistics;
3. the copy in evaluation mode, now holding the population statistics (P);
4. only with dropout/noise modules: the copy in full training mode (T), RNG state restored;
   only with frozen BN layers: a second copy with those recalibrated too (their effect);
   only with ``val_data``: evaluation mode on the validation data.

The model itself is only run in evaluation mode under ``torch.no_grad()``; its modes are
restored, so it is left exactly as it was. The copy costs one more model in memory.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .._checks import check_labels
from ..attribution import decompose
from ..diagnosis import Context, InputScale, build_report
from ..errors import DataError, ModelError
from ..report import Report
from ._batches import Forward, batch_size_of, call_model, model_device, model_input, to_device
from .distributed import active_group, all_reduce_sums
from .precise_bn import find_batchnorms, recalibrate

TARGET_KEYS = ("label", "labels", "y", "target", "targets")
TRAINING_ONLY_TOKENS = ("Dropout", "Noise")
OTHER_NORMALIZATION = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


def _target(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
    raise DataError(
        "diagnose needs targets to measure the loss and metrics: give batches as (input, target) tuples or dicts "
        f"with one of the keys {TARGET_KEYS}."
    )


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "output", "out"):
            if key in output:
                return output[key]
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot find the model's prediction in an output of type {type(output).__name__}: return a tensor, or pass forward=.")


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if output.dim() >= 2 and output.shape[1] > 1:
        pred = output.argmax(1)
        if target.dim() == output.dim() and target.shape == output.shape:  # one-hot or soft labels
            target = target.argmax(1)
        return (pred == target).float().mean()
    return ((output.reshape(-1) > 0).long() == target.reshape(-1).long()).float().mean()


def _default_metrics(output: torch.Tensor, target: torch.Tensor) -> tuple[Metric, dict[str, Metric]]:
    integer = not torch.is_floating_point(target)
    if output.dim() >= 2 and output.shape[1] > 1 and (integer or target.shape == output.shape):
        return (lambda o, t: nn.functional.cross_entropy(o, t)), {"accuracy": _accuracy}
    raise ModelError(
        "cannot guess the loss: the outputs are not class scores with integer labels. Pass loss_fn=(output, target) -> "
        "scalar and metrics={'name': (output, target) -> scalar}."
    )


class _Evaluator:
    """Runs the model on the probe batches and averages loss and metrics per sample."""

    def __init__(self, loss_fn: Metric, metrics: dict[str, Metric], forward: Forward | None, device: torch.device, group=None):
        self.loss_fn, self.metrics, self.forward, self.device, self.group = loss_fn, metrics, forward, device, group

    def score(self, outputs: list[torch.Tensor], targets: list[Any]) -> dict[str, float]:
        sums: dict[str, float] = {}
        n = 0
        for out, t in zip(outputs, targets):
            t = to_device(t, out.device)
            k = int(out.shape[0])
            for name, fn in (("loss", self.loss_fn), *self.metrics.items()):
                sums[name] = sums.get(name, 0.0) + float(fn(out, t)) * k
            n += k
        if self.group is not None:  # per-sample sums and counts over every rank
            sums["__n__"] = float(n)
            sums = all_reduce_sums(sums, self.group[0])
            n = sums.pop("__n__")
        return {name: value / n for name, value in sums.items()}

    @torch.no_grad()
    def outputs(self, model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
        return [_logits(call_model(model, to_device(b, self.device), self.forward)).float() for b in batches]


def _eval_mode_outputs(ev: _Evaluator, model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        return ev.outputs(model, batches)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _probe(data: Iterable[Any], max_samples: int | None) -> tuple[list[Any], int | None, int]:
    probe, size, skipped = [], None, 0
    for batch in data:
        n = batch_size_of(batch)
        if size is None:
            size = n
        elif n is not None and size is not None and n < size:
            skipped += n
            continue
        if max_samples is not None and size and (len(probe) + 1) * size > max_samples and probe:
            break
        probe.append(batch)
    if not probe:
        raise DataError("the data yielded no batch: pass the training data as (input, target) batches.")
    return probe, size, skipped


def diagnose(
    model: nn.Module,
    data: Iterable[Any],
    *,
    loss_fn: Metric | None = None,
    metrics: dict[str, Metric] | None = None,
    forward: Forward | None = None,
    fit_metric: float | dict[str, float] | None = None,
    max_samples: int | None = None,
    val_data: Iterable[Any] | None = None,
    progress: bool = True,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    bn_updates: int | None = None,
    process_group=None,
) -> Report:
    """Measure the gap between training and evaluation mode on ``data`` and explain it.

    Args:
        model: the model (a DDP wrapper is unwrapped).
        data: ``(input, target)`` batches (a DataLoader, a list, ...) of the training batch size.
        loss_fn: ``(output, target) -> scalar`` (default: cross-entropy for class scores).
        metrics: ``{"name": (output, target) -> scalar}`` batch means (default: accuracy).
        forward: ``forward(model, batch) -> output`` to call the model yourself.
        fit_metric: what the training loop reported for the last epoch (F): a dict by metric
            name, or one number for accuracy (or the loss if there is no accuracy).
        max_samples: probe at most this many samples (whole batches).
        val_data: separate validation batches, for the data term.
        steps_per_epoch, epochs: for the EMA arithmetic of the running statistics.
        bn_updates: the number of BatchNorm updates actually made (GapMonitor counts them).
        process_group: under ``torch.distributed``, every rank passes its own data; the
            population statistics and every metric are reduced over the ranks exactly, so
            every rank gets the same report (collective: every rank must call it).

    Returns:
        :class:`evalgap.Report`; the model is left exactly as it was.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if not isinstance(model, nn.Module):
        raise ModelError(f"diagnose needs a torch.nn.Module, got {type(model).__name__}.")
    probe, size, skipped = _probe(data, max_samples)
    device = model_device(model)
    targets = [_target(b) for b in probe]
    group = active_group(process_group)
    if group is not None and group[2] != 0:
        progress = False
    ev = _Evaluator(loss_fn, metrics or {}, forward, device, group)  # type: ignore[arg-type]

    e_out = _eval_mode_outputs(ev, model, probe)
    if e_out[0].dim() >= 2 and e_out[0].shape[1] > 1:
        for t in targets:
            if isinstance(t, torch.Tensor) and t.shape != e_out[0].shape:
                check_labels(t.detach().cpu().numpy(), int(e_out[0].shape[1]))
    if loss_fn is None or metrics is None:
        default_loss, default_metrics = _default_metrics(e_out[0], to_device(targets[0], e_out[0].device))
        ev.loss_fn = loss_fn or default_loss
        ev.metrics = metrics if metrics is not None else default_metrics
    by_mode = {"E": ev.score(e_out, targets)}

    bns = find_batchnorms(model)
    recal = None
    side = copy.deepcopy(model)
    td_out: list[torch.Tensor] = []
    if bns:
        def recording(m, batch):
            out = call_model(m, batch, forward)
            td_out.append(_logits(out).float())
            return out

        recal = recalibrate(side, probe, forward=recording, progress=progress, process_group=process_group)
        for layer in recal.layers:
            if layer.status == "recalibrated":
                layer.status = "measured"
        p_out = _eval_mode_outputs(ev, side, probe)
    else:
        td_out = p_out = e_out
    by_mode["Td"] = ev.score(td_out, targets)
    by_mode["P"] = ev.score(p_out, targets)

    training_only = [name for name, m in model.named_modules() if any(t in type(m).__name__ for t in TRAINING_ONLY_TOKENS)]
    if training_only:
        rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            side.train()
            by_mode["T"] = ev.score(ev.outputs(side, probe), targets)
        finally:
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
    else:
        by_mode["T"] = by_mode["Td"]

    frozen_effect: dict[str, float] = {}
    if recal is not None and recal.frozen:
        side2 = copy.deepcopy(model)
        recalibrate(side2, probe, forward=forward, include_frozen=True, progress=False, process_group=process_group)
        pf = ev.score(_eval_mode_outputs(ev, side2, probe), targets)
        frozen_effect = {k: pf[k] - by_mode["P"][k] for k in pf}
        del side2
    del side

    if val_data is not None:
        vprobe, _, _ = _probe(val_data, max_samples)
        by_mode["E_val"] = ev.score(_eval_mode_outputs(ev, model, vprobe), [_target(b) for b in vprobe])

    if fit_metric is not None and not isinstance(fit_metric, Mapping):
        fit_metric = {("accuracy" if "accuracy" in by_mode["E"] else "loss"): float(fit_metric)}
    decompositions = {}
    for name in by_mode["E"]:
        values = {mode: by_mode[mode][name] for mode in by_mode}
        if fit_metric and name in fit_metric:
            values["F"] = float(fit_metric[name])
        decompositions[name] = decompose(name, values)

    x = model_input(probe[0])
    scale = None
    if isinstance(x, torch.Tensor) and torch.is_floating_point(x) or (isinstance(x, torch.Tensor) and x.dtype == torch.uint8):
        xs = torch.cat([model_input(b).detach().cpu() for b in probe[: max(1, math.ceil(2048 / max(size or 1, 1)))]])
        scale = InputScale.measure(xs.numpy(), 1 if xs.dim() >= 3 else -1)
    world = 1 if group is None else group[1]
    ctx = Context(
        framework="torch",
        api="evalgap.torch",
        samples=sum(batch_size_of(b) or 0 for b in probe) if recal is None else recal.samples,
        batch_size=(size or 0) * world if world > 1 else size,
        data_expr="train_loader",
        input_scale=scale,
        momenta=[bn.momentum for _, bn in bns],
        convention="torch",
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        bn_updates=bn_updates,
        training_only_layers=training_only,
        other_normalization=[name for name, m in model.named_modules() if isinstance(m, OTHER_NORMALIZATION)],
        replicas=world,
        synchronized=bool(bns) and all(isinstance(bn, nn.SyncBatchNorm) for _, bn in bns),
        frozen_effect=frozen_effect,
        notes=([] if recal is None else list(recal.notes)) + ([f"left out {skipped} samples of ragged batches."] if skipped else []),
    )
    named = [k for k in decompositions if k != "loss"]
    primary = "accuracy" if "accuracy" in decompositions else (named[0] if named else "loss")
    return build_report(decompositions, recal, ctx, primary=primary)


__all__ = ["diagnose"]
