"""Cost of evalgap.flax.recalibrate relative to a jitted training-mode forward pass over the same batches.

A ResNet-18 (basic blocks, BatchNorm after every convolution, channels last) in Flax NNX and
in Linen, K batches of random 0..255 images. Baseline: the jit-compiled training-mode forward
a training step runs (NNX: ``nnx.split`` once, ``jax.jit`` of ``nnx.merge(graphdef, state)(x)``
in ``model.train()`` mode returning the output and the updated state; Linen: ``jax.jit`` of
``module.apply(variables, x, train=True, mutable=["batch_stats"])``), over the same batches,
until the results are ready. Ours: ``evalgap.flax.recalibrate(model, batches)`` (statistics
fetched, merged in float64 and written). R interleaved pairs of runs (baseline, then ours)
after one warm-up run each; the ratio is the median of the R pairs' ratios (a pair runs back to
back, so load from other processes disturbs it less), the seconds are medians (compilation is
reported separately, as the first call's extra time). "fwd again" is the same ratio for the
baseline run a second time in each pair: how far from 1.000x noise alone moves a ratio. ``--clock cpu``
times with the process's CPU time instead of the wall clock: on a shared CPU machine other
processes then disturb the ratio less (on a GPU use the wall clock).

    python bench/recalibrate_flax.py [--batches 4] [--batch-size 16] [--image-size 64] [--runs 7] [--kinds nnx,linen] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import evalgap.flax as eg  # noqa: E402

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


class Block(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.b1 = nnx.BatchNorm(cout, rngs=rngs)
        self.c2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.b2 = nnx.BatchNorm(cout, rngs=rngs)
        self.skip = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs) if stride != 1 or cin != cout else None
        self.bs = nnx.BatchNorm(cout, rngs=rngs) if self.skip is not None else None

    def __call__(self, x):
        y = nnx.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return nnx.relu(y + (self.bs(self.skip(x)) if self.skip is not None else x))


class ResNet18(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, classes: int = 21):
        self.stem = nnx.Conv(3, 64, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        blocks, cin = [], 64
        for cout, stride in STAGES:
            blocks += [Block(cin, cout, stride, rngs), Block(cout, cout, 1, rngs)]
            cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(512, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((1, 2)))


class LinenBlock(nn.Module):
    cout: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
        y = nn.relu(norm()(nn.Conv(self.cout, (3, 3), strides=self.stride, use_bias=False)(x)))
        y = norm()(nn.Conv(self.cout, (3, 3), use_bias=False)(y))
        if self.stride != 1 or x.shape[-1] != self.cout:
            x = norm()(nn.Conv(self.cout, (1, 1), strides=self.stride, use_bias=False)(x))
        return nn.relu(y + x)


class LinenResNet18(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(64, (3, 3), use_bias=False)(x)))
        for cout, stride in STAGES:
            x = LinenBlock(cout, 1)(LinenBlock(cout, stride)(x, train), train)
        return nn.Dense(21)(x.mean((1, 2)))


def nnx_case(xs):
    model = nnx.jit(lambda: ResNet18(nnx.Rngs(0)))()
    model.train()
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), nnx.state(m, nnx.BatchStat)  # the output and the updated statistics

    def baseline():
        jax.block_until_ready([fwd(state, x) for x in xs])

    saved = nnx.clone(nnx.state(model))

    def ours():
        eg.recalibrate(model, xs, progress=False)

    return baseline, ours, lambda: nnx.update(model, saved)


def linen_case(xs):
    module = LinenResNet18()
    variables = jax.jit(module.init)(jax.random.key(0), xs[0])
    fwd = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))

    def baseline():
        jax.block_until_ready([fwd(variables, x) for x in xs])

    def ours():
        eg.recalibrate((module, variables), xs, progress=False)

    return baseline, ours, lambda: None


def measure(kind: str, xs, runs: int, clock=time.perf_counter) -> dict:
    baseline, ours, restore = (nnx_case if kind == "nnx" else linen_case)(xs)
    first = {}
    for name, fn in (("ours", ours), ("baseline", baseline)):
        t = clock()
        fn()
        first[name] = clock() - t
    times: dict[str, list[float]] = {"baseline": [], "again": [], "ours": []}
    for _ in range(runs):
        for name, fn in (("baseline", baseline), ("again", baseline), ("ours", ours)):
            t = clock()
            fn()
            times[name].append(clock() - t)
    restore()
    base, mine = statistics.median(times["baseline"]), statistics.median(times["ours"])
    ratio = statistics.median(o / b for o, b in zip(times["ours"], times["baseline"]))
    noise = statistics.median(a / b for a, b in zip(times["again"], times["baseline"]))
    return {"kind": kind, "baseline_s": base, "recalibrate_s": mine, "ratio": ratio, "noise": noise,
            "compile_ours_s": first["ours"] - mine, "compile_base_s": first["baseline"] - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="nnx,linen")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32))
          for _ in range(args.batches)]
    print(f"ResNet-18, {args.batches} batches of {args.batch_size}x{args.image_size}x{args.image_size}x3, {args.runs} "
          f"paired runs ({args.clock} clock), {jax.devices()[0].platform}, jax {jax.__version__}")
    print("| model | forward s | recalibrate s | ratio | fwd again | compile s (ours / fwd) |\n|---|---:|---:|---:|---:|---|")
    results = []
    for kind in args.kinds.split(","):
        r = measure(kind, xs, args.runs, clock)
        results.append(r)
        print(f"| {kind} | {r['baseline_s']:.3f} | {r['recalibrate_s']:.3f} | {r['ratio']:.3f}x | {r['noise']:.3f}x | "
              f"{r['compile_ours_s']:.1f} / {r['compile_base_s']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"framework": "flax", "setting": f"ResNet-18, {args.batches} batches of {args.batch_size}x{args.image_size}x{args.image_size}x3",
                       "device": jax.devices()[0].device_kind, "runs": args.runs, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
