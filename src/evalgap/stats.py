"""Framework-free statistics: mergeable per-channel moments, EMA arithmetic, drift.

Population statistics of a BatchNorm layer's input
--------------------------------------------------
At fixed weights, batch ``b`` of the data reaches the layer with ``n_b`` values per
channel, mean ``mu_b`` and biased variance ``var_b``. Over all ``N = sum n_b`` values:

    mu  = sum_b n_b mu_b / N
    var = sum_b n_b (var_b + (mu_b - mu)^2) / N          (biased, as BatchNorm normalizes)

:class:`ChannelMoments` holds the state ``(count, mean, M2)`` with ``M2 = N var`` in
float64 and merges two states exactly (Chan, Golub & LeVeque, 1979):

    n = n_a + n_b,  d = mean_b - mean_a
    mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n

so batches, devices and workers combine in any order to the statistics of their union.
:func:`merge_moments` is the same update written with arithmetic only, so it also runs
on framework tensors.

EMA arithmetic
--------------
Moving statistics follow ``moving <- d * moving + (1 - d) * batch`` with decay ``d``:
Keras's ``momentum`` is ``d`` (default 0.99); PyTorch's ``momentum`` is ``1 - d``
(default 0.1; ``None`` means a cumulative average). After ``n`` updates the weight still
on the initial value is ``d^n``; the memory is ``1 / (1 - d)`` updates and the mean age
of the statistics ``d / (1 - d)`` updates. A decay whose memory is at most ``f`` epochs of
``S`` steps is ``d <= 1 - 1 / (f S)`` (``f = 1/2``: ``1 - 2/S``).

Drift of moving statistics from population statistics, per channel
------------------------------------------------------------------
    mean drift = |mu_moving - mu| / sqrt(var + eps)
    var drift  = |log((var_moving + eps) / (var + eps))|
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from .errors import EvalgapError

Convention = Literal["keras", "torch"]

__all__ = [
    "ChannelMoments",
    "merge_moments",
    "pool_rows",
    "EMA",
    "decay_from_momentum",
    "momentum_from_decay",
    "momentum_for_memory",
    "Drift",
    "drift",
    "shifted_sums",
    "from_shifted_sums",
    "first_means",
]


def merge_moments(n_a: Any, mean_a: Any, m2_a: Any, n_b: Any, mean_b: Any, m2_b: Any):
    """Chan et al.'s exact merge of two ``(count, mean, M2)`` states.

    Pure arithmetic: works on NumPy arrays and on framework tensors alike. Counts may be
    Python numbers (exact for integers). Merging with an empty state (count 0, mean 0,
    M2 0) returns the other side unchanged.
    Returns ``(n, mean, M2)``.
    """
    n = n_a + n_b
    if isinstance(n, (int, float)) and n == 0:
        return n, mean_a, m2_a
    delta = mean_b - mean_a
    frac_b = n_b / n
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * (n_a * frac_b)
    return n, mean, m2


def pool_rows(counts: Any, means: Any, variances: Any, *, correction: int = 0, sum0: Any = None):
    """The moments of the union of k groups of values, per column: group b of column j has ``counts[b, j]``
    values, mean ``means[b, j]`` and variance ``variances[b, j]`` with ``correction`` (0: biased, 1:
    Bessel-corrected); ``counts`` is (k, C), or (1, C) when every group of a column has the same count.
    Per column,

        N = sum_b n_b,    mean = sum_b n_b mu_b / N,
        M2 = sum_b ((n_b - correction) var_b + n_b (mu_b - mean)^2)            (so var = M2 / N)

    which for equal counts n is ``N = k n``, ``mean = sum_b mu_b / k`` and
    ``M2 = (n - correction) sum_b var_b + n sum_b (mu_b - mean)^2`` (no weighted sums).
    Pure arithmetic and column sums (``sum0``, default ``a.sum(axis=0)``): runs on NumPy arrays and on
    framework tensors alike (PyTorch pools a flush on its device with it). Give float64 values: ``mu_b -
    mean`` cancels in lower precisions. Every group needs n_b >= 1 (n_b >= 2 with correction 1):
    an empty group would still subtract ``correction * var_b``. Returns ``(N, mean, M2)``.
    """
    total = (lambda a: a.sum(axis=0)) if sum0 is None else sum0
    k = means.shape[0]
    if counts.shape[0] == 1:  # equal counts down each column
        n = counts[0]
        mean = total(means) / k
        d = means - mean
        return k * n, mean, (n - correction) * total(variances) + n * total(d * d)
    n = total(counts)
    mean = total(counts * means) / n
    d = means - mean
    spread = counts * (variances + d * d)
    return n, mean, total(spread - correction * variances if correction else spread)


@dataclass(frozen=True)
class ChannelMoments:
    """Per-channel ``(count, mean, M2)`` in float64; merge with ``+``.

    ``count`` is the number of values per channel (the same for every channel),
    ``mean`` and ``m2`` are float64 vectors of length C. Immutable: merging returns a
    new object.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    # ---- construction -------------------------------------------------------------
    @classmethod
    def empty(cls, channels: int) -> "ChannelMoments":
        """No data yet: count 0."""
        z = np.zeros(int(channels), dtype=np.float64)
        return cls(0, z, z.copy())

    @classmethod
    def from_moments(cls, count: int, mean: Any, var: Any) -> "ChannelMoments":
        """From one batch's count per channel, mean and *biased* variance."""
        count = _check_count(count)
        mean = _vec(mean, "mean")
        var = _vec(var, "var")
        if mean.shape != var.shape:
            raise EvalgapError(f"mean has shape {mean.shape} but var has {var.shape}: give one value per channel for both.")
        return cls(count, mean, np.maximum(var, 0.0) * count)

    @classmethod
    def from_batches(cls, counts: Any, means: Any, variances: Any) -> "ChannelMoments":
        """The union of k batches at once: ``counts`` (k,), ``means`` and biased ``variances`` (k, C).

        ``mean = sum n_b mu_b / N`` and ``M2 = sum n_b var_b + sum n_b (mu_b - mean)^2``, in
        float64: the same exact result as merging the batches one by one, in one vector step.
        """
        n = np.asarray(counts, dtype=np.float64).reshape(-1)
        mu = np.asarray(means, dtype=np.float64)
        var = np.asarray(variances, dtype=np.float64)
        if mu.ndim != 2 or mu.shape != var.shape or mu.shape[0] != n.shape[0]:
            raise EvalgapError(f"from_batches needs counts (k,), means and variances (k, C); got {n.shape}, {mu.shape}, {var.shape}.")
        return cls.from_layer_batches(n[:, None], mu, var, [mu.shape[1]])[0]

    @classmethod
    def from_layer_batches(cls, counts: Any, means: Any, variances: Any, channels: Sequence[int]) -> "list[ChannelMoments]":
        """:meth:`from_batches` for L layers at once, their channels side by side.

        ``counts`` (k, L): values per channel of layer l in batch b; ``means`` and biased
        ``variances`` (k, sum(channels)). Per channel of layer l, in float64,
        ``mean = sum_b n_bl mu_b / N_l`` and ``M2 = sum_b n_bl var_b + sum_b n_bl (mu_b - mean)^2``:
        one vector step (each sum one pass over the data) instead of L.
        """
        n = np.asarray(counts, dtype=np.float64)
        mu = np.asarray(means, dtype=np.float64)
        var = np.maximum(np.asarray(variances, dtype=np.float64), 0.0)
        channels = [int(c) for c in channels]
        if n.ndim != 2 or n.shape[1] != len(channels) or mu.shape != (n.shape[0], sum(channels)) or var.shape != mu.shape:
            raise EvalgapError(
                f"from_layer_batches needs counts (k, L), means and variances (k, sum of channels); got {n.shape}, {mu.shape}, "
                f"{var.shape} for {len(channels)} layers of {sum(channels)} channels."
            )
        invalid = ~((n >= 0) & (n == np.floor(n)))
        if invalid.any():
            _check_count(n[invalid][0])  # raises, naming the first invalid count
        totals = n.sum(axis=0)
        w = np.where(totals > 0, n, 1.0)  # a layer without values: weight 1, its result dropped below
        _, mean, m2 = pool_rows(np.repeat(w[:1] if np.all(w == w[:1]) else w, channels, axis=1), mu, var)
        ends = np.cumsum(channels).tolist()
        return [
            cls(int(total), mean[end - c : end], m2[end - c : end]) if total else cls.empty(c)
            for total, c, end in zip(totals.tolist(), channels, ends)
        ]

    @classmethod
    def from_sums(cls, count: int, total: Any, total_sq: Any, shift: Any = 0.0) -> "ChannelMoments":
        """From per-channel sums ``S1 = sum(x - shift)`` and ``S2 = sum((x - shift)^2)``.

        ``mean = shift + S1 / n`` and ``M2 = S2 - S1^2 / n``. Choose ``shift`` near the
        data's mean (e.g. the first batch's mean): with shift 0 and a large offset the
        subtraction cancels catastrophically, exactly like ``E[x^2] - E[x]^2``.
        """
        count = _check_count(count)
        s1 = _vec(total, "total")
        s2 = _vec(total_sq, "total_sq")
        shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), s1.shape)
        if count == 0:
            return cls(0, np.zeros_like(s1), np.zeros_like(s1))
        return cls(count, shift + s1 / count, np.maximum(s2 - s1 * s1 / count, 0.0))

    @classmethod
    def from_array(cls, x: Any, channel_axis: int = -1) -> "ChannelMoments":
        """From an array of values: every axis but ``channel_axis`` is reduced (float64)."""
        x = np.asarray(x, dtype=np.float64)
        x = np.moveaxis(x, channel_axis, -1).reshape(-1, x.shape[channel_axis])
        n = x.shape[0]
        if n == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(axis=0)
        return cls(n, mean, ((x - mean) ** 2).sum(axis=0))

    # ---- algebra ------------------------------------------------------------------
    def merge(self, other: "ChannelMoments") -> "ChannelMoments":
        """Exact moments of the union of both data sets."""
        if self.mean.shape != other.mean.shape:
            raise EvalgapError(
                f"cannot merge moments of {self.channels} and {other.channels} channels: "
                "both sides must come from the same layer."
            )
        n, mean, m2 = merge_moments(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        return ChannelMoments(int(n), np.asarray(mean, dtype=np.float64), np.asarray(m2, dtype=np.float64))

    __add__ = merge

    @staticmethod
    def merge_all(parts: Iterable["ChannelMoments"]) -> "ChannelMoments":
        """Merge many states pairwise (a balanced tree keeps rounding error at O(log k))."""
        items = list(parts)
        if not items:
            raise EvalgapError("merge_all needs at least one ChannelMoments.")
        while len(items) > 1:
            items = [items[i].merge(items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
        return items[0]

    # ---- results ------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def var(self) -> np.ndarray:
        """Biased (population) variance ``M2 / N``; what BatchNorm normalizes with."""
        if self.count == 0:
            return np.full_like(self.m2, np.nan)
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> np.ndarray:
        """``M2 / (N - 1)``."""
        if self.count < 2:
            return np.full_like(self.m2, np.nan)
        return self.m2 / (self.count - 1)

    def __repr__(self) -> str:
        return f"ChannelMoments(count={self.count}, channels={self.channels})"


def _check_count(count: Any) -> int:
    c = int(count)
    if c != count or c < 0:
        raise EvalgapError(f"count must be a non-negative integer number of values per channel, got {count!r}.")
    return c


def _vec(a: Any, name: str) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64)
    if v.ndim != 1:
        raise EvalgapError(f"{name} must be a vector with one value per channel, got shape {v.shape}.")
    return v


def shifted_sums(parts: "list[ChannelMoments | None]", channels: list[int], shift: np.ndarray) -> np.ndarray:
    """One flat float64 vector ``[n, sum(x - s), sum((x - s)^2)]`` per layer, for a SUM across processes.

    ``shift`` holds every layer's per-channel shift, concatenated (the same on every process);
    ``n (mean - s)`` and ``M2 + n (mean - s)^2`` are exact rewrites of the state about ``s``.
    """
    pieces, offset = [], 0
    for p, c in zip(parts, channels):
        s = shift[offset : offset + c]
        offset += c
        if p is None or p.count == 0:
            pieces.append(np.zeros(1 + 2 * c))
        else:
            d = p.mean - s
            pieces.append(np.concatenate([[float(p.count)], p.count * d, p.m2 + p.count * d * d]))
    return np.concatenate(pieces) if pieces else np.zeros(0)


def from_shifted_sums(total: np.ndarray, channels: list[int], shift: np.ndarray) -> "list[ChannelMoments | None]":
    """Inverse of :func:`shifted_sums` after the SUM: the union's moments per layer (None: no data)."""
    out: list[ChannelMoments | None] = []
    offset = shift_offset = 0
    for c in channels:
        n = int(round(float(total[offset])))
        s1, s2 = total[offset + 1 : offset + 1 + c], total[offset + 1 + c : offset + 1 + 2 * c]
        s = shift[shift_offset : shift_offset + c]
        offset += 1 + 2 * c
        shift_offset += c
        out.append(None if n == 0 else ChannelMoments.from_sums(n, s1, s2, s))
    return out


def first_means(parts: "list[ChannelMoments | None]", channels: list[int]) -> np.ndarray:
    """Every layer's means concatenated (zeros where there are no data): a shift candidate."""
    return np.concatenate([p.mean if p is not None and p.count else np.zeros(c) for p, c in zip(parts, channels)])


# ---------------------------------------------------------------------------------
# EMA arithmetic
# ---------------------------------------------------------------------------------
def decay_from_momentum(momentum: float | None, convention: Convention = "keras") -> float | None:
    """Decay ``d`` (weight kept on the old value per update) from a framework's momentum.

    Keras: ``d = momentum``. PyTorch: ``d = 1 - momentum``; ``None`` (cumulative
    average) returns ``None``.
    """
    if convention == "keras":
        if momentum is None:
            raise EvalgapError("Keras momentum cannot be None; Keras's default is 0.99.")
        d = float(momentum)
    elif convention == "torch":
        if momentum is None:
            return None
        d = 1.0 - float(momentum)
    else:
        raise EvalgapError(f"convention must be 'keras' or 'torch', got {convention!r}.")
    if not 0.0 <= d <= 1.0:
        raise EvalgapError(f"momentum {momentum!r} gives decay {d}, outside [0, 1].")
    return d


def momentum_from_decay(decay: float, convention: Convention = "keras") -> float:
    """Inverse of :func:`decay_from_momentum`."""
    if convention == "keras":
        return float(decay)
    if convention == "torch":
        return 1.0 - float(decay)
    raise EvalgapError(f"convention must be 'keras' or 'torch', got {convention!r}.")


@dataclass(frozen=True)
class EMA:
    """An exponential moving average's arithmetic, from a framework's momentum.

    ``EMA(0.99)`` is Keras's default; ``EMA(0.1, "torch")`` PyTorch's (the same decay 0.9).
    ``EMA(None, "torch")`` is PyTorch's cumulative average.
    """

    momentum: float | None
    convention: Convention = "keras"

    @property
    def decay(self) -> float | None:
        return decay_from_momentum(self.momentum, self.convention)

    @property
    def cumulative(self) -> bool:
        return self.decay is None

    def initial_weight(self, updates: int) -> float:
        """Weight still on the initial value after ``updates`` updates: ``d^n``."""
        if updates < 0:
            raise EvalgapError(f"updates must be >= 0, got {updates}.")
        if self.cumulative:
            return 1.0 if updates == 0 else 0.0
        return float(self.decay) ** int(updates)

    @property
    def memory(self) -> float:
        """Effective number of updates averaged: ``1 / (1 - d)`` (inf for d = 1 or cumulative)."""
        d = self.decay
        if d is None or d >= 1.0:
            return math.inf
        return 1.0 / (1.0 - d)

    def mean_age(self, updates: int | None = None) -> float:
        """Mean age, in updates, of what the statistics average.

        Steady state (``updates=None``): ``d / (1 - d)``. After ``n`` updates from the
        initial value (weights ``(1-d) d^k`` on the update k steps ago, ``d^n`` on the
        initial value, counted as age ``n``): ``sum_k k (1-d) d^k + n d^n``
        ``= d (1 - d^n) / (1 - d)``. Cumulative average over n updates: ``(n - 1) / 2``.
        """
        d = self.decay
        if d is None:
            if updates is None:
                return math.inf
            return max(updates - 1, 0) / 2.0
        if d >= 1.0:
            return math.inf if updates is None else float(updates)
        if updates is None:
            return d / (1.0 - d)
        return d * (1.0 - d**updates) / (1.0 - d)


def momentum_for_memory(steps_per_epoch: int, epochs: float = 0.5, convention: Convention = "keras") -> float:
    """The momentum whose memory is at most ``epochs`` epochs of ``steps_per_epoch`` steps.

    Decay ``d = 1 - 1 / (epochs * S)``, clipped at 0; the default half epoch gives
    ``1 - 2/S`` (0.909 for the seed's 22 steps; the accepted answer used 0.9).
    Returned in the framework's convention (PyTorch: ``1 - d``).
    """
    if steps_per_epoch < 1:
        raise EvalgapError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
    if epochs <= 0:
        raise EvalgapError(f"epochs must be > 0, got {epochs}.")
    decay = max(0.0, 1.0 - 1.0 / (epochs * steps_per_epoch))
    return momentum_from_decay(decay, convention)


# ---------------------------------------------------------------------------------
# Drift
# ---------------------------------------------------------------------------------
#: A drift above this (in standard deviations of the mean, or in |log| of the variance
#: ratio) is reported as large.
LARGE_DRIFT = 0.5


@dataclass(frozen=True)
class Drift:
    """Per-channel drift of moving statistics from population statistics (see module doc)."""

    mean: np.ndarray
    var: np.ndarray

    @property
    def mean_max(self) -> float:
        return float(np.max(self.mean)) if self.mean.size else 0.0

    @property
    def mean_avg(self) -> float:
        return float(np.mean(self.mean)) if self.mean.size else 0.0

    @property
    def var_max(self) -> float:
        return float(np.max(self.var)) if self.var.size else 0.0

    @property
    def var_avg(self) -> float:
        return float(np.mean(self.var)) if self.var.size else 0.0

    @property
    def worst(self) -> float:
        """The larger of the two maxima: one number to rank layers by (NaN when either is not finite: statistics
        that are not valid, such as a negative variance, are never ranked as small)."""
        a, b = self.mean_max, self.var_max
        return a + b if not (math.isfinite(a) and math.isfinite(b)) else max(a, b)


def drift(moving_mean: Any, moving_var: Any, mean: Any, var: Any, eps: float) -> Drift:
    """Drift of ``(moving_mean, moving_var)`` from population ``(mean, var)``, per channel."""
    mm = np.asarray(moving_mean, dtype=np.float64)
    mv = np.asarray(moving_var, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64)
    v = np.asarray(var, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_mean = np.abs(mm - mu) / np.sqrt(v + eps)
        d_var = np.abs(np.log((mv + eps) / (v + eps)))
    return Drift(d_mean, d_var)
