"""Split a train/eval gap into its causes, from metrics measured at fixed weights.

On one data set, with the weights fixed, a metric measured in five ways:

    F   the training metric fit reported for the epoch (optional)
    T   training mode: batch statistics, dropout and noise layers active
    Td  training mode for normalization only, dropout and noise off
    P   evaluation mode with exact population statistics
    E   evaluation mode with the current moving statistics (what validation reports)

    F - E = (F - T)    epoch_average: the metric was averaged over an epoch while the weights moved
          + (T - Td)   training_only_layers: dropout and other training-only layers
          + (Td - P)   batch_statistics: batch statistics differ from population statistics
          + (P - E)    stale_moving_statistics: the moving statistics are stale or near their initial values

The terms add up exactly (a telescoping sum). Without F the sum is T - E. With separate
validation data, ``data = E(train) - E(val)`` extends it to F - E(val).
Framework-free: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import DataError, EvalgapError

#: (term, minuend, subtrahend, meaning), in decomposition order.
TERMS: tuple[tuple[str, str, str, str], ...] = (
    ("epoch_average", "F", "T", "the training metric was averaged over an epoch while the weights moved"),
    ("training_only_layers", "T", "Td", "dropout and other training-only layers are active in training mode"),
    ("batch_statistics", "Td", "P", "training normalizes each batch by its own statistics, not the population's"),
    ("stale_moving_statistics", "P", "E", "the moving statistics are stale or still near their initial values"),
)
DATA_TERM = ("data", "E", "E_val", "the validation data differ from the training data")

MODE_NAMES = {
    "F": "fit's epoch-averaged training metric",
    "T": "training mode (batch statistics, dropout on)",
    "Td": "training mode, dropout off",
    "P": "evaluation mode, exact population statistics",
    "E": "evaluation mode, moving statistics (validation)",
    "E_val": "evaluation mode on the validation data",
}

#: Name fragments of metrics that shrink as the model improves: losses, errors, deviances, counts of mistakes
#: (Keras's ``poisson``, ``logcosh``/``log_cosh``, ``mape``, ``msle``, ``false_positives``; ``hamming``, ``nll``).
_LOWER_IS_BETTER = ("loss", "error", "crossentropy", "mse", "mae", "hinge", "divergence", "kld", "poisson", "logcosh",
                    "log_cosh", "mape", "msle", "false_positive", "false_negative", "hamming", "nll", "distance", "perplexity")

#: Name fragments of metrics reported in [0, 1] (Keras names IoU ``io_u``: ``mean_io_u``, ``binary_io_u``).
_FRACTIONS = ("acc", "auc", "auroc", "precision", "recall", "iou", "io_u", "f1", "fbeta", "specificity", "sensitivity", "jaccard")


def higher_is_better(metric: str) -> bool:
    """From the name alone: accuracy-like metrics grow with quality; losses, errors and mistake counts shrink.
    Where the framework states a metric's direction, the adapter's answer wins (:func:`decompose`)."""
    name = metric.lower()
    return not any(token in name for token in _LOWER_IS_BETTER)


_name_says_higher = higher_is_better  # for decompose, whose keyword of the same name hides it


def is_fraction(metric: str) -> bool:
    """Metrics reported in [0, 1] and discussed in points (accuracy, AUC, precision, IoU, F-scores, ...)."""
    name = metric.lower()
    return any(token in name for token in _FRACTIONS)


@dataclass
class Decomposition:
    """One metric's values by mode and the terms they give."""

    metric: str
    values: dict[str, float]
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        missing = [m for m in ("T", "Td", "P", "E") if m not in self.values]
        if missing:
            raise EvalgapError(f"{self.metric}: modes {missing} were not measured; a decomposition needs T, Td, P and E.")

    @property
    def top(self) -> str:
        return "F" if "F" in self.values else "T"

    @property
    def terms(self) -> dict[str, float]:
        """The decomposition's terms in order (``epoch_average`` only when F was given; ``data``
        only with validation data)."""
        out = {}
        for name, a, b, _ in TERMS:
            if a in self.values and b in self.values:
                out[name] = self.values[a] - self.values[b]
        if "E_val" in self.values:
            out[DATA_TERM[0]] = self.values["E"] - self.values["E_val"]
        return out

    @property
    def total(self) -> float:
        """``top - E`` (or ``top - E_val`` with validation data): the gap the user sees."""
        bottom = "E_val" if "E_val" in self.values else "E"
        return self.values[self.top] - self.values[bottom]

    def non_finite_modes(self) -> list[str]:
        """The modes in which the metric's value is NaN or infinite (in :data:`MODE_NAMES`'s order)."""
        return [m for m in MODE_NAMES if m in self.values and not math.isfinite(self.values[m])]

    def goodness(self, value: float) -> float:
        """A difference oriented so that positive means the first mode looks better."""
        return value if self.higher_is_better else -value

    def threshold(self) -> float:
        """Below this a term is noise: 1 point for fractions, else 2% of the largest value (min 0.01)."""
        if is_fraction(self.metric):
            return 0.01
        return max(0.01, 0.02 * max(abs(v) for v in self.values.values()))

    def significant(self) -> dict[str, float]:
        return {k: v for k, v in self.terms.items() if abs(v) > self.threshold()}

    def explains_gap(self, name: str) -> bool:
        """Whether term ``name`` is a cause of the gap: the gap and the term above the noise threshold, the
        term with the gap's sign (it pushes the two numbers apart; one of the other sign narrows the gap)."""
        threshold, value = self.threshold(), self.terms.get(name, 0.0)
        return abs(self.total) > threshold and abs(value) > threshold and value * self.total > 0

    def ranked(self) -> list[tuple[str, float]]:
        """Terms by size, largest first."""
        return sorted(self.terms.items(), key=lambda kv: -abs(kv[1]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "values": dict(self.values),
            "terms": self.terms,
            "total": self.total,
            "threshold": self.threshold(),
        }


def decompose(metric: str, values: dict[str, float], *, higher_is_better: bool | None = None) -> Decomposition:
    """One metric's decomposition; ``higher_is_better`` where the framework or the user states the direction,
    else it is read from the name (:func:`evalgap.attribution.higher_is_better`)."""
    direction = _name_says_higher(metric) if higher_is_better is None else bool(higher_is_better)
    return Decomposition(metric, {k: float(v) for k, v in values.items() if v is not None}, direction)


def is_accuracy_like(metric: str) -> bool:
    """Accuracy and its variants (binary, categorical, sparse, top-k, per output): ``acc`` in the name."""
    name = metric.lower()
    return "acc" in name and not name.endswith("loss")


def choose_primary(names: Sequence[str], given: Sequence[str], primary: str | None = None, *,
                   left_out: Mapping[str, str] | None = None) -> str:
    """The metric a report ranks causes by: one rule for every adapter and monitor.

    ``primary`` if given (it must be measured; one the adapter ``left_out`` is refused with its reason); else
    the first accuracy-like metric; else the first metric the user compiled or passed (``given``, in their
    order); else the loss.
    """
    if primary is not None:
        if left_out and primary in left_out and primary not in names:
            raise DataError(f"primary={primary!r} cannot be diagnosed: {left_out[primary]}")
        if primary not in names:
            raise DataError(f"primary={primary!r} is not measured; choose one of {list(names)}.")
        return primary
    candidates = [n for n in given if n in names] or [n for n in names if n != "loss" and not n.endswith("_loss")]
    for name in candidates:
        if is_accuracy_like(name):
            return name
    if candidates:
        return candidates[0]
    return "loss" if "loss" in names else names[0]


@dataclass
class Finding:
    """Evidence beside the terms: what was seen, with numbers, and what to do about it.

    ``kind``: ``drift``, ``input_scale``, ``ema``, ``frozen``, ``replicas``, ``other_normalization``,
    ``no_batchnorm`` or one of the term names. ``severity``: ``cause`` (explains a significant
    term), ``warning`` or ``info``.
    """

    kind: str
    severity: str
    message: str
    remedy: str | None = None
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "message": self.message, "remedy": self.remedy, "numbers": self.numbers}
