"""The seed's job (`evalgap reproduce`, variant `seed`) against a plain model.fit, side by side.

One Keras backend per process (KERAS_BACKEND). Same ResNet50(weights=None), same uint8 arrays,
same batch size; prints the median epoch time of each (after the first, compiling epoch), its
images per second (training images / epoch time) and the ratio to plain fit, without the
precise_val_* side measurement, with it at the default (statistics of all the images), with
its statistics from a sample of 768 images, and every second epoch.

    KERAS_BACKEND=tensorflow python bench/reproduce_keras.py [--images 768] [--image-size 64] [--epochs 4]
        [--data DIR] [--limit-per-class N] [--json FILE]

``--data`` reads real images (UC Merced folder or zip) instead of random ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import keras
import numpy as np

from evalgap.seed.common import DEFAULT_PRECISE_SAMPLES
from evalgap.seed.reproduce import VARIANTS, build_model, run_variant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=768, help="random images (without --data)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--data", default=None, help="a UC Merced folder or zip instead of random images")
    p.add_argument("--limit-per-class", type=int, default=None)
    p.add_argument("--settings", default="none,default,sample768,every2",
                   help="which reproduce settings to time: none (precise-every 0), default, sample768 (precise-samples 768), every2")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    if args.data:
        from evalgap.data import load_image_folder

        s = load_image_folder(args.data, args.image_size, limit_per_class=args.limit_per_class)
        x, y, what = s.images, s.labels, f"{len(s.images)} images from {args.data}"
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8)
        y = rng.integers(0, 21, args.images)
        what = f"{args.images} random uint8 images"
    classes = int(y.max()) + 1

    class Times(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.t = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.t.append(time.perf_counter() - self.start)

    keras.utils.set_random_seed(0)
    plain = build_model(classes, args.image_size, None, "raw")
    times = Times()
    plain.fit(x, y, batch_size=96, epochs=args.epochs, validation_data=(x, y), verbose=0, callbacks=[times], shuffle=True)
    base = statistics.median(times.t[1:] or times.t)
    rows = [("plain model.fit", base)]
    settings = {"none": ("precise-every 0", 0, None),
                "default": (f"precise-every 1, precise-samples {DEFAULT_PRECISE_SAMPLES} (default)", 1, DEFAULT_PRECISE_SAMPLES),
                "sample768": ("precise-every 1, precise-samples 768", 1, 768),
                "every2": ("precise-every 2", 2, DEFAULT_PRECISE_SAMPLES)}
    for key in filter(None, args.settings.split(",")):
        label, every, samples = settings[key]
        logs = run_variant(VARIANTS["seed"], x, y, classes, args.epochs, precise_every=every, precise_samples=samples)
        secs = [r["seconds"] for r in logs]
        rows.append((f"evalgap reproduce seed ({label})", statistics.median(secs[1:] or secs) if every < 2 else statistics.mean(secs[1:] or secs)))
    print(f"backend {keras.backend.backend()}, ResNet50, {what} at {args.image_size}x{args.image_size}, batch 96, validation = training data, "
          f"epoch time after the first (median; mean for every 2)")
    print(f"{'run':72s} {'epoch s':>8s} {'images/s':>9s} {'ratio':>6s}")
    results = []
    for name, t in rows:
        results.append({"run": name, "epoch_seconds": t, "images_per_second": len(x) / t, "ratio": t / base})
        print(f"{name:72s} {t:8.2f} {len(x) / t:9.1f} {t / base:5.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"framework": f"keras/{keras.backend.backend()}", "setting": f"ResNet50, {what} at {args.image_size}x{args.image_size}, batch 96",
                       "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
