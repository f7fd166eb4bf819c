"""The report's figures (matplotlib, Agg): modes, the waterfall of terms, per-layer drift, the EMA curve.

Each function takes a :class:`evalgap.Report` and returns a figure, or None when the report
has nothing to draw. Colours: training modes blue, population statistics green, what
validation reports red.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np

from .plots import _pyplot
from .stats import EMA, LARGE_DRIFT

BLUE, GREEN, RED, GREY = "#4c72b0", "#55a868", "#c44e52", "#8c8c8c"
#: Above this many layers the drift figure shows the first drifting layer, its neighbours and
#: the largest drifts only (the HTML table lists every layer).
DRIFT_LAYERS_SHOWN = 30
#: Short names of the modes for titles.
SHORT_MODE_NAMES = {"F": "fit's training metric", "T": "training mode", "Td": "training mode, dropout off",
                    "P": "population statistics", "E": "evaluation mode", "E_val": "evaluation on the validation data"}
#: Mode names on the modes figure's axis: short, so that they fit a wider browser font (the table
#: below the figure has the long ones).
MODE_LABELS = {"F": "fit's training metric", "T": "training mode", "Td": "training mode, dropout off",
               "P": "evaluation, population statistics", "E": "evaluation, moving statistics", "E_val": "evaluation, validation data"}
#: Characters per line of a figure title, per point of figure width and font size: the page renders
#: the SVG text with the browser's font, which may be wider than the one the figure was sized with,
#: so titles stay well inside the width (0.85 em per character, where DejaVu Sans needs about 0.55).
_TITLE_EM_PER_CHAR = 0.85


def number(value: Any, digits: int = 4, sign: bool = False, style: str = "f") -> str:
    """``value`` formatted, "not finite" for NaN/inf/None, never "-0" (a value that rounds to zero has no sign)."""
    if value is None or not math.isfinite(float(value)):
        return "not finite"
    text = format(float(value), f"{'+' if sign else ''}.{digits}{style}")
    if float(text) == 0:
        text = format(0.0, f".{digits}{style}")
    return text


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _title(fig, text: str, fontsize: float = 9) -> None:
    """A title centred on the figure, wrapped so that a wider browser font still fits its width."""
    width = fig.get_figwidth() * 72
    chars = max(20, int(width / (_TITLE_EM_PER_CHAR * fontsize)))
    lines = textwrap.wrap(text, chars)
    balanced = math.ceil(len(text) / len(lines))  # lines of about equal length, not a long one and a word
    while len(textwrap.wrap(text, balanced)) > len(lines):
        balanced += 1
    fig.suptitle("\n".join(textwrap.wrap(text, balanced)), fontsize=fontsize)


def modes(report) -> Any:
    """One bar per mode, from zero (a zero line when a value is negative); a value that is not finite gets no bar."""
    main = report.main
    if main is None:
        return None
    plt = _pyplot()
    names = [m for m in ("F", "T", "Td", "P", "E", "E_val") if m in main.values]
    values = [main.values[m] if _finite(main.values[m]) else 0.0 for m in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    colours = [BLUE if m in ("F", "T", "Td") else GREEN if m == "P" else RED for m in names]
    bars = ax.barh(range(len(names)), values, color=colours)
    ax.set_yticks(range(len(names)), [f"{m}: {MODE_LABELS[m]}" for m in names], fontsize=8)
    ax.invert_yaxis()
    lo, hi = min(0.0, *values), max(0.0, *values)
    span = (hi - lo) or 1.0
    for bar, m in zip(bars, names):
        # right of the bar's end, or right of the zero line for a negative bar: never over the tick labels
        x = max(0.0, bar.get_width())
        ax.text(x, bar.get_y() + bar.get_height() / 2, f" {number(main.values[m])}", va="center", fontsize=8)
    if lo < 0:
        ax.axvline(0.0, color=GREY, lw=0.8)
    ax.set_xlim(lo - 0.04 * span if lo < 0 else 0.0, hi + 0.25 * span)
    ax.set_xlabel(report.primary)
    same = "same weights (E_val: validation data)" if "E_val" in main.values else "same data and weights"
    _title(fig, f"{report.primary} by mode, {same}", fontsize=10)
    fig.tight_layout()
    return fig


def waterfall(report) -> Any:
    """From the top mode to the bottom one, one horizontal step per term; each label is the term as
    in the table and the JSON (the upper mode minus the lower one)."""
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
        if _finite(value) and _finite(level):
            ax.barh(i, end - level, left=level, color=colour if abs(value) > main.threshold() else GREY, height=0.6)
            x = max(level, end)
        else:
            x = level if _finite(level) else 0.0
        ax.text(x, i, f"  {number(value, sign=True)}", va="center", fontsize=8)
        if _finite(end):
            level = end
    ax.set_yticks(range(len(terms)), [name.replace("_", " ") for name, _ in terms], fontsize=8)
    ax.invert_yaxis()
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.22 * (hi - lo))  # room for the labels right of the bars
    bottom = "E_val" if "E_val" in main.values else "E"
    for mode, colour in ((main.top, BLUE), (bottom, RED)):
        if _finite(main.values[mode]):
            ax.axvline(main.values[mode], color=colour, lw=1, ls="--", label=f"{mode} {number(main.values[mode])}")
    ax.set_xlabel(report.primary)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    _title(fig, f"from {SHORT_MODE_NAMES[main.top]} to {SHORT_MODE_NAMES[bottom]}, term by term")
    fig.tight_layout()
    return fig


def _shown_layers(layers: list) -> list:
    if len(layers) <= DRIFT_LAYERS_SHOWN:
        return layers
    first = next((i for i, lr in enumerate(layers) if lr.drift.worst > LARGE_DRIFT), 0)
    keep = set(range(max(0, first - 2), min(len(layers), first + 3)))
    def size(i: int) -> float:  # a drift that is not finite (a broken variance) is among the largest
        worst = layers[i].drift.worst
        return worst if _finite(worst) else math.inf

    for i in sorted(range(len(layers)), key=lambda i: -size(i)):
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
    fig, ax = plt.subplots(figsize=(6.4, 0.22 * len(shown) + 2.0))
    ys = np.arange(len(shown))
    ax.barh(ys - 0.2, [lr.drift.mean_max for lr in shown], height=0.4, color=BLUE, label="mean drift (max over channels, in std)")
    ax.barh(ys + 0.2, [lr.drift.var_max for lr in shown], height=0.4, color=RED, label="|log variance ratio| (max)")
    labels = [("▶ " if first is not None and lr.name == first.name else "") + lr.name + (" (frozen)" if lr.status == "frozen" else "") for lr in shown]
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    drifts = [v for lr in shown for v in (lr.drift.mean_max, lr.drift.var_max) if _finite(v)]
    if drifts and max(drifts) > 20:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.axvline(LARGE_DRIFT, color=GREY, lw=0.8, ls=":", label=f"large ({LARGE_DRIFT})")
    note = "" if len(shown) == len(layers) else f" ({len(shown)} of {len(layers)} layers: the first drifting and the largest)"
    _title(fig, "drift of moving from population statistics, forward order" + note)
    # the legend above the plotting area, never over a bar
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, borderaxespad=0.3)
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
    _title(fig, "how much of the moving statistics is still their initial value (mean 0, variance 1)")
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
