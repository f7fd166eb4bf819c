"""From measurements to findings: the causes of a gap, with evidence and a remedy to paste.

Framework-free. The engine measures (:mod:`evalgap.engine.diagnose`) and describes the model
in a :class:`Context`; :func:`build_report` turns that into a :class:`evalgap.Report`. The
code to paste comes from the adapter's remedies (``ctx.remedies``), so every framework gets
its own.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .attribution import Decomposition, Finding, is_fraction
from .recalibration import LARGE_DRIFT, Recalibration
from .report import Report, not_finite_text
from .stats import EMA, decay_from_momentum, momentum_for_memory


@dataclass
class InputScale:
    """Per-channel statistics of what reaches the model's first layer."""

    mean: list[float]
    std: list[float]
    min: float
    max: float
    axis: int = -1  # the channel axis of the model's input (1: channels first), for the code to paste

    @classmethod
    def measure(cls, x: np.ndarray, channel_axis: int, max_rows: int = 500_000, *, axis: int | None = None) -> "InputScale":
        """Per channel over all positions of ``x``; at most ``max_rows`` positions, evenly strided. ``axis``: the
        model input's channel axis when ``x`` is not laid out as the input (default ``channel_axis``)."""
        a = np.asarray(x)
        flat = np.moveaxis(a, channel_axis, -1).reshape(-1, a.shape[channel_axis]) if a.ndim > 1 else a.reshape(-1, 1)
        flat = flat[:: max(1, -(-len(flat) // max_rows))].astype(np.float64)
        return cls(
            mean=flat.mean(axis=0).tolist(),
            std=flat.std(axis=0).tolist(),
            min=float(flat.min()),
            max=float(flat.max()),
            axis=channel_axis if axis is None else axis,
        )

    @property
    def raw_pixels(self) -> bool:
        """8-bit pixel values: non-negative, at most 255, reaching above 100 (0-16 digits are not pixels to divide by 255)."""
        return self.min >= 0.0 and 100.0 < self.max <= 255.0

    @property
    def far_from_standard(self) -> bool:
        return max(abs(m) for m in self.mean) > 3.0 or max(self.std) > 5.0 or min(self.std) < 0.05


@dataclass
class LabelMix:
    """How many classes a batch holds, in the probe's batches and in shuffled batches of the same size."""

    classes: int
    batch_size: int
    per_batch: float  # mean number of distinct classes per batch, as batched
    shuffled: float  # the same for batches drawn at random from the same labels

    @property
    def unrepresentative(self) -> bool:
        """Batches hold clearly fewer classes than random batches would."""
        return self.per_batch < 0.75 * self.shuffled and self.shuffled - self.per_batch >= 1.0


def label_mix(batches: Iterable[Any], to_host: Callable[[list], list[np.ndarray]]) -> LabelMix | None:
    """Per-batch class counts of integer (or one-hot) targets; None for other targets."""
    labels = []
    for batch in batches:
        t = batch.targets
        if t is None or isinstance(t, (dict, list, tuple)):
            return None
        y = np.asarray(to_host([t])[0])
        if y.ndim == 2 and y.shape[1] > 1 and np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1):
            y = y.argmax(axis=1)
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
            return None
        labels.append(y.astype(np.int64))
    sizes = {len(y) for y in labels}
    if not labels or len(sizes) > 2:
        return None
    size = max(sizes)
    whole = [y for y in labels if len(y) == size]
    all_labels = np.concatenate(whole)
    classes = len(np.unique(all_labels))
    if classes < 2:
        return None
    rng = np.random.default_rng(0)
    shuffled = np.mean([len(np.unique(b)) for _ in range(4) for b in rng.permutation(all_labels).reshape(-1, size)])
    return LabelMix(classes, size, float(np.mean([len(np.unique(y)) for y in whole])), float(shuffled))


@dataclass
class Context:
    """What the engine knows about the model and how it was trained."""

    framework: str  # "keras/jax", "torch", ...
    remedies: Any  # the adapter's Remedies: code to paste
    samples: int
    batch_size: int | None
    convention: str = "keras"
    input_scale: InputScale | None = None
    momenta: list[float | None] = field(default_factory=list)
    steps_per_epoch: int | None = None
    epochs: int | None = None
    bn_updates: int | None = None
    training_only_layers: list[str] = field(default_factory=list)
    mode_dependent_layers: list[str] = field(default_factory=list)  # other code that may read the training flag
    other_normalization: list[str] = field(default_factory=list)
    running_instance_norm: list[str] = field(default_factory=list)  # per-sample normalization with running statistics
    replicas: int = 1
    synchronized: bool = False
    frozen_effect: dict[str, float] = field(default_factory=dict)  # metric -> P_frozen - P
    label_mix: LabelMix | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _fmt(metric: str, value: float, signed: bool = False) -> str:
    if is_fraction(metric):
        return f"{100 * value:+.1f} points" if signed else f"{value:.4f}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _momentum_advice(ctx: Context) -> tuple[str | None, dict[str, Any]]:
    momenta = [m for m in ctx.momenta if m is not None or ctx.convention == "torch"]
    momenta = [m for m in momenta if (decay_from_momentum(m, ctx.convention) or 0.0) < 1.0]  # a layer that never updates: none
    if not momenta or not ctx.steps_per_epoch:
        return None, {}
    momentum = Counter(momenta).most_common(1)[0][0]
    ema = EMA(momentum, ctx.convention)  # type: ignore[arg-type]
    updates = ctx.bn_updates if ctx.bn_updates is not None else (ctx.steps_per_epoch * ctx.epochs if ctx.epochs else None)
    advice = momentum_for_memory(ctx.steps_per_epoch, convention=ctx.convention)  # type: ignore[arg-type]
    numbers: dict[str, Any] = {
        "momentum": momentum,
        "convention": ctx.convention,
        "steps_per_epoch": ctx.steps_per_epoch,
        "memory_updates": ema.memory if math.isfinite(ema.memory) else None,
        "advised_momentum": round(advice, 4),
    }
    if ema.cumulative:  # PyTorch's momentum=None: every batch since the statistics were reset, equally
        text = (f"BatchNorm momentum None (a cumulative average) with {ctx.steps_per_epoch} steps per epoch: the moving "
                "statistics weigh every batch since they were reset equally, the first epochs' as much as the last's")
    else:
        text = (
            f"BatchNorm momentum {momentum} ({ctx.convention} convention) with {ctx.steps_per_epoch} steps per epoch: "
            f"the moving statistics remember about {ema.memory:.0f} updates ({ema.memory / ctx.steps_per_epoch:.1f} epochs)"
        )
    if updates is not None:
        w, age = ema.initial_weight(updates), ema.mean_age(updates)
        numbers.update(updates=updates, initial_weight=w, mean_age_updates=age, mean_age_epochs=age / ctx.steps_per_epoch)
        share = "" if ema.cumulative else f"{100 * w:.0f}% of them is still the initial value and "
        text += f"; after {updates} updates {share}they are on average {age:.0f} updates ({age / ctx.steps_per_epoch:.1f} epochs) old"
    # judged against the advice as printed (4 digits): a model rebuilt with the pasted 0.7143 is not 'too slow'
    advised_decay = decay_from_momentum(numbers["advised_momentum"], ctx.convention)  # type: ignore[arg-type]
    numbers["too_slow"] = bool(ema.decay is None or ema.decay > advised_decay + 1e-12)  # a cumulative average never forgets
    return text + ".", numbers


# ---------------------------------------------------------------------------------
# one function per term: (primary metric, its decomposition, the term's value, ctx) -> Finding
# ---------------------------------------------------------------------------------
def _not_a_cause(d: Decomposition, value: float) -> str:
    """Why a term above the noise threshold is not a cause: it narrows the gap, or the gap is within the noise."""
    if value * d.total < 0:
        return " This term narrows the gap (its sign is the gap's opposite): it is not why the two numbers differ."
    return " The gap itself is within the noise threshold: this term and others of the opposite sign offset each other."


def _severity(cause: bool) -> str:
    return "cause" if cause else "info"


def _stale(primary: str, d: Decomposition, value: float, ctx: Context, ema: tuple[str | None, dict], cause: bool) -> Finding:
    """P - E. Where the exact statistics score better (``goodness > 0``) the fix is to recalibrate: a cause when the
    term has the gap's sign, else a warning (validation would still gain). Where they score worse, recalibrating
    would lower the evaluation result: said, with no fix."""
    v, r = d.values, ctx.remedies
    text, numbers = ema
    numbers = {"P": v["P"], "E": v["E"], **numbers}
    if d.goodness(value) < 0:
        msg = (
            f"The moving statistics score better on this data than the exact population statistics: {primary} "
            f"{_fmt(primary, v['E'])} with them vs {_fmt(primary, v['P'])} with the population's "
            f"({_fmt(primary, value, True)}). Recalibrating would change validation to {_fmt(primary, v['P'])}, worse: "
            "keep the moving statistics."
        )
        return Finding("stale_moving_statistics", _severity(cause), msg, None, numbers)
    msg = (
        f"Evaluation mode uses moving statistics that do not match the weights: with exact population "
        f"statistics {primary} is {_fmt(primary, v['P'])} instead of {_fmt(primary, v['E'])} ({_fmt(primary, value, True)})."
    )
    if text:
        msg += " " + text
    remedy = f"{r.recalibrate()}\n{r.before_validation()}"
    if numbers.get("too_slow"):
        remedy += "\n" + r.momentum(numbers["advised_momentum"])
    return Finding("stale_moving_statistics", "cause" if cause else "warning", msg, remedy, numbers)


def _batch_stats(primary: str, d: Decomposition, value: float, ctx: Context, cause: bool) -> Finding:
    v = d.values
    per_replica = ctx.replicas > 1 and not ctx.synchronized
    per = f" per replica ({ctx.replicas} replicas, {ctx.batch_size // ctx.replicas if ctx.batch_size else '?'} samples each)" if per_replica else ""
    msg = (
        f"Training mode normalizes each batch of {ctx.batch_size}{per} by its own statistics: {primary} "
        f"{_fmt(primary, v['Td'])} with batch statistics vs {_fmt(primary, v['P'])} with the population's "
        f"({_fmt(primary, value, True)})."
    )
    mix = ctx.label_mix
    numbers: dict[str, Any] = {"Td": v["Td"], "P": v["P"], "batch_size": ctx.batch_size, "replicas": ctx.replicas}
    if mix is not None:
        numbers.update(classes=mix.classes, classes_per_batch=mix.per_batch, classes_per_shuffled_batch=mix.shuffled)
    if not cause:
        return Finding("batch_statistics", "info", msg + _not_a_cause(d, value), None, numbers)
    if mix is not None and mix.unrepresentative:
        msg += (
            f" The batches are not representative: a batch of {mix.batch_size} holds on average {mix.per_batch:.1f} of "
            f"the {mix.classes} classes, where shuffled batches of the same size would hold {mix.shuffled:.1f} "
            "(the data are batched in class order or another sorted order): shuffle the training data."
        )
    else:
        msg += " Batch statistics are noisier than the population's, the more so the smaller the batch"
        msg += " (per replica here)" if per else ""
        msg += ": expected in training mode; validation with population statistics is the number to trust."
    return Finding("batch_statistics", "cause", msg, ctx.remedies.synchronized() if per else None, numbers)


def _training_only(primary: str, d: Decomposition, value: float, ctx: Context, cause: bool) -> Finding:
    v = d.values
    layers, other = ", ".join(ctx.training_only_layers[:5]), ", ".join(ctx.mode_dependent_layers[:5])
    if layers:
        also = f" and code that may depend on the training flag ({other})" if other else ""
        what = f"Training-only layers ({layers}){also} are active in training mode"
    elif ctx.running_instance_norm:
        what = (f"InstanceNorm layers with running statistics ({', '.join(ctx.running_instance_norm[:5])}) normalize each "
                "sample by its own statistics in training mode, by the running averages in evaluation mode")
    else:
        what = ("Training mode changes the outputs beyond BatchNorm (code that depends on the training flag"
                + (f": {other})" if other else ")"))
    msg = (f"{what}: {primary} {_fmt(primary, v['T'])} in training mode vs {_fmt(primary, v['Td'])} with that off "
           f"({_fmt(primary, value, True)}).")
    msg += (" Expected behaviour: compare validation with training-mode metrics without them (this report's Td)." if cause
            else _not_a_cause(d, value))
    return Finding("training_only_layers", _severity(cause), msg, None, {"T": v["T"], "Td": v["Td"]})


def _epoch_average(primary: str, d: Decomposition, value: float, ctx: Context, cause: bool) -> Finding:
    v = d.values
    msg = (
        f"fit reports {primary} averaged over the epoch while the weights moved: {_fmt(primary, v['F'])} vs "
        f"{_fmt(primary, v['T'])} at the epoch's final weights ({_fmt(primary, value, True)})."
    )
    msg += (" Compare validation with an evaluation of the training data at the end of the epoch, not with fit's "
            "running average." if cause else _not_a_cause(d, value))
    msg += (" This term also holds whatever fit computed otherwise than this measurement: class_weight or sample "
            "weights given to fit, augmentation in its pipeline, other data.")
    return Finding("epoch_average", _severity(cause), msg, None, {"F": v["F"], "T": v["T"]})


def _data(primary: str, d: Decomposition, value: float, ctx: Context, cause: bool) -> Finding:
    v = d.values
    msg = (
        f"The validation data differ from the training data: in evaluation mode {_fmt(primary, v['E'])} on the "
        f"training data vs {_fmt(primary, v['E_val'])} on the validation data ({_fmt(primary, value, True)})."
    )
    msg += " This is the generalization gap: more data, augmentation or regularization." if cause else _not_a_cause(d, value)
    return Finding("data", _severity(cause), msg, None, {"E": v["E"], "E_val": v["E_val"]})


def _term_findings(primary: str | None, d: Decomposition | None, ctx: Context, ema) -> list[Finding]:
    if d is None or primary is None:
        return []
    significant = d.significant()
    out = []
    for name, value in d.ranked():
        if name not in significant:
            continue
        cause = d.explains_gap(name)
        if name == "stale_moving_statistics":
            out.append(_stale(primary, d, value, ctx, ema, cause))
        else:
            make = {"batch_statistics": _batch_stats, "training_only_layers": _training_only, "epoch_average": _epoch_average, "data": _data}[name]
            out.append(make(primary, d, value, ctx, cause))
    return out


# ---------------------------------------------------------------------------------
# evidence beside the terms
# ---------------------------------------------------------------------------------
def _unmeasured(primary: str | None, d: Decomposition | None) -> str | None:
    """Where the primary metric is NaN or infinite in some mode: a sentence saying which, in place of any claim about
    the noise threshold (NaN terms are never above it, and say nothing about it); else None."""
    odd = d.non_finite_modes() if d is not None and primary is not None else []
    return f" Its effect on the metric cannot be measured: {primary} {not_finite_text(odd, why=False)}." if odd else None


def _drift(recal: Recalibration, ctx: Context, stale: Finding | None, unmeasured: str | None = None) -> list[Finding]:
    """The first drifting layer and the largest drifts (recalibrated layers). As severe as the stale term: a cause
    or a warning where recalibrating helps, information where it would not (the stale term not significant, or the
    moving statistics scoring better: then no fix). Layers whose statistics are not finite (a negative variance)
    are named apart: recalibrating writes valid ones. ``unmeasured``: the sentence of :func:`_unmeasured`, said
    instead of the noise threshold where the metric is not finite."""
    out = []
    broken = [lr for lr in recal.layers if lr.drift is not None and lr.status != "frozen" and not math.isfinite(lr.drift.worst)]
    if broken:
        names = ", ".join(lr.name for lr in broken[:4]) + (" ..." if len(broken) > 4 else "")
        out.append(Finding(
            "drift", "warning",
            f"{len(broken)} BatchNorm layer(s) hold moving statistics that are not valid (a negative or not finite "
            f"variance, or a not finite mean): {names}. Recalibrating writes the population's.",
            ctx.remedies.recalibrate(), {"layers": [lr.name for lr in broken]},
        ))
    first = recal.first_drifting(include_frozen=False)
    if first is None:
        return out
    worst = sorted((lr for lr in recal.layers if lr.drift is not None and lr.status != "frozen" and math.isfinite(lr.drift.worst)),
                   key=lambda lr: -lr.drift.worst)[:3]
    msg = (
        f"First drifting layer in forward order: {first.name} (mean off by up to {first.drift.mean_max:.3g} std, variance "
        f"by a factor up to {math.exp(min(first.drift.var_max, 700)):.3g}); later layers inherit its error. Largest drift: "
        + ", ".join(f"{lr.name} {lr.drift.worst:.3g}" for lr in worst) + "."
    )
    numbers = {"first_layer": first.name, "threshold": LARGE_DRIFT, "max_drift": worst[0].drift.worst}
    if stale is not None and stale.remedy is not None:  # recalibrating helps: as severe as the term
        return out + [Finding("drift", stale.severity, msg, ctx.remedies.recalibrate(), numbers)]
    if stale is not None:  # the moving statistics score better: no fix
        return out + [Finding("drift", "info", msg + " On this data the drift does not cost the metric.", None, numbers)]
    effect = unmeasured or " Its effect on the metric is within the noise threshold."
    return out + [Finding("drift", "info", msg + effect, ctx.remedies.recalibrate(), numbers)]


def _frozen(recal: Recalibration, ctx: Context, primary: str | None, d: Decomposition | None) -> list[Finding]:
    if not recal.frozen:
        return []
    names = [lr.name for lr in recal.frozen]
    worst = max((lr.drift.worst for lr in recal.frozen if lr.drift is not None), default=0.0)
    effect = ctx.frozen_effect.get(primary) if primary else None
    msg = (
        f"{len(names)} frozen BatchNorm layer(s) normalize with their stored statistics in both modes "
        f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}); largest drift from this data's statistics {worst:.3g}."
    )
    severity, remedy = "info", ctx.remedies.recalibrate(include_frozen=True)
    if effect is not None and primary is not None and math.isfinite(effect):
        msg += f" Recalibrating them too would change {primary} by {_fmt(primary, effect, True)}."
        if d is not None and abs(effect) > d.threshold():
            if d.goodness(effect) > 0:
                severity = "warning"
            else:  # clearly worse: the weights learned around the stored statistics, keep them
                msg += " Keep them frozen: the statistics they hold suit the model better than this data's."
                remedy = None
    numbers = {"layers": names, "max_drift": worst, "effect": effect}
    return [Finding("frozen", severity, msg, remedy, numbers)]


def _input_scale(ctx: Context, stale_is_cause: bool) -> list[Finding]:
    s = ctx.input_scale
    if s is None:
        return []
    numbers = {"mean": s.mean, "std": s.std, "min": s.min, "max": s.max}
    mean = "[" + ", ".join(f"{m:.4g}" for m in s.mean) + "]"
    # a setting that makes stale statistics likelier, not a term of the gap: normalizing alone does not close it
    severity = "warning" if stale_is_cause else "info"
    if s.raw_pixels:
        msg = (
            f"The inputs are raw [0, 255] pixels (min {s.min:.4g}, max {s.max:.4g}, mean {mean}): the first layers' "
            "statistics are far from the moving statistics' initial mean 0 and variance 1, so they start far off. "
            "Normalizing the inputs is good practice; it does not replace the fix for stale statistics."
        )
        return [Finding("input_scale", severity, msg, ctx.remedies.rescale(s.mean, s.std, axis=s.axis), numbers)]
    if s.far_from_standard:
        msg = f"The inputs are far from zero mean and unit variance (mean {mean}, std {[round(t, 4) for t in s.std]})."
        return [Finding("input_scale", severity, msg, ctx.remedies.normalize(s.mean, s.std, axis=s.axis), numbers)]
    return []


def _model_facts(ctx: Context) -> list[Finding]:
    out = []
    if ctx.replicas > 1:
        per = ctx.batch_size // ctx.replicas if ctx.batch_size else None
        how = "synchronizes statistics across replicas" if ctx.synchronized else f"normalizes each replica batch of {per} on its own"
        out.append(Finding(
            "replicas", "info",
            f"{ctx.replicas} replicas: BatchNorm {how}." + ("" if ctx.synchronized else " Where per-replica batches are small, "
                                                             "synchronize the statistics across replicas:"),
            None if ctx.synchronized else ctx.remedies.synchronized(),
            {"replicas": ctx.replicas, "per_replica_batch": per, "synchronized": ctx.synchronized},
        ))
    if ctx.running_instance_norm:
        names = ", ".join(ctx.running_instance_norm[:4])
        out.append(Finding(
            "running_instance_norm", "warning",
            f"{len(ctx.running_instance_norm)} InstanceNorm layer(s) keep running statistics (track_running_stats=True: "
            f"{names}): training mode normalizes each sample by its own statistics, evaluation mode by the running "
            "averages, so they open a gap of their own (here in training_only_layers, T - Td); recalibrate does not set "
            "them. With track_running_stats=False (PyTorch's default) they normalize each sample the same way in both modes.",
            None, {"layers": ctx.running_instance_norm},
        ))
    if ctx.other_normalization:
        names = ", ".join(ctx.other_normalization[:4])
        out.append(Finding(
            "other_normalization", "info",
            f"{len(ctx.other_normalization)} LayerNorm/GroupNorm-style layer(s) ({names}) normalize each sample the same "
            "way in both modes: they do not cause this gap.",
            None, {"layers": ctx.other_normalization},
        ))
    return out


def build_report(decompositions: dict[str, Decomposition], recalibration: Recalibration | None, ctx: Context, primary: str | None = None) -> Report:
    """Rank the causes of the primary metric's gap and gather the findings."""
    if primary is None and decompositions:
        primary = next((m for m in decompositions if is_fraction(m)), next(iter(decompositions)))
    d = decompositions.get(primary) if primary else None
    ema = _momentum_advice(ctx)
    unmeasured = _unmeasured(primary, d)
    findings = _term_findings(primary, d, ctx, ema)
    stale = next((f for f in findings if f.kind == "stale_moving_statistics"), None)
    stale_hurts = stale is not None and stale.remedy is not None  # exact statistics would score better: the fix applies
    stale_is_cause = stale_hurts and stale.severity == "cause"
    if recalibration is None:
        findings.append(Finding("no_batchnorm", "info", "The model has no BatchNorm layer with moving statistics" + (
            "." if ctx.running_instance_norm else ": the gap does not come from normalization statistics.")))
    else:
        findings += _drift(recalibration, ctx, stale, unmeasured) + _frozen(recalibration, ctx, primary, d)
    findings += _input_scale(ctx, stale_is_cause)
    text, numbers = ema
    if text and not stale_hurts:  # where the stale term hurts, its finding carries the momentum advice
        if numbers.get("too_slow"):
            text += f" A memory of half an epoch would take momentum {numbers['advised_momentum']}" + (
                f".{unmeasured}" if unmeasured else "; on this data the stale statistics do not cost the metric beyond the noise threshold.")
        findings.append(Finding("ema", "info", text, None, numbers))
    findings += _model_facts(ctx)
    rank = {"cause": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: rank.get(f.severity, 3))
    return Report(
        framework=ctx.framework, samples=ctx.samples, batch_size=ctx.batch_size, decompositions=decompositions,
        primary=primary, recalibration=recalibration, findings=findings, notes=list(ctx.notes), probe=dict(ctx.probe),
    )
