"""The report's figures (matplotlib, Agg): modes, the waterfall of terms, per-layer drift, the EMA curve.

Each function takes a :class:`evalgap.Report` and returns a figure, or None when the report
has nothing to draw. Colours: training modes blue, population statistics green, what
validation reports red.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .attribution import MODE_NAMES
from .plots import _pyplot
from .stats import EMA, LARGE_DRIFT

BLUE, GREEN, RED, GREY = "#4c72b0", "#55a868", "#c44e52", "#8c8c8c"
#: Above this many layers the drift figure shows the first drifting layer, its neighbours and
#: the largest drifts only (the HTML table lists every layer).
DRIFT_LAYERS_SHOWN = 30


def modes(report) -> Any:
    main = report.main
    if main is None:
        return None
    plt = _pyplot()
    names = [m for m in ("F", "T", "Td", "P", "E", "E_val") if m in main.values]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    colours = [BLUE if m in ("F", "T", "Td") else GREEN if m == "P" else RED for m in names]
    bars = ax.barh(range(len(names)), [main.values[m] for m in names], color=colours)
    ax.set_yticks(range(len(names)), [f"{m}: {MODE_NAMES[m]}" for m in names], fontsize=8)
    ax.invert_yaxis()
    for bar, m in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {main.values[m]:.4f}", va="center", fontsize=8)
    ax.set_xlabel(report.primary)
    ax.set_xlim(0, max(main.values.values()) * 1.18 or 1.0)
    ax.set_title(f"{report.primary} by mode, same data and weights", fontsize=10)
    fig.tight_layout()
    return fig


def waterfall(report) -> Any:
    """From the top mode down to what validation reports, one horizontal step per term."""
    main = report.main
    if main is None:
        return None
    plt = _pyplot()
    terms = list(main.terms.items())
    fig, ax = plt.subplots(figsize=(6.4, 0.55 * len(terms) + 1.6))
    level = main.values[main.top]
    for i, (name, value) in enumerate(terms):
        end = level - value
        colour = RED if main.goodness(value) > 0 else GREEN
        ax.barh(i, end - level, left=level, color=colour if abs(value) > main.threshold() else GREY, height=0.6)
        ax.text(max(level, end), i, f"  {-value:+.4f}", va="center", fontsize=8)
        level = end
    ax.set_yticks(range(len(terms)), [name.replace("_", " ") for name, _ in terms], fontsize=8)
    ax.invert_yaxis()
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.22 * (hi - lo))  # room for the labels right of the bars
    ax.axvline(main.values[main.top], color=BLUE, lw=1, ls="--", label=f"{main.top} {main.values[main.top]:.4f}")
    bottom = "E_val" if "E_val" in main.values else "E"
    ax.axvline(main.values[bottom], color=RED, lw=1, ls="--", label=f"{bottom} {main.values[bottom]:.4f}")
    ax.set_xlabel(report.primary)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"from {MODE_NAMES[main.top]} down to validation, term by term", fontsize=9)
    fig.tight_layout()
    return fig


def _shown_layers(layers: list) -> list:
    if len(layers) <= DRIFT_LAYERS_SHOWN:
        return layers
    first = next((i for i, lr in enumerate(layers) if lr.drift.worst > LARGE_DRIFT), 0)
    keep = set(range(max(0, first - 2), min(len(layers), first + 3)))
    for i in sorted(range(len(layers)), key=lambda i: -layers[i].drift.worst):
        if len(keep) >= DRIFT_LAYERS_SHOWN:
            break
        keep.add(i)
    return [layers[i] for i in sorted(keep)]


def drift(report) -> Any:
    """Per layer, forward order, names on the axis: mean drift and |log variance ratio|; first drifting layer marked."""
    if report.recalibration is None:
        return None
    layers = [lr for lr in report.recalibration.layers if lr.drift is not None]
    if not layers:
        return None
    first = report.recalibration.first_drifting()
    shown = _shown_layers(layers)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.22 * len(shown) + 1.6))
    ys = np.arange(len(shown))
    ax.barh(ys - 0.2, [lr.drift.mean_max for lr in shown], height=0.4, color=BLUE, label="mean drift (max over channels, in std)")
    ax.barh(ys + 0.2, [lr.drift.var_max for lr in shown], height=0.4, color=RED, label="|log variance ratio| (max)")
    labels = [("▶ " if first is not None and lr.name == first.name else "") + lr.name + (" (frozen)" if lr.status == "frozen" else "") for lr in shown]
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    top = max(max(lr.drift.mean_max, lr.drift.var_max) for lr in shown)
    if top > 20:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.axvline(LARGE_DRIFT, color=GREY, lw=0.8, ls=":", label=f"large ({LARGE_DRIFT})")
    note = "" if len(shown) == len(layers) else f" ({len(shown)} of {len(layers)} layers: the first drifting and the largest)"
    ax.set_title("drift of moving from population statistics, forward order" + note, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def ema(report) -> Any:
    """Weight still on the moving statistics' initial values, by epoch: the model's momentum and the advised one."""
    finding = report.finding("stale_moving_statistics") or report.finding("ema")
    numbers = finding.numbers if finding is not None else {}
    steps = numbers.get("steps_per_epoch")
    if not steps or "momentum" not in numbers:
        return None
    convention = numbers.get("convention", "keras")
    epochs_done = (numbers.get("updates") or 0) / steps
    horizon = max(10.0, 2 * epochs_done)
    epochs = np.linspace(0, horizon, 200)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for momentum, colour, label in ((numbers["momentum"], RED, "the model's"), (numbers.get("advised_momentum"), GREEN, "advised")):
        if momentum is None:
            continue
        curve = EMA(momentum, convention)
        ax.plot(epochs, [curve.initial_weight(int(round(e * steps))) for e in epochs], color=colour, label=f"{label}: momentum {momentum} ({convention})")
    if epochs_done:
        ax.axvline(epochs_done, color=GREY, ls=":", lw=1, label=f"now: {numbers.get('updates')} updates")
    ax.set_xlabel(f"epochs of {steps} steps")
    ax.set_ylabel("weight on the initial values")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("how much of the moving statistics is still their initial value (mean 0, variance 1)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


FIGURES = {"modes": modes, "waterfall": waterfall, "drift": drift, "ema": ema}


def figures(report) -> dict[str, Any]:
    """Every figure the report has something for, by name."""
    out = {}
    for name, make in FIGURES.items():
        fig = make(report)
        if fig is not None:
            out[name] = fig
    return out
