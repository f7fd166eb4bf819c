"""Keras on the torch backend: recalibration with the layer moments from ``torch.batch_norm_update_stats``
(what evalgap uses) against ``torch.var_mean`` (what it used before), paired in one process.

Each run times a training-mode forward over the batches (the baseline) and one recalibration with
each moments function, in a new random order; medians and the ratio of the minimums are printed.

    python bench/keras_torch_moments_ab.py [--runs 9] [--batch-size 16] [--image-size 64] [--batches 4]
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import evalgap.keras as eg  # noqa: E402
import evalgap.keras.moments as moments  # noqa: E402


def var_mean_moments(inputs, reduction_axes):
    """The moments as evalgap took them before: ``torch.var_mean`` over the reduction axes."""
    x = inputs if inputs.dtype in (torch.float32, torch.float64) else inputs.float()
    var, mean = torch.var_mean(x, dim=tuple(reduction_axes), correction=0)
    return mean, var


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args()
    s = args.image_size
    model = keras.applications.ResNet50(weights=None, input_shape=(s, s, 3), classes=10)
    x = np.random.default_rng(0).random((args.batches * args.batch_size, s, s, 3)).astype("float32") * 255
    batches = [x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    kernels = {"batch_norm_update_stats": moments._torch_moments, "var_mean": var_mean_moments}

    def forward():
        with torch.no_grad():
            for b in batches:
                model(b, training=True)

    def recalibrate(kernel):
        moments._torch_moments = kernels[kernel]
        try:
            eg.recalibrate(model, batches, progress=False)
        finally:
            moments._torch_moments = kernels["batch_norm_update_stats"]

    recalibrate("var_mean"), recalibrate("batch_norm_update_stats"), forward()  # warm-up
    times: dict[str, list[float]] = {"forward": [], **{k: [] for k in kernels}}
    for run in range(args.runs):
        for name in np.random.default_rng(run).permutation(list(times)):
            t = time.perf_counter()
            forward() if name == "forward" else recalibrate(name)
            times[name].append(time.perf_counter() - t)
    base, base_min = statistics.median(times["forward"]), min(times["forward"])
    print(f"ResNet50 (weights=None), {args.batches} batches of {args.batch_size}x{s}x{s}x3, torch backend, {args.runs} runs")
    print(f"{'method':>26s} {'median s':>9s} {'ratio':>7s} {'min ratio':>9s}")
    for name, values in times.items():
        print(f"{name:>26s} {statistics.median(values):9.3f} {statistics.median(values) / base:6.3f}x {min(values) / base_min:8.3f}x")


if __name__ == "__main__":
    main()
