"""Exact statistics across 2 gloo processes on CPU, against one process over the union."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

import evalgap  # noqa: E402
import evalgap.torch as eg  # noqa: E402

from ._reference import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def make_model(sync: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.SyncBatchNorm(4) if sync else nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3),
    )


def rank_batches(rank: int) -> list[torch.Tensor]:
    """Different classes on each rank (far apart means), and uneven numbers of batches."""
    g = torch.Generator().manual_seed(100 + rank)
    offset = 200.0 if rank == 0 else -50.0
    return [torch.randn(8, 3, 6, 6, generator=g) * 20 + offset for _ in range(3 if rank == 0 else 5)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)  # DDP-wrapped (CPU DDP refuses SyncBatchNorm)
        result = eg.recalibrate(ddp, rank_batches(rank), progress=False)
        state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        synced = make_model(sync=True)
        eg.recalibrate(synced, rank_batches(rank), progress=False)
        sync_state = {k: v.clone() for k, v in synced.state_dict().items() if "running" in k}
        # the variance-averaging approach (timm's distribute_bn, mmpretrain): each rank's own
        # exact statistics, then the mean of the running buffers over the ranks
        local = make_model()
        eg.recalibrate(local, rank_batches(rank), progress=False, process_group=dist.new_group([rank]))
        only_rank0 = dist.new_group([0])  # collective: every rank creates it; rank 1 is not a member
        outsider_error = None
        if rank == 1:
            before = {k: v.clone() for k, v in make_model().state_dict().items()}
            outsider = make_model()
            try:
                eg.recalibrate(outsider, rank_batches(rank), progress=False, process_group=only_rank0)
            except evalgap.DistributedError as e:
                outsider_error = str(e)
            assert all(torch.equal(v, outsider.state_dict()[k]) for k, v in before.items())
        averaged = {}
        for k, v in local.state_dict().items():
            if "running" in k:
                t = v.clone().double()
                dist.all_reduce(t)
                averaged[k] = t / world
        labelled = [(x, torch.full((len(x),), rank if i % 2 else 2, dtype=torch.long)) for i, x in enumerate(rank_batches(rank))]
        report = eg.diagnose(make_model(), labelled, progress=False)
        sync_report = eg.diagnose(make_model(sync=True), labelled, progress=False)  # gloo: SyncBN must stay local
        scored = eg.recalibrate(make_model(), labelled, progress=False, training_metrics=True).training_metrics
        torch.save({"report": report.to_dict(), "sync_report": sync_report.to_dict(), "training_metrics": scored, "state": state, "sync_state": sync_state, "averaged": averaged, "samples": result.samples, "batches": result.batches, "outsider_error": outsider_error}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_over_the_union(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = make_model()
    eg.recalibrate(single, rank_batches(0) + rank_batches(1), progress=False)
    ref = {k: v for k, v in single.state_dict().items() if "running" in k}
    assert r0["samples"] == r1["samples"] == 64 and r0["batches"] == 8
    # a group this process is not a member of: a clear error, the model unchanged (was: a silent local pass)
    assert r0["outsider_error"] is None and "does not include this process" in r1["outsider_error"]
    for key, value in ref.items():
        for which in ("state", "sync_state"):  # DDP-wrapped BatchNorm model, and a SyncBatchNorm model
            assert torch.equal(r0[which][key], r1[which][key]), key  # identical on every rank
            got = r0[which][key].double().numpy()
            np.testing.assert_allclose(got, value.double().numpy(), rtol=1e-6, atol=1e-6 * float(value.abs().max()), err_msg=key)
    # diagnose reduces its metrics over the ranks: the same report everywhere, equal to one process
    assert r0["report"]["metrics"] == r1["report"]["metrics"]
    labelled = [(x, torch.full((len(x),), r if i % 2 else 2, dtype=torch.long)) for r in (0, 1) for i, x in enumerate(rank_batches(r))]
    one = eg.diagnose(make_model(), labelled, progress=False).to_dict()
    for metric, d in one["metrics"].items():
        for mode, value in d["values"].items():
            assert r0["report"]["metrics"][metric]["values"][mode] == pytest.approx(value, rel=1e-5), (metric, mode)
    # a SyncBatchNorm model (the same weights): every mode as with BatchNorm2d, T = Td (no dropout), no note of a
    # training-mode difference (T's SyncBatchNorm runs on each rank's batch, as Td's does)
    assert r0["sync_report"]["metrics"] == r1["sync_report"]["metrics"]
    for metric, d in r0["report"]["metrics"].items():
        for mode, value in d["values"].items():
            assert r0["sync_report"]["metrics"][metric]["values"][mode] == pytest.approx(value, rel=1e-6), (metric, mode)
    assert not any("beyond BatchNorm" in n for n in r0["sync_report"]["notes"])
    # recalibrate's training_metrics too: reduced over the ranks, equal to one process over the union
    assert r0["training_metrics"] == r1["training_metrics"]
    union = eg.recalibrate(make_model(), labelled, progress=False, training_metrics=True).training_metrics
    assert set(union) == {"loss", "accuracy"}
    for metric, value in union.items():
        assert r0["training_metrics"][metric] == pytest.approx(value, rel=1e-5), metric
    # averaging the ranks' buffers (unweighted, without the spread between the ranks' means)
    # is far off when the ranks see different classes; the exact combination is not
    for var_key in ("1.running_var",):  # the first layer, where the ranks' means differ most
        error = np.abs(r0["averaged"][var_key].numpy() / ref[var_key].double().numpy() - 1)
        assert error.max() > 0.15, (var_key, error)


def test_process_group_without_an_initialized_backend_is_an_error():
    from evalgap import DistributedError

    model = make_model()
    with pytest.raises(DistributedError, match="init_process_group"):
        eg.recalibrate(model, rank_batches(0), progress=False, process_group=object())


def test_a_failed_combination_over_processes_is_named_and_changes_nothing():
    """The pass ran; the collective step failed (a rank gone, a timeout): the message says which step."""
    from evalgap import RecalibrationError
    from evalgap.engine import measure
    from evalgap.torch.adapter import TorchAdapter

    from ._reference import state_snapshot

    class Broken:
        """Answers its first ``working`` calls (the batch size agreed before the pass), then the peer is gone."""
        world, rank, description = 2, 0, "2 processes"

        def __init__(self, working: int):
            self.working = working

        def broadcast(self, vector):
            self.working -= 1
            if self.working < 0:
                raise RuntimeError("Connection closed by peer")
            return vector

        sum = broadcast

    model = make_model()
    before = state_snapshot(model)
    adapter = TorchAdapter()
    source = adapter.batches(rank_batches(0), batch_size=None, shuffle=False, seed=0, targets=False)
    with pytest.raises(RecalibrationError, match=r"failed while combining the statistics over 2 processes, after its 3 batches "
                                                 r"\(RuntimeError: Connection closed by peer\)"):
        measure(adapter, model, source, adapter.layers(model), collective=Broken(1), progress=False)
    assert state_snapshot(model) == before
    source = adapter.batches(rank_batches(0), batch_size=None, shuffle=False, seed=0, targets=False)
    with pytest.raises(RecalibrationError, match=r"failed while agreeing on the batch size over 2 processes, before the pass "
                                                 r"\(RuntimeError: Connection closed by peer\)"):
        measure(adapter, model, source, adapter.layers(model), collective=Broken(0), progress=False)
    assert state_snapshot(model) == before


def _mismatched_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1's model has its two convolution blocks' widths swapped: the same total number of BN channels, so the
    all-reduce would have the same size and mix the layers' channels."""
    from evalgap import DistributedError

    from ._reference import state_snapshot

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        a, b = (4, 6) if rank == 0 else (6, 4)
        model = nn.Sequential(nn.Conv2d(3, a, 3), nn.BatchNorm2d(a), nn.Conv2d(a, b, 3), nn.BatchNorm2d(b))
        before = state_snapshot(model)
        outcome = {}
        for name, call in (("recalibrate", eg.recalibrate), ("diagnose", None)):
            try:
                if call is None:
                    eg.diagnose(model, [(x, torch.zeros(len(x), dtype=torch.long)) for x in rank_batches(rank)],
                                loss_fn=lambda out, t: out.mean(), metrics={}, progress=False)
                else:
                    call(model, rank_batches(rank), progress=False)
                outcome[name] = "no error"
            except DistributedError as exc:
                outcome[name] = str(exc)
        outcome["unchanged"] = state_snapshot(model) == before
        torch.save(outcome, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_models_that_differ_across_processes_are_refused_on_every_process(tmp_path):
    mp.spawn(_mismatched_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank, layers in ((0, "(1 4, 3 6)"), (1, "(1 6, 3 4)")):
        outcome = torch.load(tmp_path / f"rank{rank}.pt")
        assert outcome["unchanged"], rank
        for name in ("recalibrate", "diagnose"):
            assert "the processes' models differ in their BatchNorm layers" in outcome[name], (rank, name, outcome[name])
            assert f"2 BatchNorm layers {layers}" in outcome[name] and "Nothing was written" in outcome[name]


def _small_shard_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        g = torch.Generator().manual_seed(7 + rank)
        batches = [torch.randn(n, 3, 5, 5, generator=g) * (1 + 3 * rank) + 10 * rank for n in ((16, 16, 7) if rank == 0 else (7,))]
        result = eg.recalibrate(model, batches, progress=False)
        torch.save({"batches": batches, "conv": model[0].state_dict(), "mean": model[1].running_mean.clone(),
                    "var": model[1].running_var.clone(), "batch_size": result.batch_size, "samples": result.samples,
                    "skipped": result.skipped_samples}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_whole_batches_are_those_of_the_largest_batch_size_over_the_processes(tmp_path):
    """Rank 1's shard is one batch of 7, rank 0's batches 16, 16, 7: both 7s are short batches, left out alike;
    the statistics are those of the two batches of 16 (a float64 NumPy reference)."""
    mp.spawn(_small_shard_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    conv = nn.Conv2d(3, 4, 3).double()
    conv.load_state_dict({k: v.double() for k, v in got[0]["conv"].items()})
    with torch.no_grad():
        seen = torch.cat([conv(x.double()) for x in got[0]["batches"][:2]]).numpy()  # the whole batches of 16
    values = seen.transpose(0, 2, 3, 1).reshape(-1, 4)
    for r in (0, 1):
        assert (got[r]["batch_size"], got[r]["samples"], got[r]["skipped"]) == (16, 32, 14)
        np.testing.assert_allclose(got[r]["mean"].double().numpy(), values.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[r]["var"].double().numpy(), values.var(0), rtol=1e-5)
