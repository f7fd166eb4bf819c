"""Cost of evalgap.keras.recalibrate relative to a plain training-mode forward pass, per backend.

For each Keras backend (each in its own process): ``keras.applications.ResNet50``
(weights=None), K batches; the time of ``recalibrate`` over the K batches divided by the
time of a compiled training-mode forward pass over the same batches (``jax.jit`` of
``stateless_call(training=True)``, ``tf.function`` of ``model(x, training=True)``, eager
``model(x, training=True)`` under ``torch.no_grad()`` on torch), median of R runs after
warm-up, interleaved. The first recalibration's extra time (tracing/compilation) is
reported separately.

    python bench/recalibrate_keras.py [--backends tensorflow,jax,torch] [--batches 4] [--batch-size 16] [--image-size 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(args) -> dict:
    import keras
    import numpy as np

    import evalgap.keras as eg

    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(args.image_size, args.image_size, 3), classes=21)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype("float32") for _ in range(args.batches)]
    xs = batches
    if backend == "jax":
        import jax

        fwd = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=True)[0])

        def baseline():
            tv = [v.value for v in model.trainable_variables]
            ntv = [v.value for v in model.non_trainable_variables]
            out = [fwd(tv, ntv, x) for x in xs]
            jax.block_until_ready(out)

    elif backend == "tensorflow":
        import tensorflow as tf

        xs = [tf.constant(x) for x in batches]
        fwd = tf.function(lambda x: model(x, training=True))

        def baseline():
            for x in xs:
                fwd(x)

    else:
        import torch

        xs = [torch.from_numpy(x) for x in batches]

        def baseline():
            with torch.no_grad():
                for x in xs:
                    model(x, training=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the GPU's queue, as recalibrate's read-back waits for it

    saved = [(v, v.numpy()) for v in model.non_trainable_variables]

    def ours():
        eg.recalibrate(model, xs, progress=False)

    t = time.perf_counter()
    ours()
    first_ours = time.perf_counter() - t
    t = time.perf_counter()
    baseline()
    first_base = time.perf_counter() - t
    times = {"baseline": [], "ours": []}
    for _ in range(args.runs):
        for name, fn in (("baseline", baseline), ("ours", ours)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    for v, value in saved:
        v.assign(value)
    base, mine = statistics.median(times["baseline"]), statistics.median(times["ours"])
    return {
        "backend": backend,
        "baseline_s": base,
        "recalibrate_s": mine,
        "ratio": mine / base,
        "first_call_extra_s": first_ours - mine,
        "baseline_first_call_extra_s": first_base - base,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="tensorflow,jax,torch")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    print(f"ResNet50 (weights=None), {args.batches} batches of {args.batch_size}x{args.image_size}x{args.image_size}x3, "
          f"median of {args.runs} runs")
    print(f"{'backend':12s} {'forward s':>10s} {'recalib. s':>10s} {'ratio':>7s} {'compile s (ours / fwd)':>24s}")
    results = []
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        cmd = [sys.executable, __file__, "--child", "--batches", str(args.batches), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--runs", str(args.runs)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{backend:12s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            results.append({"backend": backend, "failed": (out.stderr.strip().splitlines() or [str(out.returncode)])[-1]})
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append({"backend": backend, **r})
        print(f"{backend:12s} {r['baseline_s']:10.3f} {r['recalibrate_s']:10.3f} {r['ratio']:6.3f}x "
              f"{r['first_call_extra_s']:11.1f} / {r['baseline_first_call_extra_s']:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"framework": "keras", "setting": f"ResNet50, {args.batches} batches of {args.batch_size}x{args.image_size}x{args.image_size}x3",
                       "runs": args.runs, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
