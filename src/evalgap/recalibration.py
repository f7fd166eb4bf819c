"""The result of a recalibration: per layer, the statistics before and after, and their drift.

Framework-free: the PyTorch and Keras adapters fill it with NumPy float64 vectors.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .stats import LARGE_DRIFT, Drift, drift

Status = Literal["recalibrated", "measured", "frozen", "unreached", "no-running-stats"]



@dataclass
class LayerRecalibration:
    """One normalization layer: what it held before and the population statistics after.

    ``status`` says what happened to the layer:

    - ``recalibrated``: its moving statistics now hold ``mean_after`` / ``var_after``;
    - ``measured``: as ``recalibrated``, but nothing was written (a diagnosis);
    - ``frozen``: in inference mode (PyTorch ``eval()``, Keras ``trainable=False``) and
      left alone; ``mean_after`` / ``var_after`` are the population statistics it *would*
      get, so its drift is still reported;
    - ``unreached``: no data reached it during the pass; left alone;
    - ``no-running-stats``: it normalizes with batch statistics in both modes (PyTorch
      ``track_running_stats=False``), so it cannot cause a train/eval gap.

    ``count`` is the number of values per channel (samples x spatial positions), ``calls``
    the number of times the layer ran; ``calls_per_batch > 1`` marks a layer shared within
    one forward pass, whose statistics pool every call's inputs.
    """

    name: str
    kind: str
    status: Status
    channels: int
    eps: float
    count: int = 0
    samples: int = 0
    calls: int = 0
    calls_per_batch: int = 0
    mean_before: np.ndarray | None = None
    var_before: np.ndarray | None = None
    mean_after: np.ndarray | None = None
    var_after: np.ndarray | None = None

    @property
    def shared(self) -> bool:
        return self.calls_per_batch > 1

    @functools.cached_property
    def drift(self) -> Drift | None:
        """Drift of the statistics it held before from the population statistics (computed once)."""
        if self.mean_before is None or self.mean_after is None:
            return None
        return drift(self.mean_before, self.var_before, self.mean_after, self.var_after, self.eps)

    def to_dict(self) -> dict[str, Any]:
        d = self.drift
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "channels": self.channels,
            "eps": self.eps,
            "count": self.count,
            "samples": self.samples,
            "calls": self.calls,
            "calls_per_batch": self.calls_per_batch,
            "drift_mean_max": None if d is None else d.mean_max,
            "drift_mean_avg": None if d is None else d.mean_avg,
            "drift_var_max": None if d is None else d.var_max,
            "drift_var_avg": None if d is None else d.var_avg,
            "mean_before": _list(self.mean_before),
            "var_before": _list(self.var_before),
            "mean_after": _list(self.mean_after),
            "var_after": _list(self.var_after),
        }


def _list(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else np.asarray(a, dtype=np.float64).tolist()


def render_plain(renderable: Any, width: int = 120) -> str:
    """A rich renderable as plain text (no colours), for ``__str__``."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue().rstrip()


@dataclass
class Recalibration:
    """What :func:`evalgap.torch.recalibrate` / :func:`evalgap.keras.recalibrate` did.

    ``layers`` are in the order the layers were first called (forward order), then the layers no
    data reached (never called, or called with empty inputs only). ``samples`` counts the
    examples forwarded, ``skipped_samples`` those of ragged batches left out (a batch smaller
    than the first has other statistics). ``batching`` says how the batches were drawn (shuffled
    arrays, the user's batches, ...); ``batch_size_note`` where the batch size came from when
    the user did not give it (``None`` when given). ``training_metrics`` (with
    ``training_metrics=True``): the model's loss and metrics on the pass's own outputs,
    BatchNorm on batch statistics and dropout off, at the weights it was called with; else
    ``None``.
    """

    framework: str
    layers: list[LayerRecalibration] = field(default_factory=list)
    batches: int = 0
    samples: int = 0
    batch_size: int | None = None
    skipped_batches: int = 0
    skipped_samples: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    batching: str | None = None
    batch_size_note: str | None = None
    training_metrics: dict[str, float] | None = None

    # ---- selections --------------------------------------------------------------
    def by_status(self, status: Status) -> list[LayerRecalibration]:
        return [layer for layer in self.layers if layer.status == status]

    @property
    def recalibrated(self) -> list[LayerRecalibration]:
        return self.by_status("recalibrated")

    @property
    def measured(self) -> list[LayerRecalibration]:
        return self.by_status("measured")

    @property
    def frozen(self) -> list[LayerRecalibration]:
        return self.by_status("frozen")

    @property
    def unreached(self) -> list[LayerRecalibration]:
        return self.by_status("unreached")

    @property
    def shared(self) -> list[LayerRecalibration]:
        return [layer for layer in self.layers if layer.shared]

    def __getitem__(self, name: str) -> LayerRecalibration:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {[layer.name for layer in self.layers]}")

    @property
    def max_drift(self) -> float:
        """The largest drift over recalibrated and frozen layers (0 when none)."""
        values = [layer.drift.worst for layer in self.layers if layer.drift is not None]
        return float(np.nanmax(values)) if values else 0.0

    def first_drifting(self, threshold: float = LARGE_DRIFT, include_frozen: bool = True) -> LayerRecalibration | None:
        """The first layer in forward order whose drift exceeds ``threshold``.

        Later layers inherit its error, so this is where to look first. A layer whose drift is not finite (its
        statistics are not valid: a negative or overflowed variance) is no measure of drift and is skipped.
        """
        for layer in self.layers:
            if not include_frozen and layer.status == "frozen":
                continue
            d = layer.drift
            if d is not None and math.isfinite(d.worst) and d.worst > threshold:
                return layer
        return None

    def add_layer_notes(self, frozen_means: str) -> None:
        """Notes on unreached, shared and frozen layers (``frozen_means``: what frozen is in this framework)."""
        for layer in self.unreached:
            self.notes.append(f"{layer.name}: no data reached this layer; its statistics were left as they were.")
        for layer in self.shared:
            self.notes.append(
                f"{layer.name}: called {layer.calls_per_batch} times per forward pass (a shared layer); its statistics "
                "pool the inputs of every call, which is what it normalizes with in training only if every call sees "
                "the same distribution."
            )
        names = [layer.name for layer in self.frozen]
        if names:
            self.notes.append(
                f"{len(names)} frozen layer(s) ({frozen_means}) left alone: {', '.join(names[:5])}"
                f"{' ...' if len(names) > 5 else ''}; pass include_frozen=True to recalibrate them too."
            )

    # ---- output ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "batches": self.batches,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "skipped_batches": self.skipped_batches,
            "skipped_samples": self.skipped_samples,
            "seconds": self.seconds,
            "batching": self.batching,
            "training_metrics": self.training_metrics,
            "max_drift": self.max_drift,
            "notes": list(self.notes),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def summary(self) -> str:
        """One line: what was done, the largest drift corrected (recalibrated layers only) and the first drifting
        one; a frozen layer that drifts more than ``LARGE_DRIFT`` is named apart, as left alone."""
        n = len(self.recalibrated)
        corrected = [layer.drift.worst for layer in self.recalibrated if layer.drift is not None]
        line = (
            f"recalibrated {n} BatchNorm layer{'s' if n != 1 else ''} on {self.samples} samples "
            f"({self.batches} batches) in {self.seconds:.2f} s; largest drift corrected "
            f"{float(np.nanmax(corrected)) if corrected else 0.0:.3g}"
        )
        first = self.first_drifting(include_frozen=False)
        if first is not None:
            line += f"; first drifting layer: {first.name}"
        stale = [layer for layer in self.frozen if layer.drift is not None and layer.drift.worst > LARGE_DRIFT]
        if stale:
            worst = max(stale, key=lambda layer: layer.drift.worst)
            line += (f"; frozen {worst.name} drifts {worst.drift.worst:.3g}, left alone (include_frozen=True "
                     "recalibrates it)")
        return line

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title="BatchNorm recalibration", show_lines=False)
        for col in ("layer", "type", "status", "C", "samples", "mean drift max", "var drift max"):
            table.add_column(col, justify="right" if col not in ("layer", "type", "status") else "left")
        for layer in self.layers:
            d = layer.drift
            status = layer.status + (f" (shared x{layer.calls_per_batch})" if layer.shared else "")
            table.add_row(
                layer.name,
                layer.kind,
                status,
                str(layer.channels),
                str(layer.samples),
                "-" if d is None else f"{d.mean_max:.3g}",
                "-" if d is None else f"{d.var_max:.3g}",
            )
        parts: list[Any] = [table, Text(self.summary())]
        if self.skipped_samples:
            parts.append(Text(f"left out {self.skipped_samples} samples of {self.skipped_batches} ragged batch(es)"))
        parts.extend(Text(n) for n in self.notes)
        return Group(*parts)

    def __str__(self) -> str:
        return render_plain(self)

    def _repr_html_(self) -> str:
        """Jupyter: the summary and the per-layer table as HTML."""
        from .report_html import recalibration_html

        return recalibration_html(self)

    def __repr__(self) -> str:
        return (
            f"Recalibration(framework={self.framework!r}, layers={len(self.layers)}, "
            f"recalibrated={len(self.recalibrated)}, samples={self.samples}, max_drift={self.max_drift:.3g})"
        )
