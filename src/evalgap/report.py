"""The diagnosis report: text (rich), versioned JSON, self-contained HTML with matplotlib figures.

JSON schema ``evalgap.report/1`` (documented in ``docs/report-schema.md``)::

    {"schema": "evalgap.report/1", "framework": str, "samples": int, "batch_size": int|null,
     "primary": str, "gap": float, "gap_points": float|null,
     "metrics": {name: {"values": {mode: float}, "terms": {term: float}, "total": float,
                        "threshold": float, "higher_is_better": bool}},
     "causes": [{"term": str, "value": float, "significant": bool}],   # primary metric, largest first
     "findings": [{"kind", "severity", "message", "remedy", "numbers"}],
     "layers": [per-layer recalibration entries without the vectors], "notes": [str]}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._files import atomic_write_text
from .attribution import MODE_NAMES, TERMS, Decomposition, Finding, is_fraction
from .recalibration import Recalibration, render_plain

SCHEMA = "evalgap.report/1"


@dataclass
class Report:
    """What :func:`evalgap.keras.diagnose` / :func:`evalgap.torch.diagnose` found."""

    framework: str
    samples: int
    batch_size: int | None
    decompositions: dict[str, Decomposition]
    primary: str | None
    recalibration: Recalibration | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    probe: dict[str, Any] = field(default_factory=dict)

    # ---- numbers ------------------------------------------------------------------
    @property
    def main(self) -> Decomposition | None:
        return self.decompositions.get(self.primary) if self.primary else None

    @property
    def gap(self) -> float:
        """The primary metric's gap (top mode minus evaluation mode)."""
        return self.main.total if self.main else 0.0

    @property
    def gap_points(self) -> float | None:
        """The gap in points (x100) when the primary metric is a fraction such as accuracy."""
        return 100 * self.gap if self.primary and is_fraction(self.primary) else None

    def worse_by(self) -> float | None:
        """How much worse evaluation mode looks than the top mode on the primary metric: positive when
        worse (a lower accuracy, a higher loss), in points for fractions, else in the metric's units."""
        main = self.main
        if main is None:
            return None
        worse = main.goodness(self.gap)
        return 100 * worse if self.gap_points is not None else worse

    @property
    def causes(self) -> list[tuple[str, float]]:
        """The terms that explain the primary metric's gap, largest first: above the noise threshold, with the gap's
        sign, the gap itself above the threshold (:meth:`Decomposition.explains_gap`). A term of the other sign
        narrows the gap: a finding, not a cause."""
        main = self.main
        if main is None:
            return []
        return [(k, v) for k, v in main.ranked() if main.explains_gap(k)]

    def _amount(self, value: float, signed: bool = True) -> str:
        """A value of the primary metric in the report's unit: points for fractions."""
        if self.gap_points is not None:
            return f"{100 * value:+.1f} points" if signed else f"{100 * value:.1f} point{'s' if round(100 * value, 1) != 1 else ''}"
        return f"{value:+.4g}" if signed else f"{value:.3g}"

    def epoch_logs(self) -> dict[str, float]:
        """What the monitors put in the epoch logs: ``gap_bn_stale`` (P - E) and ``gap_batch_stats``
        (Td - P) of the primary metric, and ``precise_val_<metric>`` (P) for every metric."""
        main = self.main
        if main is None:
            return {}
        logs = {"gap_bn_stale": main.values["P"] - main.values["E"], "gap_batch_stats": main.values["Td"] - main.values["P"]}
        logs.update({f"precise_val_{k}": d.values["P"] for k, d in self.decompositions.items()})
        return logs

    def distortion_sentence(self, epoch: int, fix: str) -> str | None:
        """One plain sentence when stale BatchNorm statistics distort validation (exact statistics would score better
        beyond the noise threshold, whatever the rest of the gap does), else None."""
        main = self.main
        stale = None if main is None else main.significant().get("stale_moving_statistics")
        if stale is None or main.goodness(stale) <= 0:
            return None
        amount = f"{100 * stale:+.1f} points" if is_fraction(self.primary or "") else f"{stale:+.4g}"
        return (
            f"GapMonitor (epoch {epoch}): validation {self.primary} is distorted by stale BatchNorm statistics: with "
            f"exact statistics it would be {main.values['P']:.4f}, not {main.values['E']:.4f} ({amount}); {fix}."
        )

    def headline(self) -> str:
        """One sentence: how far validation is from training on the same data, and what most of it is."""
        main = self.main
        if main is None:
            return "No metric was measured."
        top, bottom = main.top, ("E_val" if "E_val" in main.values else "E")
        gap = main.values[top] - main.values[bottom]
        odd = main.non_finite_modes()
        if odd:
            return f"{self.primary} {not_finite_text(odd)}: the modes cannot be compared and no cause can be ranked."
        worse = main.goodness(gap) > 0
        size = f"{abs(100 * gap):.1f} points" if self.gap_points is not None else f"{abs(gap):.4g}"
        direction = ("below" if worse else "above") if main.higher_is_better else ("above" if worse else "below")
        if bottom == "E_val":
            sentence = (f"Validation {self.primary} (on the validation data) is {size} {direction} training (on the "
                        f"training data) ({main.values[bottom]:.4f} vs {main.values[top]:.4f})")
        else:
            sentence = (f"Validation {self.primary} is {size} {direction} training on the same data "
                        f"({main.values[bottom]:.4f} vs {main.values[top]:.4f})")
        causes = self.causes
        if not causes:
            noise = self._amount(main.threshold(), signed=False)
            offsetting = [(k, v) for k, v in main.ranked() if k in main.significant()]
            if offsetting:
                listed = ", ".join(f"{k.replace('_', ' ')} {self._amount(v)}" for k, v in offsetting)
                return sentence + f"; the terms above the noise threshold ({noise}) offset each other: {listed} (see the findings)."
            return sentence + f"; no term is above the noise threshold ({noise}): nothing to fix."
        name, value = causes[0]
        meaning = {t[0]: t[3] for t in TERMS}.get(name, "the validation data differ from the training data")
        share = value / gap if gap else 0.0
        amount = "all of it" if share >= 0.95 else "most of it" if share >= 0.5 else f"{100 * share:.0f}% of it"
        return sentence + f"; {amount}: {meaning} ({name.replace('_', ' ')}, {self._amount(value)})."

    def finding(self, kind: str) -> Finding | None:
        return next((f for f in self.findings if f.kind == kind), None)

    # ---- JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        main = self.main
        return {
            "schema": SCHEMA,
            "framework": self.framework,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "primary": self.primary,
            "gap": self.gap,
            "gap_points": self.gap_points,
            "metrics": {k: d.to_dict() for k, d in self.decompositions.items()},
            "causes": [] if main is None else [
                {"term": k, "value": v, "significant": k in main.significant(), "explains_gap": k in dict(self.causes)}
                for k, v in main.ranked()
            ],
            "findings": [f.to_dict() for f in self.findings],
            "layers": [] if self.recalibration is None else [
                {k: v for k, v in layer.to_dict().items() if k not in ("mean_before", "var_before", "mean_after", "var_after")}
                for layer in self.recalibration.layers
            ],
            "notes": list(self.notes),
            "probe": dict(self.probe),
            "seconds": self.seconds,
        }

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        """The report as JSON (schema ``evalgap.report/1``); written atomically to ``path`` if given. A value
        that is not finite (a NaN loss, an infinite memory) is written ``null``: strict JSON has no NaN."""
        text = json.dumps(_finite(self.to_dict()), indent=indent, default=float, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    # ---- text ---------------------------------------------------------------------
    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = []
        main = self.main
        if main is not None:
            parts.append(Text(self.headline(), style="bold"))
            top = main.top
            bottom = "E_val" if "E_val" in main.values else "E"
            gap = f"{self.gap_points:+.1f} points" if self.gap_points is not None else f"{self.gap:+.4g}"
            parts.append(Text(
                f"{self.primary}: {main.values[top]:.4f} ({MODE_NAMES[top]}) vs {main.values[bottom]:.4f} "
                f"({MODE_NAMES[bottom]}): gap {gap}, on {self.samples} samples, batch {self.batch_size} [{self.framework}]",
                style="bold",
            ))
            same = "same weights; E_val on the validation data, the other modes on the training data" if bottom == "E_val" \
                else "same data, same weights"
            modes = Table(title=f"metrics by mode ({same})")
            modes.add_column("mode")
            for metric in self.decompositions:
                modes.add_column(metric, justify="right")
            all_modes = [m for m in ("F", "T", "Td", "P", "E", "E_val") if any(m in d.values for d in self.decompositions.values())]
            for m in all_modes:
                modes.add_row(f"{m}  {MODE_NAMES[m]}", *[f"{d.values[m]:.4f}" if m in d.values else "-" for d in self.decompositions.values()])
            parts.append(modes)
            terms = Table(title=f"the gap in {self.primary}, term by term (they add up to {main.total:+.4f})")
            for col in ("term", "value", "share", "meaning"):
                terms.add_column(col, justify="right" if col in ("value", "share") else "left")
            meanings = {name: meaning for name, _, _, meaning in TERMS}
            meanings["data"] = "the validation data differ from the training data"
            sig = main.significant()
            for name, value in main.terms.items():
                share = f"{100 * value / main.total:.0f}%" if main.total else "-"
                share = "0%" if share == "-0%" else share
                style = "bold" if name in sig else "dim"
                terms.add_row(Text(name, style=style), f"{value:+.4f}", share, meanings[name])
            parts.append(terms)
        causes = [f for f in self.findings if f.severity == "cause"]
        others = [f for f in self.findings if f.severity != "cause"]
        if main is not None and main.non_finite_modes():
            parts.append(Text(f"No cause can be ranked: {self.primary} {not_finite_text(main.non_finite_modes(), why=False)}.",
                              style="bold red"))
        elif main is not None and not self.causes:
            within = "no term explains the gap" if main.significant() else f"every term is within {self._amount(main.threshold(), signed=False)}"
            parts.append(Text(f"No significant cause: {within}.", style="bold green"))
        for title, items in (("Causes", causes), ("Also found", others)):
            if items:
                parts.append(Text(title, style="bold underline"))
                for f in items:
                    parts.append(Text(f"- [{f.kind}] {f.message}"))
                    if f.remedy:
                        parts.append(Text("    fix: " + f.remedy.replace("\n", "\n         "), style="cyan"))
        if self.recalibration is not None and self.recalibration.layers:
            drift = Table(title="per-layer drift of moving statistics from population statistics (forward order)")
            for col in ("layer", "status", "mean drift max", "var drift max"):
                drift.add_column(col, justify="left" if col in ("layer", "status") else "right")
            layers = [layer for layer in self.recalibration.layers if layer.drift is not None]
            shown = layers if len(layers) <= 12 else layers[:6] + sorted(layers[6:], key=lambda layer: -layer.drift.worst)[:6]
            for layer in shown:
                drift.add_row(layer.name, layer.status, *(f"{v:.3g}" if math.isfinite(v) else "not finite"
                                                           for v in (layer.drift.mean_max, layer.drift.var_max)))
            if len(layers) > len(shown):
                drift.caption = f"first 6 and the 6 largest of {len(layers)} layers"
            parts.append(drift)
        parts.extend(Text(n, style="dim") for n in self.notes)
        return Group(*parts)

    def __str__(self) -> str:
        return render_plain(self)

    def __repr__(self) -> str:
        return f"Report(primary={self.primary!r}, gap={self.gap:.4g}, causes={[k for k, _ in self.causes]})"

    # ---- figures and the page ---------------------------------------------------------
    def plot(self) -> dict[str, Any]:
        """Matplotlib figures: ``modes``, ``waterfall`` (the terms), ``drift`` (per layer) and ``ema``
        (weight on the initial values by epoch), each when the report has something for it."""
        from .report_figures import figures

        return figures(self)

    def to_html(self, path: str | os.PathLike) -> str:
        """A self-contained page (inline SVG figures, HTML tables); written atomically."""
        from .report_html import render

        return atomic_write_text(path, render(self))

    def _repr_html_(self) -> str:
        """Jupyter shows the report as its HTML page."""
        from .report_html import render

        return render(self)


def not_finite_text(modes: list[str], why: bool = True) -> str:
    """'is not finite in T, Td, P and E (the likely causes)': what a report says instead of ranking NaN terms."""
    where = modes[0] if len(modes) == 1 else ", ".join(modes[:-1]) + " and " + modes[-1]
    causes = (" (a diverged model, inputs that overflow, or targets holding NaN or Inf that the loss does not leave out)"
              if why else "")
    return f"is not finite in {'mode' if len(modes) == 1 else 'modes'} {where}{causes}"


def _finite(value: Any) -> Any:
    """``value`` with every scalar as a Python float, None where it is not finite (nested in dicts, lists, tuples)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float) or (hasattr(value, "__float__") and np.ndim(value) == 0):  # NumPy, JAX, torch scalars
        number = float(value)
        return number if math.isfinite(number) else None
    return value
