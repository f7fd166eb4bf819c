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

import torch
import torch.distributed as dist

from ..errors import DistributedError
from ..stats import ChannelMoments, first_means, from_shifted_sums, shifted_sums


def active_group(process_group=None):
    """``(group, world_size, rank)`` when a multi-process group is in use, else ``None``.

    A ``process_group`` given while ``torch.distributed`` is not initialized is a mistake
    (the statistics would silently stay per process): :class:`evalgap.DistributedError`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise DistributedError(
                "process_group was given but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group(...) on every rank first, or drop process_group."
            )
        return None
    world = dist.get_world_size(process_group)
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
    device = _device_for(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    # 1. the shift: rank 0's means, broadcast
    shift = torch.as_tensor(first_means(parts, channels), dtype=torch.float64).to(device)
    dist.broadcast(shift, src=src, group=group)
    shift_np = shift.cpu().numpy()
    # 2. (n, S1, S2) about the shift, all layers in one all-reduce
    payload = torch.as_tensor(shifted_sums(parts, channels, shift_np), dtype=torch.float64).to(device)
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    return from_shifted_sums(payload.cpu().numpy(), channels, shift_np)


def all_reduce_sums(values: dict[str, float], group=None) -> dict[str, float]:
    """Sum named floats over the ranks (for metrics: sums of per-sample values and counts)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device_for(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, t.cpu().tolist()))
