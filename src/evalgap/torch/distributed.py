"""Exact combination of per-channel moments across ``torch.distributed`` ranks.

Each rank holds ``(n_r, mean_r, M2_r)`` per channel. With a shift ``s`` agreed across ranks
(rank 0's mean, broadcast; any value near the data works), each rank contributes

    S1_r = n_r (mean_r - s),     S2_r = M2_r + n_r (mean_r - s)^2

and one all-reduce of ``(n, S1, S2)`` gives the union's moments exactly:
``mean = s + S1 / N`` and ``M2 = S2 - S1^2 / N`` (:meth:`ChannelMoments.from_sums`). The shift
keeps ``S2 - S1^2 / N`` free of cancellation. What crosses the network: one broadcast of C
float64 values and one all-reduce of 2C + 1 float64 values per layer, all layers in one
message each.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DistributedError
from ..stats import ChannelMoments, first_means, from_shifted_sums, shifted_sums


def active_group(process_group=None):
    """``(group, world_size, rank)`` when a multi-process group is in use, else ``None``.

    A ``process_group`` given while ``torch.distributed`` is not initialized, or one this
    process is not a member of (``new_group(ranks)`` returns a placeholder on the other ranks),
    is a mistake (the statistics would silently stay per process): :class:`evalgap.DistributedError`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise DistributedError(
                "process_group was given but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group(...) on every rank first, or drop process_group."
            )
        return None
    world = dist.get_world_size(process_group)
    if world < 0:
        raise DistributedError(
            f"process_group does not include this process (rank {dist.get_rank()} of the default group): "
            "torch.distributed.new_group(ranks) gives the ranks outside `ranks` a placeholder. Call with "
            "process_group only on the group's members, and leave the others out (or pass their own group)."
        )
    if world <= 1:
        return None
    return process_group, world, dist.get_rank(process_group)


def _device_for(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_moments(parts: list[ChannelMoments | None], channels: list[int], group=None) -> list[ChannelMoments | None]:
    """Merge each layer's moments over every rank of ``group`` (collective: every rank calls it).

    ``parts[i]`` is this rank's state for layer i (``None`` when no data reached it here).
    Returns the union's state per layer (``None`` when no rank saw data).
    """
    c = TorchCollective(group, dist.get_world_size(group), dist.get_rank(group))
    shift = c.broadcast(first_means(parts, channels))
    return from_shifted_sums(c.sum(shifted_sums(parts, channels, shift)), channels, shift)


class TorchCollective:
    """:class:`evalgap.engine.Collective` over a ``torch.distributed`` process group (float64 on the group's device)."""

    def __init__(self, group, world: int, rank: int):
        self.group, self.world, self.rank = group, world, rank
        self.description = f"{world} processes"

    def _tensor(self, vector: np.ndarray) -> torch.Tensor:
        """A copy on the group's device: the collectives work in place, and the caller's array must not change."""
        return torch.tensor(np.asarray(vector, dtype=np.float64)).to(_device_for(self.group))

    def sum(self, vector: np.ndarray) -> np.ndarray:
        t = self._tensor(vector)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()

    def broadcast(self, vector: np.ndarray) -> np.ndarray:
        t = self._tensor(vector)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(t, src=src, group=self.group)
        return t.cpu().numpy()


def collective(process_group=None) -> TorchCollective | None:
    """The collective for ``process_group`` (default: the initialized default group) when it spans several processes."""
    group = active_group(process_group)
    return None if group is None else TorchCollective(*group)
