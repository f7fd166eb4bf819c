"""torchmetrics objects under torch.distributed: reduced over exactly the processes of ``process_group``.

3 gloo processes on CPU, against one process without torch.distributed over the same data (the union of the
group's shards, or a rank's own shard for a group of one) and a fresh torchmetrics object on the model's outputs.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest

torch = pytest.importorskip("torch")
torchmetrics = pytest.importorskip("torchmetrics")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC  # noqa: E402

import evalgap  # noqa: E402
import evalgap.torch as eg  # noqa: E402

from ._reference import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 3
TIMEOUT = datetime.timedelta(seconds=15)  # a collective that waits on a process that never comes fails, not hangs


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Whole batches of 8, a different number per rank, shifted inputs per rank (so the union differs from a shard)."""
    g = torch.Generator().manual_seed(30 + rank)
    out = []
    for _ in range(2 + rank):
        y = torch.randint(0, 3, (8,), generator=g)
        x = torch.randn(8, 4, generator=g) + y[:, None].float() * 0.7 + 1.5 * rank
        out.append((x, y))
    return out


def accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(1) == y).float().mean()


def metrics(process_group=None) -> dict:
    """A plain callable (reduced by evalgap's sums), a sum-state and a cat-state torchmetrics object."""
    kw = {} if process_group is None else {"process_group": process_group}
    return {"acc": accuracy, "tm_acc": MulticlassAccuracy(num_classes=3, average="micro", **kw),
            "auroc": MulticlassAUROC(num_classes=3, thresholds=None, **kw)}


def values(report) -> dict:
    return {name: d["values"] for name, d in report.to_dict()["metrics"].items()}


def _settings(m) -> tuple:
    return (m.process_group, m.sync_on_compute, m._to_sync, m.dist_sync_fn, m.dist_sync_on_step, m.distributed_available_fn,
            m.update_count, m._is_synced)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    got: dict = {}

    def attempt(case, call):
        try:
            got[case] = call()
        except Exception as exc:  # recorded: the test names it
            got[case] = f"{type(exc).__name__}: {exc}"

    try:
        own = [dist.new_group([r], timeout=TIMEOUT) for r in range(WORLD)][rank]  # collective: every rank creates each
        pair = dist.new_group([0, 1], timeout=TIMEOUT)

        # the default group, with metrics built with their own group of one (and one with the whole world):
        # reduced over the 3 processes, and the user's objects keep their settings
        def default_group():
            given = metrics(process_group=own)
            world_tm = MulticlassAccuracy(num_classes=3, average="micro", process_group=dist.group.WORLD)
            before = {k: _settings(m) for k, m in given.items() if k != "acc"}
            report = eg.diagnose(make_model(), rank_batches(rank), metrics={**given, "world_tm": world_tm}, progress=False)
            scored = eg.recalibrate(make_model(), rank_batches(rank), progress=False, training_metrics=True,
                                    metrics=given).training_metrics
            unchanged = all(_settings(given[k]) == s and given[k].process_group is own for k, s in before.items())
            return {"values": values(report), "training": scored, "unchanged": unchanged}

        attempt("default", default_group)

        def failing():  # one number expected, per-class values computed: an error; the user's object unchanged
            m = MulticlassAccuracy(num_classes=3, average=None, process_group=own)
            before = _settings(m)
            try:
                eg.diagnose(make_model(), rank_batches(rank), metrics={"per_class": m}, progress=False)
            except evalgap.DataError as exc:
                return {"error": str(exc), "unchanged": _settings(m) == before and m.process_group is own}
            return {"error": None}

        attempt("failing", failing)
        # a group of one: each rank its own data alone, no collective at all
        attempt("alone", lambda: values(eg.diagnose(make_model(), rank_batches(rank), metrics=metrics(), process_group=own,
                                                    progress=False)))
        # a subgroup of 2 of the 3 processes: rank 2 takes no part (nothing may wait on it)
        if rank in (0, 1):
            attempt("pair", lambda: values(eg.diagnose(make_model(), rank_batches(rank), metrics=metrics(),
                                                       process_group=pair, progress=False)))
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
        if rank == 2:  # no collective with the pair: wait for its results (or its timeout) by their files
            deadline = time.monotonic() + 4 * TIMEOUT.total_seconds()
            while time.monotonic() < deadline and not all(os.path.exists(os.path.join(out, f"rank{r}.pt")) for r in (0, 1)):
                time.sleep(0.2)
    finally:
        dist.destroy_process_group()


def _spawn(fn, args, nprocs: int, limit: float) -> None:
    """``mp.spawn`` with a deadline: processes still running after ``limit`` seconds are killed and the test fails."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the processes did not finish in {limit} s")


def single(batches) -> dict:
    """One process, torch.distributed not initialized, over these batches."""
    return values(eg.diagnose(make_model(), batches, metrics=metrics(), progress=False))


def compare(got, ref: dict, what: str, problems: list) -> None:
    if not isinstance(got, dict):
        problems.append(f"{what}: {got}")
        return
    for name, modes in ref.items():
        for mode, value in modes.items():
            if got[name][mode] != pytest.approx(value, rel=1e-5, abs=1e-7):
                problems.append(f"{what}: {name} {mode} {got[name][mode]:.6g}, one process {value:.6g}")


def test_torchmetrics_are_reduced_over_exactly_the_process_group(tmp_path):
    _spawn(_worker, (free_port(), str(tmp_path)), WORLD, limit=150)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    union = [b for r in range(WORLD) for b in rank_batches(r)]
    ref_all = single(union)
    # an independent reference for E: a fresh torchmetrics object on the model's outputs over the union
    model = make_model().eval()
    with torch.no_grad():
        out = model(torch.cat([x for x, _ in union]))
    y = torch.cat([t for _, t in union])
    assert ref_all["auroc"]["E"] == pytest.approx(float(MulticlassAUROC(num_classes=3, thresholds=None)(out, y)), rel=1e-6)
    assert ref_all["tm_acc"]["E"] == pytest.approx(float(MulticlassAccuracy(num_classes=3, average="micro")(out, y)), rel=1e-6)
    problems: list[str] = []
    for r in range(WORLD):
        # the default group: the union everywhere, torchmetrics objects built with another group included
        d = got[r]["default"]
        compare(d if not isinstance(d, dict) else d["values"], ref_all, f"rank {r}, default group", problems)
        if isinstance(d, dict):
            v = d["values"]
            if any(v[k][mode] != pytest.approx(v["acc"][mode], rel=1e-6) for k in ("world_tm", "tm_acc") for mode in v["acc"]):
                problems.append(f"rank {r}, default group: {d['values']}")
            if not d["unchanged"]:
                problems.append(f"rank {r}, default group: the user's torchmetrics objects changed")
            t = d["training"]
            if t["tm_acc"] != pytest.approx(t["acc"], rel=1e-6) or t["auroc"] != pytest.approx(ref_all["auroc"]["Td"], rel=1e-5):
                problems.append(f"rank {r}, training_metrics {t}, one process's Td {ref_all['auroc']['Td']}")
        f = got[r]["failing"]
        if not (isinstance(f, dict) and "not one number" in f["error"] and f["unchanged"]):
            problems.append(f"rank {r}, a failing metric: {f}")
        # a group of one: the rank's own data, no exchange
        compare(got[r]["alone"], single(rank_batches(r)), f"rank {r}, a group of one", problems)
    # a subgroup of 2 of 3: the pair's union on both, rank 2 not waited on
    ref_pair = single(rank_batches(0) + rank_batches(1))
    for r in (0, 1):
        compare(got[r]["pair"], ref_pair, f"rank {r}, subgroup [0, 1] of 3", problems)
    assert not problems, "\n".join(problems)
