"""Cost of evalgap.torch.recalibrate relative to a plain training-mode forward pass.

For each method, the time over the same K batches divided by the time of a training-mode
forward pass (``model.train()`` under ``torch.no_grad()``) over those batches, measured
side by side in this process, interleaved in a new random order each run: the ratio of the medians
of R runs, of the minimums, and the median of each run's own ratio (paired, which cancels the
machine's drift between runs). Methods: evalgap, fvcore's
``update_bn_stats`` and ``torch.optim.swa_utils.update_bn`` (when installed).

    python bench/recalibrate_torch.py [--model resnet50|mobilenet_v2] [--batches 4] [--batch-size 16]
        [--image-size 128] [--runs 5] [--device cpu] [--channels-last] [--autocast bf16] [--json FILE]

``--autocast bf16`` runs every method (the baseline too) under ``torch.autocast`` with bfloat16.

``--clock thread`` (CPU only) times each method by the CPU time of this thread
(``time.thread_time``) with torch on one thread: all of the work then runs in this thread, and
the time other processes take from a shared machine is not counted, so differences of a fraction
of a percent show through the noise that wall-clock ratios carry there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _torch_mobilenet import mobilenet_v2  # noqa: E402
from _torch_resnet import resnet50  # noqa: E402

import evalgap.torch as eg  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--model", choices=["resnet50", "mobilenet_v2"], default="resnet50")
    p.add_argument("--autocast", choices=["bf16"], default=None, help="run every method under torch.autocast(bfloat16)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall: time.perf_counter; thread: this thread's CPU time, torch on one thread (CPU only)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.clock == "thread":
        if device.type != "cpu":
            p.error("--clock thread measures CPU work of this thread: use it with --device cpu")
        torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.manual_seed(0)
    model = {"resnet50": resnet50, "mobilenet_v2": mobilenet_v2}[args.model]().to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    batches = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt) * 50 + 120 for _ in range(args.batches)]

    def forward_train():
        m = model.train()
        with torch.no_grad():
            for x in batches:
                m(x)

    def ours():
        eg.recalibrate(model, batches, progress=False)

    methods = {"training-mode forward (baseline)": forward_train, "evalgap.torch.recalibrate": ours}
    try:
        from fvcore.nn.precise_bn import update_bn_stats

        def fvcore_run():
            m = model.train()
            update_bn_stats(m, batches, num_iters=len(batches))

        methods["fvcore update_bn_stats"] = fvcore_run
    except ImportError:
        pass

    def swa_run():
        torch.optim.swa_utils.update_bn(batches, model, device=None)

    methods["torch swa_utils.update_bn"] = swa_run

    def precision():
        if args.autocast:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    snapshot = copy.deepcopy(model.state_dict())
    with precision():
        for fn in methods.values():  # warm-up
            fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    order = random.Random(0)
    for _ in range(args.runs):
        for name, fn in order.sample(list(methods.items()), len(methods)):  # a new order each run: no method always goes first
            model.load_state_dict(snapshot)
            sync(device)
            t = clock()
            with precision():
                fn()
            sync(device)
            times[name].append(clock() - t)
    base = statistics.median(times["training-mode forward (baseline)"])
    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    setting = (f"{args.model}, {args.batches} batches of {args.batch_size}x3x{args.image_size}x{args.image_size}"
               f"{', channels-last' if args.channels_last else ''}{', autocast bf16' if args.autocast else ', fp32'}")
    print(f"{setting}, device {device} ({where}, {torch.get_num_threads()} threads), torch {torch.__version__}, {args.runs} runs, {args.clock} clock: "
          "ratio of medians, of minimums, and the median of each run's own ratio (paired)")
    print(f"{'method':36s} {'seconds':>9s} {'ratio':>7s} {'min':>8s} {'paired':>8s}")
    results = []
    baseline = times["training-mode forward (baseline)"]
    for name, ts in times.items():
        med = statistics.median(ts)
        low = min(ts) / min(baseline)
        paired = statistics.median(t / b for t, b in zip(ts, baseline))
        results.append({"method": name, "seconds": med, "ratio": med / base, "ratio_min": low, "ratio_paired": paired})
        print(f"{name:36s} {med:9.3f} {med / base:7.3f}x {low:7.3f}x {paired:7.3f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"framework": "torch", "setting": setting, "device": where, "torch": torch.__version__, "runs": args.runs, "clock": args.clock,
                       "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
