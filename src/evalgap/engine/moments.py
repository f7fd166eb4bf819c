"""Per-layer population moments, accumulated from a moments pass and combined across processes.

Each BN call of a pass gives ``(layer, n, mean, biased var)``, possibly on a device. They
stay there for :data:`FLUSH_EVERY` batches, then move to the host in one transfer
(:meth:`Adapter.host_captures`) and are merged per layer in float64
(:meth:`evalgap.stats.ChannelMoments.from_batches`). Across processes each layer's state
travels as shifted sums in one SUM (:func:`evalgap.stats.shifted_sums`), so k processes
give the moments of the union exactly.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from .._checks import check_count
from ..stats import ChannelMoments, first_means, from_shifted_sums, shifted_sums
from .protocol import Capture, Collective, NormLayer

#: Per-batch moments stay on the device for this many batches, then move to the host.
FLUSH_EVERY = 32


def captures_to_host(captures: list[Capture], to_host: Callable[[list[Any]], list[np.ndarray]]) -> list[tuple[int, int, Any, Any]]:
    """Captures as host ``(index, n, mean, var)`` with one bulk ``to_host`` of every count, mean and variance
    (for adapters whose captures hold separate device values)."""
    host = iter(to_host([v for _, count, mean, var in captures for v in (count, mean, var)]))
    return [(index, int(np.asarray(next(host)).reshape(())), next(host), next(host)) for index, *_ in captures]


class LayerMoments:
    """Float64 moments, call counts and first-call order of each layer of a pass."""

    def __init__(self, layers: Sequence[NormLayer], host_captures: Callable[[list[Capture]], list[tuple[int, int, Any, Any]]]):
        n = len(layers)
        self.names = [layer.name for layer in layers]
        self.host_captures = host_captures
        self.moments: list[ChannelMoments | None] = [None] * n
        self.calls = [0] * n
        self.samples = [0] * n
        self.calls_per_batch = [0] * n
        self.first_seen: dict[int, int] = {}
        self.pending: list[Capture] = []

    def add(self, captures: list[Capture], batch_size: int) -> None:
        """One batch's captures (in call order); a layer called twice is a shared layer."""
        for index, k in Counter(c[0] for c in captures).items():
            self.first_seen.setdefault(index, len(self.first_seen))
            self.calls[index] += k
            self.samples[index] += batch_size
            self.calls_per_batch[index] = max(self.calls_per_batch[index], k)
        self.pending.extend(captures)

    def flush(self) -> None:
        """Move the pending captures to the host and merge them, per layer, in one vector step."""
        if not self.pending:
            return
        per_layer: dict[int, tuple[list, list, list]] = {}
        for index, n, mean, var in self.host_captures(self.pending):
            check_count(n, self.names[index])
            counts, means, variances = per_layer.setdefault(index, ([], [], []))
            counts.append(n)
            means.append(np.asarray(mean, dtype=np.float64).reshape(-1))
            variances.append(np.asarray(var, dtype=np.float64).reshape(-1))
        self.pending.clear()
        for index, (counts, means, variances) in per_layer.items():
            part = ChannelMoments.from_batches(counts, np.stack(means), np.stack(variances))
            self.moments[index] = part if self.moments[index] is None else self.moments[index].merge(part)

    def order(self) -> list[int]:
        """Layer indices in forward order (first call), then the layers no data reached."""
        n = len(self.moments)
        return sorted(range(n), key=lambda i: self.first_seen.get(i, n + i))

    def combine(self, collective: Collective, channels: list[int], counters: list[float]) -> list[float]:
        """Replace every layer's state with the union over all processes; return the summed counters.

        Collective: every process calls it, with the same layers. A layer first reached on
        another process is ordered after this process's own layers.
        """
        shift = collective.broadcast(first_means(self.moments, channels))
        n = len(channels)
        extra = [*self.samples, *self.calls, *(1.0 if i in self.first_seen else 0.0 for i in range(n)), *counters]
        payload = np.concatenate([shifted_sums(self.moments, channels, shift), np.asarray(extra, dtype=np.float64)])
        total = collective.sum(payload)
        size = sum(1 + 2 * c for c in channels)
        self.moments = from_shifted_sums(total[:size], channels, shift)
        rest = [int(round(v)) for v in total[size:]]
        self.samples, self.calls, seen = rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n]
        for i in range(n):
            if i not in self.first_seen and seen[i]:
                self.first_seen[i] = 10**9 + i
        return rest[3 * n :]
