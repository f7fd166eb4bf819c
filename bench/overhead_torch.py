"""Host overhead of a recalibration call in PyTorch: what a pass costs beyond the model's forward.

With a tiny input (default 2x3x16x16) and one thread the forward is cheap, so the time a method
adds to a training-mode forward over the same K batches is its own Python and bookkeeping work:
K = 1 gives the fixed cost per call, K = 16 adds the per-batch cost. Every method runs side by
side in this process, in a new random order each run; the minimum of R runs is reported
(overhead only ever adds time, so the minimum is its cleanest reading on a noisy machine).

    python bench/overhead_torch.py [--model mobilenet_v2|resnet50] [--batches 1,16] [--runs 41] [--clock wall|thread]
        [--json FILE]

``--clock thread`` times with this thread's CPU time (torch runs on this thread only), which other
processes on a shared machine disturb less.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _torch_mobilenet import mobilenet_v2  # noqa: E402
from _torch_resnet import resnet50  # noqa: E402

import evalgap.torch as eg  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["mobilenet_v2", "resnet50"], default="mobilenet_v2")
    p.add_argument("--batches", default="1,16", help="comma-separated numbers of batches")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--runs", type=int, default=41)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = {"resnet50": resnet50, "mobilenet_v2": mobilenet_v2}[args.model]()
    layers = len(eg.find_batchnorms(model))
    snapshot = copy.deepcopy(model.state_dict())
    try:
        from fvcore.nn.precise_bn import update_bn_stats
    except ImportError:
        update_bn_stats = None
    print(f"{args.model} ({layers} BN layers), batches of {args.batch_size}x3x{args.image_size}x{args.image_size}, 1 thread, "
          f"torch {torch.__version__}, min of {args.runs} runs, {args.clock} clock; ms added to a training-mode forward over the same batches")
    shown = ("evalgap", "fvcore", "update_bn")
    print(f"{'batches':>7s} {'forward ms':>10s} " + " ".join(f"{m:>16s}" for m in shown))
    rows = []
    for k in (int(b) for b in args.batches.split(",")):
        batches = [torch.randn(args.batch_size, 3, args.image_size, args.image_size) * 50 + 120 for _ in range(k)]

        def forward_train():
            model.train()
            with torch.no_grad():
                for x in batches:
                    model(x)

        methods = {"forward": forward_train, "evalgap": lambda: eg.recalibrate(model, batches, progress=False),
                   "update_bn": lambda: torch.optim.swa_utils.update_bn(batches, model)}
        if update_bn_stats is not None:
            methods["fvcore"] = lambda: update_bn_stats(model.train(), batches, num_iters=k)
        for fn in methods.values():  # warm-up
            model.load_state_dict(snapshot)
            fn()
        times: dict[str, list[float]] = {name: [] for name in methods}
        order = random.Random(0)
        for _ in range(args.runs):
            for name, fn in order.sample(list(methods.items()), len(methods)):
                model.load_state_dict(snapshot)
                t = clock()
                fn()
                times[name].append(clock() - t)
        base = min(times["forward"])
        extra = {name: 1e3 * (min(ts) - base) for name, ts in times.items() if name != "forward"}
        rows.append({"batches": k, "forward_ms": 1e3 * base, **{f"{n}_extra_ms": v for n, v in extra.items()}})
        print(f"{k:7d} {1e3 * base:10.2f} " + " ".join(f"{extra[m]:+16.2f}" if m in extra else f"{'-':>16s}" for m in shown))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "bn_layers": layers, "torch": torch.__version__, "runs": args.runs, "clock": args.clock, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
