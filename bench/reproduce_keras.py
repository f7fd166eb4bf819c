"""The seed's job (`evalgap reproduce`, variant `seed`) against a plain model.fit, side by side.

One Keras backend per process (KERAS_BACKEND). Same ResNet50(weights=None), same uint8 arrays,
same batch size. Per run: the mean epoch time after the first (compiling) epoch, its images per
second (training images / epoch time) and the ratio to plain fit (the whole run's cost), for
reproduce without the precise_val_* side measurement, at the default schedule (after epochs 1-7,
10, 20, 50 and the last), every epoch, every epoch with statistics from 768 images, and every
second epoch. Each epoch's time is kept in the JSON (``epochs_seconds``). Whole runs follow each other, so the machine's drift between them shows in their
ratios; each run also times its own measurements inside their epochs (``precise_seconds``), which
gives, paired within the run, the cost of one measurement and the ratio it projects for a
``--project``-epoch job on each schedule (a CPU bench runs far fewer epochs than the job's 50).

    KERAS_BACKEND=tensorflow python bench/reproduce_keras.py [--images 768] [--image-size 64] [--epochs 4]
        [--data DIR] [--limit-per-class N] [--settings none,seed,every1,sample768,every2] [--project 50] [--json FILE]

``--data`` reads real images (UC Merced folder or zip) instead of random ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import keras
import numpy as np

from evalgap.seed.common import DEFAULT_PRECISE_SAMPLES, PRECISE_SCHEDULE, precise_epochs
from evalgap.seed.reproduce import VARIANTS, build_model, run_variant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=768, help="random images (without --data)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--data", default=None, help="a UC Merced folder or zip instead of random images")
    p.add_argument("--limit-per-class", type=int, default=None)
    p.add_argument("--settings", default="none,seed,every1,sample768,every2",
                   help="reproduce settings to time: none (precise-every 0), seed (the default schedule), every1, "
                        "sample768 (every epoch, precise-samples 768), every2; 'default' is an alias of seed")
    p.add_argument("--project", type=int, default=50, help="epochs of the job the measured cost is projected to (default 50)")
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
    later = times.t[1:] or times.t
    base = statistics.mean(later)
    rows = [{"run": "plain model.fit", "epoch_seconds": base, "ratio": 1.0, "median_epoch_seconds": statistics.median(later),
             "epochs_seconds": times.t}]
    print(f"plain model.fit: {base:.2f} s per epoch (epochs: {', '.join(f'{t:.1f}' for t in times.t)})", flush=True)  # each run as it ends: a killed bench keeps what it measured
    settings = {"none": ("precise-every 0", 0, None),
                "seed": (f"precise-every {PRECISE_SCHEDULE} (default)", PRECISE_SCHEDULE, DEFAULT_PRECISE_SAMPLES),
                "every1": ("precise-every 1", 1, DEFAULT_PRECISE_SAMPLES),
                "sample768": ("precise-every 1, precise-samples 768", 1, 768),
                "every2": ("precise-every 2", 2, DEFAULT_PRECISE_SAMPLES)}
    for key in filter(None, args.settings.split(",")):
        label, every, samples = settings["seed" if key == "default" else key]
        logs = run_variant(VARIANTS["seed"], x, y, classes, args.epochs, precise_every=every, precise_samples=samples)
        secs = [r["seconds"] for r in logs[1:]] or [logs[0]["seconds"]]
        row = {"run": f"evalgap reproduce seed ({label})", "epoch_seconds": statistics.mean(secs), "ratio": statistics.mean(secs) / base,
               "median_epoch_seconds": statistics.median(secs), "epochs_seconds": [r["seconds"] for r in logs],
               "epochs_precise_seconds": [r.get("precise_seconds", 0.0) for r in logs]}
        measured = [r["precise_seconds"] for r in logs[1:] if "precise_seconds" in r]
        if measured:  # paired within this run: each epoch's own fit time and measurement time
            cost = statistics.median(measured)
            fit_part = statistics.median(r["seconds"] - r.get("precise_seconds", 0.0) for r in logs[1:])
            planned = len(precise_epochs(args.project, every))
            row.update(measurement_seconds=cost, fit_epoch_seconds=fit_part, projected_epochs=args.project,
                       projected_measurements=planned, projected_ratio=1 + planned * cost / (args.project * fit_part))
        rows.append(row)
        print(f"{row['run']}: {row['epoch_seconds']:.2f} s per epoch, {row['ratio']:.3f}x plain fit"
              + (f", projected {row['projected_ratio']:.3f}x over {args.project} epochs" if "projected_ratio" in row else ""), flush=True)
    print(f"backend {keras.backend.backend()}, ResNet50, {what} at {args.image_size}x{args.image_size}, batch 96, validation = training data, "
          f"{args.epochs} epochs; epoch time: mean after the first")
    print(f"{'run':60s} {'epoch s':>8s} {'images/s':>9s} {'ratio':>6s} {'1 measurement s':>16s} {f'ratio over {args.project} epochs':>22s}")
    results = []
    for row in rows:
        t = row["epoch_seconds"]
        results.append({**row, "images_per_second": len(x) / t})
        extra = (f" {row['measurement_seconds']:16.2f} {row['projected_ratio']:9.3f}x ({row['projected_measurements']} measured)"
                 if "projected_ratio" in row else "")
        print(f"{row['run']:60s} {t:8.2f} {len(x) / t:9.1f} {row['ratio']:5.2f}x{extra}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"framework": f"keras/{keras.backend.backend()}", "setting": f"ResNet50, {what} at {args.image_size}x{args.image_size}, batch 96",
                       "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
