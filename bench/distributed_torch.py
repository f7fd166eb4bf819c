"""Cost of the exact cross-rank combination for ResNet50's 53 BatchNorm layers.

Two (or --ranks) gloo processes on this machine; each holds per-channel moments for every
ResNet50 BatchNorm layer (26,560 channels) and calls evalgap.torch.distributed.all_reduce_moments
R times; prints the median time per combination on rank 0 and the bytes that cross.

    python bench/distributed_torch.py [--ranks 2] [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from evalgap.stats import ChannelMoments
from evalgap.torch.distributed import all_reduce_moments

# BatchNorm widths of ResNet50 in forward order (stem, then bottlenecks; the first block of each stage has a projection BN)
RESNET50 = [64]
for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
    for i in range(blocks):
        RESNET50 += [width, width, 4 * width] + ([4 * width] if i == 0 else [])


def worker(rank: int, world: int, port: int, runs: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rng = np.random.default_rng(rank)
    parts = [ChannelMoments.from_array(rng.normal(rank, 1.0, (64, c))) for c in RESNET50]
    all_reduce_moments(parts, RESNET50)  # warm-up
    times = []
    for _ in range(runs):
        dist.barrier()
        t = time.perf_counter()
        all_reduce_moments(parts, RESNET50)
        times.append(time.perf_counter() - t)
    if rank == 0:
        c = sum(RESNET50)
        print(f"{len(RESNET50)} layers, {c} channels, {world} gloo processes on one machine: "
              f"median {1000 * statistics.median(times):.2f} ms per combination "
              f"(broadcast {8 * c / 1024:.0f} KiB, all-reduce {8 * (2 * c + len(RESNET50)) / 1024:.0f} KiB)")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.ranks, port, args.runs), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
