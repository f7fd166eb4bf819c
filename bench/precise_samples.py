"""How many images ``precise_val_*``'s statistics need: ``--precise-samples`` against all the data.

Trains the seed's job (variant ``seed``: ResNet50(weights=None), batch 96, raw pixels, Adam,
validation data = training data) on the real UC Merced images, and after every epoch measures
``precise_val_accuracy`` with statistics from a class-stratified sample of N images for each N
(``evalgap.seed.common.precise_subsample``) and from all of them, always evaluated on all the
images, restoring the moving statistics after each. Prints, per N, the largest distance in
points from the all-images value over the epochs, and the cost of each measurement relative to
the epoch of plain ``fit`` (one backend per process: KERAS_BACKEND).

    KERAS_BACKEND=tensorflow python bench/precise_samples.py [--data DIR] [--image-size 64] [--epochs 6]
        [--samples 96,192,384,576,768,1152] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import keras

from evalgap.data import load_image_folder
from evalgap.seed.common import precise_subsample, whole_batches
from evalgap.seed.keras_callbacks import PreciseValidation
from evalgap.seed.reproduce import build_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "uc_merced" / "UCMerced_LandUse"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--limit-per-class", type=int, default=None)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--samples", default="96,192,384,576,768,1152", help="rounded up to whole batches of 96, as reproduce does")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not Path(args.data).exists():
        raise SystemExit(f"UC Merced images not found at {args.data}: pass --data (../shared/data/uc_merced/UCMerced_LandUse).")
    s = load_image_folder(args.data, args.image_size, limit_per_class=args.limit_per_class)
    x, y = s.images, s.labels
    sizes = [whole_batches(int(n), 96, len(y)) for n in args.samples.split(",")] + [0]
    keras.utils.set_random_seed(0)
    model = build_model(int(y.max()) + 1, args.image_size, None, "raw")
    rows: list[dict] = []

    class Measure(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "fit_seconds": time.perf_counter() - self.t, "accuracy": float(logs["accuracy"]),
                   "val_accuracy": float(logs["val_accuracy"])}
            for n in sizes:
                pick = precise_subsample(y, n, 0)
                cb = PreciseValidation((x[pick], y[pick]), (x, y), batch_size=96)
                cb.set_model(self.model)
                out: dict = {}
                t = time.perf_counter()
                cb.on_epoch_end(epoch, out)
                row[f"acc_{n or 'all'}"] = out["precise_val_accuracy"]
                row[f"seconds_{n or 'all'}"] = time.perf_counter() - t
            rows.append(row)
            print(json.dumps(row), flush=True)

    model.fit(x, y, batch_size=96, epochs=args.epochs, validation_data=(x, y), verbose=0, shuffle=True, callbacks=[Measure()])
    fit = statistics.median(r["fit_seconds"] for r in rows[1:] or rows)
    print(f"\n{keras.backend.backend()}, {len(x)} real UC Merced images at {args.image_size}x{args.image_size}, {args.epochs} epochs; "
          f"plain fit epoch {fit:.1f} s (median after the first)")
    print(f"{'statistics from':>16s} {'max |diff| (points)':>20s} {'measurement s':>14s} {'fit + measurement':>18s}")
    summary = []
    for n in sizes:
        key = n or "all"
        diff = max(abs(r[f"acc_{key}"] - r["acc_all"]) for r in rows) * 100
        sec = statistics.median(r[f"seconds_{key}"] for r in rows[1:] or rows)
        summary.append({"samples": key, "max_diff_points": diff, "seconds": sec, "ratio": (fit + sec) / fit})
        print(f"{str(key):>16s} {diff:20.2f} {sec:14.2f} {(fit + sec) / fit:17.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"backend": keras.backend.backend(), "images": len(x), "image_size": args.image_size,
                                               "epochs": rows, "summary": summary, "fit_epoch_seconds": fit}, indent=2))


if __name__ == "__main__":
    main()
