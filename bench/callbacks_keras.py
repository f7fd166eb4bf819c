"""Overhead of PreciseBN and GapMonitor on model.fit beyond their own forward passes.

One Keras backend per process (KERAS_BACKEND). The small demo ResNet on the embedded digits
(1680 images, batch 120, 32x32): fit for E epochs without callbacks, with PreciseBN, with
GapMonitor (interleaved, median of R runs); the callbacks' own passes are timed standalone
(recalibrate over the data; diagnose over the probe), and

    overhead = (fit_with - fit_without - E * own_pass) / fit_without

    KERAS_BACKEND=jax python bench/callbacks_keras.py [--epochs 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np

import evalgap.keras as eg
from evalgap.data import load_digits_rgb
from evalgap.seed.keras_models import small_resnet


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    x, y = load_digits_rgb(32)
    order = np.random.default_rng(0).permutation(len(x))[:1680]
    x, y = x[order].astype("float32"), y[order]
    keras.utils.set_random_seed(0)
    model = small_resnet((32, 32, 3), 10)
    weights = model.get_weights()

    def fit(callbacks):
        model.set_weights(weights)
        t = time.perf_counter()
        model.fit(x, y, batch_size=120, epochs=args.epochs, verbose=0, callbacks=callbacks)
        return time.perf_counter() - t

    cases = {
        "none": lambda: [],
        "PreciseBN": lambda: [eg.PreciseBN((x, y), batch_size=120, verbose=0)],
        "GapMonitor": lambda: [eg.GapMonitor((x, y), batch_size=120, verbose=0)],
    }
    for make in cases.values():  # warm-up: compile everything once
        fit(make())
    times = {k: [] for k in cases}
    for _ in range(args.runs):
        for name, make in cases.items():
            times[name].append(fit(make()))
    own = {}
    t = time.perf_counter()
    for _ in range(3):
        eg.recalibrate(model, (x, y), batch_size=120, progress=False)
    own["PreciseBN"] = (time.perf_counter() - t) / 3
    probe = [(x[:120], y[:120]), (x[120:240], y[120:240])]
    t = time.perf_counter()
    for _ in range(3):
        eg.diagnose(model, list(probe), progress=False)
    own["GapMonitor"] = (time.perf_counter() - t) / 3
    base = statistics.median(times["none"])
    print(f"backend {keras.backend.backend()}, {args.epochs} epochs of 14 steps, median of {args.runs} runs; fit alone {base:.2f} s")
    print(f"{'callback':12s} {'fit s':>7s} {'own passes s':>13s} {'overhead beyond own passes':>28s}")
    for name in ("PreciseBN", "GapMonitor"):
        with_cb = statistics.median(times[name])
        passes = args.epochs * own[name]
        print(f"{name:12s} {with_cb:7.2f} {passes:13.2f} {100 * (with_cb - base - passes) / base:+27.1f}%")


if __name__ == "__main__":
    main()
