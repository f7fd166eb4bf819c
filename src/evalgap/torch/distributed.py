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

from ..stats import ChannelMoments


def active_group(process_group=None):
    """``(group, world_size, rank)`` when a multi-process group is in use, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
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
    # 1. the shift: rank 0's mean (zeros where rank 0 saw nothing)
    shift = torch.cat([torch.as_tensor(p.mean if p is not None and p.count else np.zeros(c), dtype=torch.float64) for p, c in zip(parts, channels)]).to(device)
    dist.broadcast(shift, src=src, group=group)
    shift_np = shift.cpu().numpy()
    # 2. (n, S1, S2) about the shift, all layers in one all-reduce
    pieces, offset = [], 0
    for p, c in zip(parts, channels):
        s = shift_np[offset : offset + c]
        offset += c
        if p is None or p.count == 0:
            pieces.append(np.concatenate([[0.0], np.zeros(c), np.zeros(c)]))
        else:
            d = p.mean - s
            pieces.append(np.concatenate([[float(p.count)], p.count * d, p.m2 + p.count * d * d]))
    payload = torch.as_tensor(np.concatenate(pieces), dtype=torch.float64).to(device)
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    total = payload.cpu().numpy()
    out: list[ChannelMoments | None] = []
    offset, shift_offset = 0, 0
    for c in channels:
        n = int(round(total[offset]))
        s1 = total[offset + 1 : offset + 1 + c]
        s2 = total[offset + 1 + c : offset + 1 + 2 * c]
        s = shift_np[shift_offset : shift_offset + c]
        offset += 1 + 2 * c
        shift_offset += c
        out.append(None if n == 0 else ChannelMoments.from_sums(n, s1, s2, s))
    return out


def all_reduce_sums(values: dict[str, float], group=None) -> dict[str, float]:
    """Sum named floats over the ranks (for metrics: sums of per-sample values and counts)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device_for(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, t.cpu().tolist()))
