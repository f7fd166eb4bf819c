"""A process that stops before the pass (its shard or its val_data yield no batch) stops every process at once, with
nothing changed."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

import evalgap  # noqa: E402
import evalgap.torch as eg  # noqa: E402

from ._reference import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short timeout: a process left waiting fails the test in seconds instead of blocking it for 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(rank)

        def loader(n):
            ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
            return torch.utils.data.DataLoader(ds, batch_size=8, drop_last=True)

        full = loader(40)
        shard = loader(40 if rank == 0 else 5)  # rank 1: 5 samples, drop_last=True with batches of 8: no batch at all
        errors = {}
        for name, call in (("recalibrate", lambda m: eg.recalibrate(m, shard, progress=False)),
                           ("diagnose", lambda m: eg.diagnose(m, shard, progress=False)),
                           ("val_data", lambda m: eg.diagnose(m, full, val_data=shard, progress=False))):
            model = _model()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            try:
                call(model)
                errors[name] = None
            except evalgap.EvalgapError as exc:
                errors[name] = (type(exc).__name__, str(exc))
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), name
        dist.barrier()  # both calls returned on both ranks: no process is left in a collective
        torch.save(errors, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_rank_without_a_batch_stops_every_rank_before_the_pass(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("recalibrate", "diagnose", "val_data"):
        assert r1[name][0] == "DataError" and "yielded no batch" in r1[name][1], r1[name]
        assert r0[name][0] == "DistributedError" and "process 1 of 2" in r0[name][1], r0[name]
