"""From measurements to findings: the causes of a gap, with evidence and a remedy to paste.

Framework-free. The adapters measure (:mod:`evalgap.keras.diagnose`, :mod:`evalgap.torch.diagnose`)
and describe the model in a :class:`Context`; :func:`build_report` turns that into a
:class:`evalgap.Report`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .attribution import Decomposition, Finding, is_fraction
from .recalibration import LARGE_DRIFT, Recalibration
from .report import Report
from .stats import EMA, decay_from_momentum, momentum_for_memory


@dataclass
class InputScale:
    """Per-channel statistics of what reaches the model's first layer."""

    mean: list[float]
    std: list[float]
    min: float
    max: float
    integer_valued: bool

    @classmethod
    def measure(cls, x: np.ndarray, channel_axis: int) -> "InputScale":
        a = np.asarray(x, dtype=np.float64)
        flat = np.moveaxis(a, channel_axis, -1).reshape(-1, a.shape[channel_axis]) if a.ndim > 1 else a.reshape(-1, 1)
        sample = flat[: min(len(flat), 200_000)]
        return cls(
            mean=flat.mean(axis=0).tolist(),
            std=flat.std(axis=0).tolist(),
            min=float(flat.min()),
            max=float(flat.max()),
            integer_valued=bool(np.all(np.equal(np.mod(sample, 1.0), 0.0))),
        )

    @property
    def raw_pixels(self) -> bool:
        return self.min >= 0.0 and 1.5 < self.max <= 255.0 and (self.integer_valued or self.max > 20.0)

    @property
    def far_from_standard(self) -> bool:
        return max(abs(m) for m in self.mean) > 3.0 or max(self.std) > 5.0 or min(self.std) < 0.05


@dataclass
class Context:
    """What the adapter knows about the model and how it was trained."""

    framework: str  # "keras/jax", "torch", ...
    api: str  # "evalgap.keras" or "evalgap.torch"
    samples: int
    batch_size: int | None
    data_expr: str = "train_data"
    input_scale: InputScale | None = None
    momenta: list[float | None] = field(default_factory=list)
    convention: str = "keras"
    steps_per_epoch: int | None = None
    epochs: int | None = None
    bn_updates: int | None = None
    training_only_layers: list[str] = field(default_factory=list)
    other_normalization: list[str] = field(default_factory=list)
    replicas: int = 1
    synchronized: bool = False
    frozen_effect: dict[str, float] = field(default_factory=dict)  # metric -> P_frozen - P
    notes: list[str] = field(default_factory=list)


def _fmt(metric: str, value: float, signed: bool = False) -> str:
    if is_fraction(metric):
        return f"{100 * value:+.1f} points" if signed else f"{value:.4f}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _momentum_advice(ctx: Context) -> tuple[str | None, dict[str, Any]]:
    if not ctx.momenta or not ctx.steps_per_epoch:
        return None, {}
    momentum = Counter(ctx.momenta).most_common(1)[0][0]
    ema = EMA(momentum, ctx.convention)  # type: ignore[arg-type]
    updates = ctx.bn_updates if ctx.bn_updates is not None else (ctx.steps_per_epoch * ctx.epochs if ctx.epochs else None)
    advice = momentum_for_memory(ctx.steps_per_epoch, convention=ctx.convention)  # type: ignore[arg-type]
    numbers: dict[str, Any] = {
        "momentum": momentum,
        "convention": ctx.convention,
        "steps_per_epoch": ctx.steps_per_epoch,
        "memory_updates": ema.memory,
        "advised_momentum": round(advice, 4),
    }
    parts = [
        f"BatchNorm momentum {momentum} ({ctx.convention} convention) with {ctx.steps_per_epoch} steps per epoch: "
        f"the moving statistics remember about {ema.memory:.0f} updates ({ema.memory / ctx.steps_per_epoch:.1f} epochs)"
    ]
    if updates is not None:
        w = ema.initial_weight(updates)
        age = ema.mean_age(updates)
        numbers.update(updates=updates, initial_weight=w, mean_age_updates=age, mean_age_epochs=age / ctx.steps_per_epoch)
        parts.append(
            f"; after {updates} updates {100 * w:.0f}% of them is still the initial value and they are on average "
            f"{age:.0f} updates ({age / ctx.steps_per_epoch:.1f} epochs) old"
        )
    advised_decay = decay_from_momentum(advice, ctx.convention)  # type: ignore[arg-type]
    too_slow = ema.decay is not None and ema.decay > advised_decay + 1e-12
    numbers["too_slow"] = bool(too_slow)
    return "".join(parts) + ".", numbers


def _momentum_remedy(ctx: Context, numbers: dict[str, Any]) -> str:
    m = numbers.get("advised_momentum")
    if ctx.api == "evalgap.keras":
        return f"keras.layers.BatchNormalization(momentum={m})  # memory of at most half an epoch"
    return f"torch.nn.BatchNorm2d(C, momentum={m})  # memory of at most half an epoch"


def build_report(
    decompositions: dict[str, Decomposition],
    recalibration: Recalibration | None,
    ctx: Context,
    primary: str | None = None,
) -> Report:
    """Rank the causes of the primary metric's gap and gather the findings."""
    if primary is None and decompositions:
        primary = next((m for m in decompositions if is_fraction(m)), next(iter(decompositions)))
    findings: list[Finding] = []
    recal_line = f"{ctx.api}.recalibrate(model, {ctx.data_expr})"
    callback_line = (
        f"model.fit(..., callbacks=[evalgap.keras.PreciseBN({ctx.data_expr})])"
        if ctx.api == "evalgap.keras"
        else f"evalgap.torch.recalibrate(model, {ctx.data_expr}) before each validation"
    )
    if recalibration is None:
        findings.append(Finding("no_batchnorm", "info", "The model has no BatchNorm layer: the gap does not come from normalization statistics."))
    d = decompositions.get(primary) if primary else None
    ema_text, ema_numbers = _momentum_advice(ctx)
    significant = d.significant() if d is not None else {}

    if d is not None:
        v = d.values
        for name, value in d.ranked():
            if name not in significant:
                continue
            if name == "stale_moving_statistics":
                msg = (
                    f"Evaluation mode uses moving statistics that do not match the weights: with exact population "
                    f"statistics {primary} is {_fmt(primary, v['P'])} instead of {_fmt(primary, v['E'])} "
                    f"({_fmt(primary, value, True)})."
                )
                if ema_text:
                    msg += " " + ema_text
                remedy = f"{recal_line}\n{callback_line}"
                if ema_numbers.get("too_slow"):
                    remedy += "\n" + _momentum_remedy(ctx, ema_numbers)
                findings.append(Finding(name, "cause", msg, remedy, {"P": v["P"], "E": v["E"], **ema_numbers}))
            elif name == "batch_statistics":
                per = f" per replica ({ctx.replicas} replicas, {ctx.batch_size // ctx.replicas if ctx.batch_size else '?'} samples each)" if ctx.replicas > 1 and not ctx.synchronized else ""
                msg = (
                    f"Training mode normalizes each batch of {ctx.batch_size}{per} by its own statistics: "
                    f"{primary} {_fmt(primary, v['Td'])} with batch statistics vs {_fmt(primary, v['P'])} with the "
                    f"population's ({_fmt(primary, value, True)}). Batches that are small or not shuffled (e.g. in "
                    "class order) have statistics far from the population's."
                )
                remedy = "Shuffle the training data so that every batch is representative, or use larger batches" + (
                    " (or synchronized BatchNorm across replicas)" if per else ""
                ) + "; validation with population statistics is the number to trust."
                findings.append(Finding(name, "cause", msg, remedy, {"Td": v["Td"], "P": v["P"], "batch_size": ctx.batch_size, "replicas": ctx.replicas}))
            elif name == "training_only_layers":
                layers = ", ".join(ctx.training_only_layers[:5]) or "dropout/noise layers"
                msg = (
                    f"Training-only layers ({layers}) are active in training mode: {primary} "
                    f"{_fmt(primary, v['T'])} with them vs {_fmt(primary, v['Td'])} without ({_fmt(primary, value, True)})."
                )
                findings.append(Finding(name, "cause", msg, "Expected behaviour: compare validation with training-mode metrics without dropout (this report's Td).", {"T": v["T"], "Td": v["Td"]}))
            elif name == "epoch_average":
                msg = (
                    f"fit reports {primary} averaged over the epoch while the weights moved: {_fmt(primary, v['F'])} "
                    f"vs {_fmt(primary, v['T'])} at the epoch's final weights ({_fmt(primary, value, True)})."
                )
                findings.append(Finding(name, "cause", msg, "Compare validation with model.evaluate(train_data) at the end of the epoch, not with fit's running average.", {"F": v["F"], "T": v["T"]}))
            elif name == "data":
                msg = (
                    f"The validation data differ from the training data: in evaluation mode {_fmt(primary, v['E'])} on the "
                    f"training data vs {_fmt(primary, v['E_val'])} on the validation data ({_fmt(primary, value, True)})."
                )
                findings.append(Finding(name, "cause", msg, "This is the generalization gap: more data, augmentation or regularization.", {"E": v["E"], "E_val": v["E_val"]}))

    if recalibration is not None:
        first = recalibration.first_drifting(include_frozen=False)
        worst = sorted((layer for layer in recalibration.layers if layer.drift is not None and layer.status != "frozen"), key=lambda layer: -layer.drift.worst)[:3]
        if first is not None and first.drift is not None:
            findings.append(
                Finding(
                    "drift",
                    "warning" if "stale_moving_statistics" not in significant else "cause",
                    f"First drifting layer in forward order: {first.name} (mean off by up to {first.drift.mean_max:.3g} "
                    f"std, variance by a factor up to {math.exp(min(first.drift.var_max, 700)):.3g}); later layers inherit "
                    f"its error. Largest drift: " + ", ".join(f"{layer.name} {layer.drift.worst:.3g}" for layer in worst) + ".",
                    recal_line,
                    {"first_layer": first.name, "threshold": LARGE_DRIFT, "max_drift": worst[0].drift.worst},
                )
            )
        if recalibration.frozen:
            names = [layer.name for layer in recalibration.frozen]
            worst_frozen = max((layer.drift.worst for layer in recalibration.frozen if layer.drift is not None), default=0.0)
            effect = ctx.frozen_effect.get(primary) if primary else None
            msg = (
                f"{len(names)} frozen BatchNorm layer(s) normalize with their stored statistics in both modes "
                f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}); largest drift from this data's statistics {worst_frozen:.3g}."
            )
            severity = "info"
            if effect is not None:
                msg += f" Recalibrating them too would change {primary} by {_fmt(primary, effect, True)}."
                if d is not None and abs(effect) > d.threshold():
                    severity = "warning"
            findings.append(Finding("frozen", severity, msg, f"{ctx.api}.recalibrate(model, {ctx.data_expr}, include_frozen=True)", {"layers": names, "max_drift": worst_frozen, "effect": effect}))

    if ctx.input_scale is not None:
        s = ctx.input_scale
        numbers = {"mean": s.mean, "std": s.std, "min": s.min, "max": s.max}
        mean = "[" + ", ".join(f"{m:.4g}" for m in s.mean) + "]"
        var = "[" + ", ".join(f"{t * t:.4g}" for t in s.std) + "]"
        stale = "stale_moving_statistics" in significant
        if s.raw_pixels:
            msg = (
                f"The inputs are raw [0, 255] pixels (min {s.min:.4g}, max {s.max:.4g}, mean {mean}): the first layers' "
                "statistics are huge and far from the moving statistics' initial mean 0 and variance 1, so stale "
                "moving statistics hurt most there."
            )
            remedy = (
                f"keras.layers.Rescaling(1 / 255.0)  # or keras.layers.Normalization(mean={mean}, variance={var})"
                if ctx.api == "evalgap.keras"
                else f"x = (x - torch.tensor({mean}).view(1, -1, 1, 1)) / torch.tensor({[round(t, 4) for t in s.std]}).view(1, -1, 1, 1)"
            )
            findings.append(Finding("input_scale", "cause" if stale else "warning", msg, remedy, numbers))
        elif s.far_from_standard:
            msg = f"The inputs are far from zero mean and unit variance (mean {mean}, std {[round(t, 4) for t in s.std]})."
            remedy = f"keras.layers.Normalization(mean={mean}, variance={var})" if ctx.api == "evalgap.keras" else f"normalize with mean {mean} and std {[round(t, 4) for t in s.std]}"
            findings.append(Finding("input_scale", "cause" if stale else "info", msg, remedy, numbers))
    if ema_text and not any(f.kind == "stale_moving_statistics" for f in findings):
        findings.append(Finding("ema", "warning" if ema_numbers.get("too_slow") else "info", ema_text, _momentum_remedy(ctx, ema_numbers) if ema_numbers.get("too_slow") else None, ema_numbers))
    if ctx.replicas > 1:
        per = ctx.batch_size // ctx.replicas if ctx.batch_size else None
        findings.append(
            Finding(
                "replicas",
                "info",
                f"{ctx.replicas} replicas: BatchNorm {'synchronizes statistics across replicas' if ctx.synchronized else f'normalizes each replica batch of {per} on its own'}.",
                None if ctx.synchronized else "keras.layers.BatchNormalization(synchronized=True) or torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if per-replica batches are small",
                {"replicas": ctx.replicas, "per_replica_batch": per, "synchronized": ctx.synchronized},
            )
        )
    if ctx.other_normalization:
        findings.append(
            Finding(
                "other_normalization",
                "info",
                f"{len(ctx.other_normalization)} LayerNorm/GroupNorm-style layer(s) ({', '.join(ctx.other_normalization[:4])}) normalize each "
                "sample the same way in both modes: they do not cause this gap.",
                None,
                {"layers": ctx.other_normalization},
            )
        )
    rank = {"cause": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: rank.get(f.severity, 3))
    return Report(
        framework=ctx.framework,
        samples=ctx.samples,
        batch_size=ctx.batch_size,
        decompositions=decompositions,
        primary=primary,
        recalibration=recalibration,
        findings=findings,
        notes=list(ctx.notes),
    )
