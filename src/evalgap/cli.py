"""The ``evalgap`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from ._files import atomic_write
from .errors import DataError, EvalgapError


def _demo(args: argparse.Namespace) -> int:
    if args.framework == "torch":
        from .seed.demo import run_torch_demo

        return run_torch_demo(epochs=args.epochs, out=args.out)
    from .seed.demo import run_keras_demo

    return run_keras_demo(epochs=args.epochs, out=args.out)


def _batching(args: argparse.Namespace) -> dict:
    """The data flags every command shares: batches of --batch-size, shuffled (--seed) unless --no-shuffle."""
    return {"batch_size": args.batch_size, "max_samples": args.max_samples, "shuffle": not args.no_shuffle, "seed": args.seed}


def _diagnose(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ._cli_io import float_input, load_arrays, load_keras_model, load_torch_model, torch_arrays

    if bool(args.model) == bool(args.torch_model):
        raise DataError("give either MODEL (a .keras file) or --torch-model module:factory [--weights file.pt], not both or neither.")
    if args.weights and not args.torch_model:
        raise DataError("--weights goes with --torch-model.")
    x, y, note = load_arrays(args)
    if args.torch_model:
        import evalgap.torch as eg

        model = load_torch_model(args.torch_model, args.weights)
        report = eg.diagnose(model, torch_arrays(x, y), forward=float_input, **_batching(args), primary=args.primary, progress=not args.quiet)
    else:
        import evalgap.keras as eg

        model = load_keras_model(args.model)
        report = eg.diagnose(model, (x, y), **_batching(args), primary=args.primary, progress=not args.quiet)
    report.notes.insert(0, note)
    Console(width=None if sys.stdout.isatty() else 120).print(report)
    if args.json:
        report.to_json(args.json)
        print(f"JSON report written to {args.json}")
    if args.html:
        report.to_html(args.html)
        print(f"HTML report written to {args.html}")
    if args.fail_over is not None:
        points = report.gap_points if report.gap_points is not None else 100 * report.gap
        if points > args.fail_over:
            print(f"evalgap: gap of {points:.1f} points exceeds --fail-over {args.fail_over}", file=sys.stderr)
            return 1
    return 0


def _recalibrate(args: argparse.Namespace) -> int:
    import os

    from ._cli_io import load_arrays, load_keras_model

    import evalgap.keras as eg

    if os.path.abspath(args.output) == os.path.abspath(args.model) and not args.overwrite:
        raise DataError(f"-o {args.output} is the input model; pass --overwrite to replace it, or choose another file.")
    if not args.output.endswith(".keras"):
        raise DataError(f"-o must end in .keras (Keras's format), got {args.output}.")
    x, y, note = load_arrays(args)
    model = load_keras_model(args.model)
    batching = _batching(args)
    max_samples = batching.pop("max_samples")
    max_batches = None if max_samples is None else max(1, max_samples // args.batch_size)
    result = eg.recalibrate(model, (x, y), max_batches=max_batches, **batching, progress=not args.quiet)
    print(note)
    print(result)
    atomic_write(args.output, model.save, suffix=".keras")
    print(f"recalibrated model written to {args.output}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ._cli_io import load_arrays
    from .seed.common import demo_console
    from .seed.reproduce import VARIANTS, reproduce

    if args.epochs < 1:
        raise DataError(f"--epochs must be >= 1, got {args.epochs}.")
    if args.keras == 2:
        import os

        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras is Keras 2 too, as in the question
    variants = [v.strip() for v in ",".join(args.variants).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise DataError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}.")
    args.npz = None
    args.skip_bad = getattr(args, "skip_bad", False)
    x, y, note = load_arrays(args)
    classes = int(y.max()) + 1
    reproduce(x, y, classes, variants=variants, epochs=args.epochs, batch_size=args.batch_size, out=args.out, source=note,
              console=demo_console(), precise_every=args.precise_every, keras_version=args.keras)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evalgap",
        description="Explain and close the gap between training-mode and evaluation-mode results.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the seed's symptom and its fix on embedded data (CPU, < 2 minutes)")
    demo.add_argument("--framework", choices=["keras", "torch"], default="keras", help="default: keras (backend from KERAS_BACKEND)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    demo.add_argument("--out", default="evalgap-out", help="folder for the plot (default: ./evalgap-out)")
    demo.set_defaults(func=_demo)

    from ._cli_io import add_data_arguments

    diag = sub.add_parser("diagnose", help="measure a model in every mode on the same data and explain the gap")
    diag.add_argument("model", nargs="?", help="a saved Keras model (.keras)")
    diag.add_argument("--torch-model", metavar="MODULE:FACTORY", help="a PyTorch model factory instead of MODEL")
    diag.add_argument("--weights", metavar="FILE", help="state_dict for --torch-model")
    add_data_arguments(diag)
    diag.add_argument("--json", metavar="FILE", help="write the report as JSON (schema evalgap.report/1)")
    diag.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with figures")
    diag.add_argument("--fail-over", type=float, metavar="POINTS", help="exit 1 when the accuracy gap exceeds POINTS")
    diag.add_argument("--primary", metavar="METRIC", help="the metric to rank causes by (default: accuracy-like, else the first compiled metric, else the loss)")
    diag.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    diag.set_defaults(func=_diagnose)

    rec = sub.add_parser("recalibrate", help="write a copy of a Keras model with exact BatchNorm statistics")
    rec.add_argument("model", help="a saved Keras model (.keras)")
    rec.add_argument("-o", "--output", required=True, help="where to write the recalibrated model (.keras)")
    rec.add_argument("--overwrite", action="store_true", help="allow -o to be the input model")
    add_data_arguments(rec)
    rec.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    rec.set_defaults(func=_recalibrate)

    rep = sub.add_parser("reproduce", help="the seed's training job (ResNet50 on UC Merced) with its remedies and the fix")
    src = rep.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="UC Merced folder (UCMerced_LandUse/Images) or the official zip")
    src.add_argument("--tfds", metavar="NAME", help="tfds name, e.g. uc_merced")
    rep.add_argument("--tfds-data-dir", metavar="DIR")
    rep.add_argument("--tfds-manual-dir", metavar="DIR", help="folder holding UCMerced_LandUse.zip")
    rep.add_argument("--download", action="store_true", help="let tfds download even if the network check fails")
    rep.add_argument("--epochs", type=int, default=50)
    rep.add_argument("--image-size", type=int, default=256)
    rep.add_argument("--batch-size", type=int, default=None, help="override the batch of the batch-96 variants")
    rep.add_argument("--limit-per-class", type=int, default=None, help="use N images per class (CPU-sized runs)")
    rep.add_argument("--variants", nargs="+", default=["seed,batch4-div255,momentum0.9,precise-bn,normalized-precise-bn"],
                     help="comma- or space-separated: seed, batch4-div255, momentum0.9, precise-bn, normalized-precise-bn")
    rep.add_argument("--skip-bad", action="store_true", help="leave unreadable images out")
    rep.add_argument("--precise-every", type=int, default=1, metavar="N",
                     help="measure precise_val_* every N epochs (0: never; each costs a recalibration and an evaluation)")
    rep.add_argument("--keras", type=int, choices=[2, 3], default=3,
                     help="3: Keras 3 (KERAS_BACKEND); 2: Keras 2 (tf_keras), the question's tf.data and MirroredStrategy code")
    rep.add_argument("--out", default="evalgap-out/reproduce", help="output folder (JSON, CSV, PNG)")
    rep.set_defaults(func=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EvalgapError as exc:
        print(f"evalgap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evalgap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
