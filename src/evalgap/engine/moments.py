"""Per-layer population moments, accumulated from a moments pass and combined across processes.

Each BN call of a pass gives a capture: its layer, then ``n, mean, biased var`` in the
adapter's form, possibly on a device (Keras 3 packs a whole batch's into two arrays). They
stay there for :data:`FLUSH_EVERY` batches, then move to the host in one transfer
(:meth:`Adapter.host_captures`) and are merged per layer in float64
(:meth:`evalgap.stats.ChannelMoments.from_batches`). Across processes each layer's state
travels as shifted sums in one SUM (:func:`evalgap.stats.shifted_sums`), so k processes
give the moments of the union exactly.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from .._checks import check_count
from ..errors import DistributedError, EvalgapError
from ..stats import ChannelMoments, first_means, from_shifted_sums, shifted_sums
from .protocol import Capture, Collective, HostCaptures, NormLayer

#: Per-batch moments stay on the device for this many batches, then move to the host.
FLUSH_EVERY = 32


def captures_to_host(captures: list[Capture], to_host: Callable[[list[Any]], list[np.ndarray]]) -> HostCaptures:
    """Captures on the host with one bulk ``to_host`` of every count, mean and variance
    (for adapters whose captures hold separate device values)."""
    host = iter(to_host([v for _, count, mean, var in captures for v in (count, mean, var)]))
    return HostCaptures.from_list([(index, next(host), next(host), next(host)) for index, *_ in captures])


class LayerMoments:
    """Float64 moments, call counts and first-call order of each layer of a pass."""

    def __init__(self, layers: Sequence[NormLayer], host_captures: Callable[[list[Capture]], HostCaptures]):
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
        """Move the pending captures to the host and merge them, per layer, in float64.

        Layers with the same number of calls in this flush (usually all of them) are merged
        together, their channels side by side (:meth:`ChannelMoments.from_layer_batches`):
        the host work per flush grows with the number of distinct call counts, not with the
        number of captures.
        """
        if not self.pending:
            return
        caps = self.host_captures(self.pending)
        self.pending.clear()
        single = caps.index[caps.count == 1]
        if single.size:  # one value per channel is fine beside larger calls (a ragged last batch), not alone
            larger = set(caps.index[caps.count > 1].tolist()) | {i for i, m in enumerate(self.moments) if m is not None}
            lone = [int(i) for i in single if int(i) not in larger]
            if lone:
                check_count(1, self.names[lone[0]])
        if self._merge_regular(caps):
            return
        starts = np.cumsum(caps.channels) - caps.channels  # where each capture's values begin
        order = np.argsort(caps.index, kind="stable")  # by layer, each layer's calls in call order
        calls = np.bincount(caps.index, minlength=len(self.names))
        for k in np.unique(calls[calls > 0]):
            layers = np.flatnonzero(calls == k)
            at = order[np.isin(caps.index[order], layers)].reshape(len(layers), int(k))  # (layers, calls)
            channels = caps.channels[at]
            if np.any(channels != channels[:, :1]):
                bad = int(layers[np.flatnonzero(np.any(channels != channels[:, :1], axis=1))[0]])
                seen = sorted(set(channels[layers == bad].ravel().tolist()))
                raise EvalgapError(f"{self.names[bad]} saw inputs with different numbers of channels in one pass: {seen}.")
            c = channels[:, 0]
            gather = np.repeat(starts[at].T, c, axis=1) + (np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c))  # (calls, sum c)
            self._merge(layers.tolist(), ChannelMoments.from_layer_batches(caps.count[at].T, caps.mean[gather], caps.var[gather], c))

    def _merge_regular(self, caps: HostCaptures) -> bool:
        """The common case: every batch called the same layers once each, in the same order. Then the
        captures are a (batches, layers) grid and their values a (batches, channels) matrix as they lie."""
        first = np.flatnonzero(caps.index == caps.index[0])
        k = first.size
        if k == 0 or caps.index.size % k or np.any(first != np.arange(k) * (caps.index.size // k)):
            return False
        grid, channels = caps.index.reshape(k, -1), caps.channels.reshape(k, -1)
        if np.any(grid != grid[0]) or np.any(channels != channels[0]) or np.unique(grid[0]).size != grid.shape[1]:
            return False
        self._merge(grid[0].tolist(), ChannelMoments.from_layer_batches(
            caps.count.reshape(k, -1), caps.mean.reshape(k, -1), caps.var.reshape(k, -1), channels[0]))
        return True

    def _merge(self, indices: list[int], parts: list[ChannelMoments]) -> None:
        for index, part in zip(indices, parts):
            if part.count == 0:  # calls on empty inputs carry no values: a layer that only had those stays unreached
                continue
            self.moments[index] = part if self.moments[index] is None else self.moments[index].merge(part)

    def order(self) -> list[int]:
        """Layer indices in forward order (first call), then the layers no data reached (called with
        empty inputs only, or never)."""
        n = len(self.moments)
        return sorted(range(n), key=lambda i: self.first_seen.get(i, n + i) if self.moments[i] is not None else 2 * n + i)

    def combine(self, collective: Collective, channels: list[int], counters: list[float]) -> list[float]:
        """Replace every layer's state with the union over all processes; return the summed counters.

        Collective: every process calls it, with the same layers (checked first: a
        :class:`evalgap.DistributedError` on every process where they differ, before any message of
        a size that depends on them). A layer first reached on another process is ordered after
        this process's own layers.
        """
        _check_same_layers(collective, self.names, channels)
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


def _check_same_layers(collective: Collective, names: list[str], channels: list[int]) -> None:
    """Every process must combine the same BatchNorm layers: their number and channels are compared with process
    0's (a fixed-size fingerprint: their number, total and a CRC-32 of the list, broadcast), then every process learns whether any differs (one sum), so all
    raise together instead of exchanging messages of different sizes (which a backend may abort on, or, with equal
    total sizes, mix the channels of different layers)."""
    c = np.asarray(channels, dtype=np.int64)
    mine = np.array([len(c), c.sum(), zlib.crc32(c.tobytes())], dtype=np.float64)  # each exact in float64
    theirs = collective.broadcast(mine)
    differs = float(not np.array_equal(mine, theirs))
    if collective.sum(np.array([differs], dtype=np.float64))[0] > 0:
        here = f"this process has {len(channels)} BatchNorm layers ({', '.join(f'{n} {c}' for n, c in zip(names[:4], channels[:4]))}" \
               f"{' ...' if len(names) > 4 else ''})"
        raise DistributedError(
            f"the processes' models differ in their BatchNorm layers (their number or channels; {here}): every process "
            "must recalibrate or diagnose the same model, built the same way. Nothing was written."
        )

