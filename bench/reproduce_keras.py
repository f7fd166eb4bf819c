"""The seed's job (`evalgap reproduce`, variant `seed`) against a plain model.fit, side by side.

One Keras backend per process (KERAS_BACKEND). Same ResNet50(weights=None), same uint8 arrays,
same batch size; prints the median epoch time of each (after the first, compiling epoch) and
their ratio, with and without the precise_val_* side measurement.

    KERAS_BACKEND=tensorflow python bench/reproduce_keras.py [--images 192] [--image-size 64] [--epochs 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np

from evalgap.seed.reproduce import VARIANTS, build_model, run_variant


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8)
    y = rng.integers(0, 21, args.images)

    class Times(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.t = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.t.append(time.perf_counter() - self.start)

    keras.utils.set_random_seed(0)
    plain = build_model(21, args.image_size, None, "raw")
    times = Times()
    plain.fit(x, y, batch_size=96, epochs=args.epochs, validation_data=(x, y), verbose=0, callbacks=[times])
    base = statistics.median(times.t[1:])
    rows = [("plain model.fit", base)]
    for every in (0, 1):
        logs = run_variant(VARIANTS["seed"], x, y, 21, args.epochs, precise_every=every)
        rows.append((f"evalgap reproduce seed (precise-every {every})", statistics.median(r["seconds"] for r in logs[1:])))
    print(f"backend {keras.backend.backend()}, ResNet50, {args.images} images {args.image_size}x{args.image_size}, batch 96, "
          f"median epoch time after the first")
    for name, t in rows:
        print(f"{name:45s} {t:7.2f} s  {t / base:5.2f}x")


if __name__ == "__main__":
    main()
