"""Where evalgap.torch.recalibrate's time goes beyond a training-mode forward, phase by phase.

On the H200 (2026-11-28) recalibrate cost a fixed 6-8 ms per call above a training-mode
forward (8.3 ms over 8 batches of ResNet50, 6.3 ms over 32): this says where. Each adapter step
of one call is timed on the host clock without adding a synchronization (``prepare`` and
``layers``, ``read``, entering the pass, each batch's dispatch, the flush, which waits for the
GPU's queue, ``write``, leaving the pass), against a training-mode forward over the same batches
(dispatch, then the wait). On CUDA it also counts the host-device synchronizations of one call
(``torch.cuda.set_sync_debug_mode``), each with the Python line that made the synchronizing call
(evalgap's, or torch's own where the call is inside torch).

    python bench/gpu_profile.py [--batches 8] [--batch-size 64] [--image-size 224] [--runs 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _torch_resnet import resnet50  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap.torch.adapter import TorchAdapter  # noqa: E402

PHASES = ("prepare", "layers", "read", "moments_pass", "host_captures", "write")
#: What one call's time is split into (moments_pass itself only builds the pass: "enter" is its setup).
STEPS = ("prepare", "layers", "read", "moments_pass", "enter", "batches", "host_captures", "exit", "write")


@contextlib.contextmanager
def timed_adapter(times: dict[str, float]):
    """Add each adapter step's host time to ``times`` (the pass's enter and exit, and every batch's run, apart)."""
    saved = {name: getattr(TorchAdapter, name) for name in PHASES}

    def wrap(name, fn):
        def timed(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                out = fn(self, *args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t
            return _TimedPass(out, times) if name == "moments_pass" else out

        return timed

    for name, fn in saved.items():
        setattr(TorchAdapter, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(TorchAdapter, name, fn)


class _TimedPass:
    def __init__(self, inner, times):
        self.inner, self.times = inner, times

    def __enter__(self):
        t = time.perf_counter()
        run = self.inner.__enter__()
        self.times["enter"] = self.times.get("enter", 0.0) + time.perf_counter() - t

        def timed_run(batch):
            t = time.perf_counter()
            try:
                return run(batch)
            finally:
                self.times["batches"] = self.times.get("batches", 0.0) + time.perf_counter() - t

        return timed_run

    def __exit__(self, *exc):
        t = time.perf_counter()
        try:
            return self.inner.__exit__(*exc)
        finally:
            self.times["exit"] = self.times.get("exit", 0.0) + time.perf_counter() - t


def sync_sites(model, batches) -> dict[str, int]:
    """The host-device synchronizations of one recalibrate call, by the evalgap line that caused them."""
    sites: collections.Counter[str] = collections.Counter()
    if not torch.cuda.is_available():
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            eg.recalibrate(model, batches, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        where = w.filename.split("site-packages/")[-1].split("/src/")[-1]  # the Python line that made the call
        sites[f"{where}:{w.lineno}"] += 1
    return dict(sites)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet50().to(device)
    batches = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device) * 50 + 120 for _ in range(args.batches)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        model.train()
        t = time.perf_counter()
        with torch.no_grad():
            for x in batches:
                model(x)
        dispatched = time.perf_counter() - t
        sync()
        return {"dispatch": dispatched, "total": time.perf_counter() - t}

    def ours():
        times: dict[str, float] = {}
        sync()
        t = time.perf_counter()
        with timed_adapter(times):
            eg.recalibrate(model, batches, progress=False)
        sync()
        times["total"] = time.perf_counter() - t
        times["outside the adapter"] = times["total"] - sum(times.get(q, 0.0) for q in STEPS)
        return times

    for _ in range(2):
        forward(), ours()
    runs = {"forward": [], "evalgap": []}
    for _ in range(args.runs):
        runs["forward"].append(forward())
        runs["evalgap"].append(ours())
    med = {k: {phase: statistics.median(r.get(phase, 0.0) for r in v) for phase in sorted({q for r in v for q in r})} for k, v in runs.items()}
    ms = {k: {phase: round(1e3 * s, 3) for phase, s in v.items()} for k, v in med.items()}
    ours_ms = ms["evalgap"]
    result = {
        "setting": f"resnet50, {args.batches} batches of {args.batch_size}x3x{args.image_size}x{args.image_size}, {device.type}",
        "torch": torch.__version__, "runs": args.runs, "ms": ms, "syncs": sync_sites(model, batches),
        "extra_ms": round(ours_ms["total"] - ms["forward"]["total"], 3),
    }
    print(f"{result['setting']}, torch {torch.__version__}, median of {args.runs} runs, host clock (ms)")
    print("training-mode forward: " + ", ".join(f"{k} {v}" for k, v in ms["forward"].items()))
    print("evalgap.torch.recalibrate: " + ", ".join(f"{k} {v}" for k, v in ours_ms.items()))
    print(f"extra over the forward: {result['extra_ms']} ms; synchronizations of one call: {result['syncs'] or 'none seen (CPU)'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
