"""The ``evalgap`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ._files import atomic_write, check_writable
from .errors import DataError, EvalgapError

_EXIT_STATUS = """exit status:
  0  success
  1  diagnose: the gap exceeds --fail-over
  2  bad input or an output that cannot be written (the message names the problem and the fix; checked before the work)
  3  unexpected error (the traceback follows; please report it)
"""

#: The epilog of diagnose, recalibrate and demo, which write their files at the end.
EXIT_CODES = _EXIT_STATUS + "  130  interrupted (Ctrl-C) during the work; nothing was written (the files are written at the end)"

#: The epilog of reproduce, which writes its files after each variant.
REPRODUCE_EXIT_CODES = (_EXIT_STATUS + "  130  interrupted (Ctrl-C); the variants finished before it are kept in --out (reproduce.json,\n"
                        "       reproduce.csv, reproduce.png, rewritten after each variant; the files kept are printed)")

#: The top-level epilog: every command.
ALL_EXIT_CODES = (_EXIT_STATUS + "  130  interrupted (Ctrl-C); no file is left half-written: diagnose, recalibrate and demo write\n"
                  "       nothing, reproduce keeps the variants finished before it (and prints which files)")


def _output_folder(path: str, flag: str) -> None:
    """Create the output folder ``path`` (of ``flag``) and check that files can be created in it: before the work."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{flag} {path}: cannot create the output folder ({exc.strerror or exc}); give a folder to write to.") from exc
    check_writable(path, flag, folder=True)


def _same_file(a: str, b: str) -> bool:
    """True where the paths name one file: the same real path (symbolic links resolved), or the same existing file
    (hard links, case-insensitive file systems)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _demo(args: argparse.Namespace) -> int:
    check_writable(args.out, "--out", folder=True)  # not created before the work: an interrupted demo writes nothing
    if args.framework == "torch":
        from .seed.demo import run_torch_demo

        return run_torch_demo(epochs=args.epochs, out=args.out)
    from .seed.demo import run_keras_demo

    return run_keras_demo(epochs=args.epochs, out=args.out)


def _batching(args: argparse.Namespace) -> dict:
    """The data flags every command shares: batches of --batch-size, shuffled (--seed) unless --no-shuffle."""
    return {"batch_size": args.batch_size, "shuffle": not args.no_shuffle, "seed": args.seed}


def _check_model_flags(args: argparse.Namespace) -> None:
    if bool(args.model) == bool(args.torch_model):
        raise DataError("give either MODEL (a .keras file) or --torch-model module:factory [--weights file.pt], not both or neither.")
    if args.weights and not args.torch_model:
        raise DataError("--weights goes with --torch-model.")


def _data_flag(args: argparse.Namespace) -> str:
    """The data flag and its value, as the user gave them (for messages)."""
    return f"--npz {args.npz}" if args.npz else f"--tfds {args.tfds}" if args.tfds else f"--data {args.data}"


def _model_and_data(args: argparse.Namespace, check_classes: bool = False) -> tuple[Any, Any, Any, str, dict]:
    """The model, the evalgap module for it (torch, keras, tf_keras), its data, the data's note and that module's extra
    options. ``check_classes``: data of more classes than the model has outputs are refused here, before any pass."""
    from ._cli_io import (check_classes as refuse_more_classes, float_input, keras_api, keras_image_size, keras_output_classes,
                          load_arrays, load_keras_model, load_torch_model, torch_arrays, torch_output_classes)

    if args.torch_model:
        import evalgap.torch as api

        import torch

        x, y, note, classes = load_arrays(args)
        torch.manual_seed(args.seed)  # dropout masks in training mode: the same in every run of the command
        model = load_torch_model(args.torch_model, args.weights)
        data = torch_arrays(x, y, model)
        if x.ndim == 3 and data[0].dim() == 4:
            note += f", images of shape {x.shape} read as one channel, (N, 1, H, W), as the model's first convolution takes"
        if check_classes:
            refuse_more_classes(classes, y, torch_output_classes(model, data[0]), set(), _data_flag(args))
        return model, api, data, note, {"forward": float_input}
    model = load_keras_model(args.model, seed=args.seed)
    size_note = None
    if not args.npz:  # --data and --tfds resize the images: to the model's input size where it is fixed
        args.image_size, size_note = keras_image_size(model, args.image_size)
    x, y, note, classes = load_arrays(args)
    if check_classes:
        refuse_more_classes(classes, y, *keras_output_classes(model), _data_flag(args))
    return model, keras_api(args.model), (x, y), f"{note}, {size_note}" if size_note else note, {}


def _max_samples_note(args: argparse.Namespace, samples: int) -> str | None:
    """The note for a --max-samples that the whole batches exceed (below one batch: one batch is taken)."""
    if args.max_samples is None or samples <= args.max_samples:
        return None
    return (f"--max-samples {args.max_samples}: {samples} samples were used, more than {args.max_samples}, since the passes "
            f"take whole batches of --batch-size {args.batch_size}, at least one.")


def _check_reports(args: argparse.Namespace) -> None:
    """--json and --html: neither onto an input nor onto each other, each writable; before anything is loaded."""
    inputs = [("MODEL", args.model), ("--weights", args.weights), ("--data", args.data), ("--npz", args.npz),
              ("--tfds-data-dir", args.tfds_data_dir), ("--tfds-manual-dir", args.tfds_manual_dir)]
    outputs = [(flag, path) for flag, path in (("--json", args.json), ("--html", args.html)) if path]
    for i, (flag, path) in enumerate(outputs):
        for other_flag, other in inputs + outputs[:i]:
            if other and _same_file(path, other):
                if other_flag == "--json":
                    raise DataError(f"--html {path} is also --json ({other}): one report would overwrite the other. Give each "
                                    "its own file.")
                raise DataError(f"{flag} {path} is {other_flag} ({other}), an input: writing the report would overwrite it. "
                                f"Give {flag} a file of its own.")
        check_writable(path, flag, folder_exists=True)


def _diagnose(args: argparse.Namespace) -> int:
    from rich.console import Console

    _check_model_flags(args)
    _check_reports(args)
    model, eg, data, note, extra = _model_and_data(args, check_classes=True)
    options = dict(_batching(args), max_samples=args.max_samples, primary=args.primary, progress=not args.quiet)
    report = eg.diagnose(model, data, **options, **extra)
    report.notes[:0] = [n for n in (note, _max_samples_note(args, report.samples)) if n]
    Console(width=None if sys.stdout.isatty() else 120).print(report)
    if args.json:
        report.to_json(args.json)
        print(f"JSON report written to {args.json}")
    if args.html:
        report.to_html(args.html)
        print(f"HTML report written to {args.html}")
    if args.fail_over is not None:
        worse = report.worse_by()
        if worse is not None and worse > args.fail_over:
            unit = " points" if report.gap_points is not None else ""
            print(f"evalgap: evaluation-mode {report.primary} is worse than training mode by {worse:.4g}{unit}, "
                  f"which exceeds --fail-over {args.fail_over:g}", file=sys.stderr)
            return 1
    return 0


def _check_output(args: argparse.Namespace, source: str, suffixes: tuple[str, ...]) -> None:
    """-o: not the input unless --overwrite (through a symbolic or hard link too), the right suffix, a writable file in
    an existing folder; before anything is loaded."""
    if source and _same_file(args.output, source) and not args.overwrite:
        raise DataError(f"-o {args.output} is the input ({source}); pass --overwrite (or --in-place) to replace it, or choose another file.")
    if not args.output.endswith(suffixes):
        raise DataError(f"-o must end in {' or '.join(suffixes)}, got {args.output}.")
    for flag, other in (("--data", args.data), ("--npz", args.npz)):
        if other and _same_file(args.output, other):
            raise DataError(f"-o {args.output} is {flag} ({other}): writing the model would overwrite it. Choose another file.")
    check_writable(args.output, "-o", folder_exists=True)


def _recalibrate(args: argparse.Namespace) -> int:
    from ._cli_io import saved_by_keras2

    _check_model_flags(args)
    if args.torch_model:
        source, suffixes, what = args.weights, (".pt", ".pth"), "state_dict"
        if args.overwrite and not args.output and not args.weights:
            raise DataError("--in-place replaces the --weights file: give --weights.")
    else:  # Keras 3 writes .keras; a Keras 2 model is written in its own format, .keras or .h5
        source, suffixes, what = args.model, (".keras", ".h5") if saved_by_keras2(args.model) else (".keras",), "model"
    if args.overwrite and not args.output:
        if not source.endswith(suffixes):
            flag = "--weights" if args.torch_model else "MODEL"
            raise DataError(f"--in-place writes over {flag} ({source}), which must then end in {' or '.join(suffixes)}: "
                            f"give -o NAME{suffixes[0]} to write the recalibrated {what} there instead.")
        args.output = source
    if not args.output:
        if args.torch_model:
            raise DataError("give -o fixed.pt (where to write the recalibrated state_dict), or --in-place to replace --weights.")
        raise DataError("give -o fixed.keras (where to write the recalibrated model), or --in-place to replace MODEL.")
    _check_output(args, source or "", suffixes)
    model, eg, data, note, extra = _model_and_data(args)
    options = dict(_batching(args), max_samples=args.max_samples, progress=not args.quiet)
    result = eg.recalibrate(model, data, **options, **extra)
    said = _max_samples_note(args, result.samples)
    if said:
        result.notes.append(said)
    if args.torch_model:
        import torch

        write = lambda tmp: torch.save(model.state_dict(), tmp)  # noqa: E731
    else:
        write = model.save
    print(note)
    print(result)
    atomic_write(args.output, write, suffix=os.path.splitext(args.output)[1])
    print(f"recalibrated {'state_dict' if args.torch_model else 'model'} written to {args.output}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ._cli_io import describe, load_image_set
    from .seed.common import demo_console
    from .seed.reproduce import VARIANTS, reproduce

    variants = [v.strip() for v in ",".join(args.variants).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise DataError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}.")
    check_writable(args.out, "--out", folder=True)  # before hours of training, not after; created once the data are read
    s = load_image_set(args)
    _output_folder(args.out, "--out")
    reproduce(s.images, s.labels, len(s.class_names), variants=variants, epochs=args.epochs, batch_size=args.batch_size,
              out=args.out, source=describe(s),
              console=demo_console(), precise_every=args.precise_every, keras_version=args.keras,
              precise_samples=args.precise_samples)
    return 0


def _model_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("model", nargs="?", help="a saved Keras model (.keras; Keras 2 models also .h5 or a SavedModel folder)")
    p.add_argument("--torch-model", metavar="MODULE:FACTORY", help=f"a PyTorch model factory instead of MODEL ({what})")
    p.add_argument("--weights", metavar="FILE", help="state_dict for --torch-model (.pt)")


def _add_diagnose(sub) -> None:
    from ._cli_io import add_data_arguments, non_negative_float

    diag = sub.add_parser("diagnose", help="measure a model in every mode on the same data and explain the gap", epilog=EXIT_CODES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(diag, "called with no argument")
    add_data_arguments(diag)
    diag.add_argument("--json", metavar="FILE", help="write the report as JSON (schema evalgap.report/1)")
    diag.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with figures")
    diag.add_argument("--fail-over", type=non_negative_float, metavar="POINTS", help="exit 1 when evaluation mode is worse than training mode by more than this, in points for "
                      "accuracy-like metrics (5 = 0.05 accuracy), else in the metric's own units (a loss: how much higher)")
    diag.add_argument("--primary", metavar="METRIC", help="the metric to rank causes by (default: accuracy-like, else the first compiled metric, else the loss)")
    diag.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    diag.set_defaults(func=_diagnose)


def _add_recalibrate(sub) -> None:
    from ._cli_io import add_data_arguments

    rec = sub.add_parser("recalibrate", help="write a copy of a model with exact BatchNorm statistics (Keras .keras or PyTorch state_dict)",
                         epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(rec, "its state_dict is written")
    rec.add_argument("-o", "--output", help="where to write the recalibrated model (.keras; .h5 too for a Keras 2 model) or state_dict (.pt)")
    rec.add_argument("--overwrite", "--in-place", dest="overwrite", action="store_true",
                     help="allow -o to be the input (--in-place: replace --weights / MODEL)")
    add_data_arguments(rec)
    rec.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    rec.set_defaults(func=_recalibrate)


def _precise_every(text: str) -> int | str:
    from .seed.common import check_precise_every

    try:
        return check_precise_every(text)
    except DataError:
        raise argparse.ArgumentTypeError(f"expected 'seed' or a whole number >= 0 (0: never, 1: every epoch), got {text!r}") from None


def _add_reproduce(sub) -> None:
    from ._cli_io import at_least, non_negative_int, positive_int
    from .seed.common import DEFAULT_PRECISE_SAMPLES, PRECISE_SCHEDULE

    rep = sub.add_parser("reproduce", help="the seed's training job (ResNet50 on UC Merced) with its remedies and the fix",
                         epilog=REPRODUCE_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = rep.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="UC Merced folder (UCMerced_LandUse/Images) or the official zip")
    src.add_argument("--tfds", metavar="NAME", help="tfds name, e.g. uc_merced")
    rep.add_argument("--tfds-data-dir", metavar="DIR")
    rep.add_argument("--tfds-manual-dir", metavar="DIR", help="folder holding UCMerced_LandUse.zip")
    rep.add_argument("--download", action="store_true", help="let tfds download even if the network check fails")
    rep.add_argument("--epochs", type=positive_int, default=50)
    rep.add_argument("--image-size", type=at_least(32), default=256, help="default 256; ResNet50 needs at least 32")
    rep.add_argument("--batch-size", type=positive_int, default=None, help="override the batch of the batch-96 variants")
    rep.add_argument("--limit-per-class", type=positive_int, default=None, help="use N images per class (CPU-sized runs)")
    rep.add_argument("--variants", nargs="+", default=["seed,batch4-div255,momentum0.9,precise-bn,normalized-precise-bn"],
                     help="comma- or space-separated: seed, batch4-div255, momentum0.9, precise-bn, normalized-precise-bn")
    rep.add_argument("--skip-bad", action="store_true", help="leave unreadable images out")
    rep.add_argument("--precise-every", type=_precise_every, default=PRECISE_SCHEDULE, metavar="N|seed",
                     help="when to measure precise_val_* for the variants without PreciseBN (each time costs a recalibration and "
                          "an evaluation, about half a fit epoch): 'seed' (default) after epochs 1-7, 10, 20, 50 and the last, "
                          "the summary table's (about 1.1x plain fit over 50 epochs); N after every N-th epoch (1: every epoch); 0 never")
    rep.add_argument("--precise-samples", type=non_negative_int, default=DEFAULT_PRECISE_SAMPLES, metavar="N",
                     help="take precise_val_*'s statistics from a fixed class-stratified sample of N training images, rounded up "
                          f"to whole batches (default {DEFAULT_PRECISE_SAMPLES}: all; a sample is faster but reads low); "
                          "the evaluation is always on all the data")
    rep.add_argument("--keras", type=int, choices=[2, 3], default=3,
                     help="3: Keras 3 (KERAS_BACKEND); 2: Keras 2 (tf_keras), the question's tf.data and MirroredStrategy code")
    rep.add_argument("--out", default="evalgap-out/reproduce", help="output folder (JSON, CSV, PNG)")
    rep.set_defaults(func=_reproduce)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from ._cli_io import positive_int

    parser = argparse.ArgumentParser(
        prog="evalgap", description="Explain and close the gap between training-mode and evaluation-mode results.",
        epilog=ALL_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"evalgap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details, and the frameworks' start-up messages")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the seed's symptom and its fix on embedded data (CPU, < 2 minutes)", epilog=EXIT_CODES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--framework", choices=["keras", "torch"], default="keras", help="default: keras (backend from KERAS_BACKEND)")
    demo.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the demo's own)")
    demo.add_argument("--out", default="evalgap-out", help="folder for the plot (default: ./evalgap-out)")
    demo.set_defaults(func=_demo)
    _add_diagnose(sub)
    _add_recalibrate(sub)
    _add_reproduce(sub)
    return parser


def _needs_tensorflow(args: argparse.Namespace) -> bool:
    if args.command == "demo":
        return args.framework == "keras"
    if args.command in ("diagnose", "recalibrate"):
        return not args.torch_model or bool(getattr(args, "tfds", None))
    return True


def quiet_framework_startup(args: argparse.Namespace) -> None:
    """Import TensorFlow with its native start-up lines (oneDNN, CUDA drivers, CPU features) hidden.

    They come from TensorFlow's C++ logging before Python can configure it, so the process's
    stderr (file descriptor 2) goes to /dev/null during the import; Python errors still show.
    ``-v`` keeps them, and so does a ``TF_CPP_MIN_LOG_LEVEL`` the user set.
    """
    import importlib.util

    if args.verbose or "TF_CPP_MIN_LOG_LEVEL" in os.environ or not _needs_tensorflow(args):
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if importlib.util.find_spec("tensorflow") is None or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                import tensorflow  # noqa: F401
            except Exception:  # the command's own import shows the error
                pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "reproduce" and args.keras == 2:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow loads: tf.keras is Keras 2 too, as in the question
    try:
        quiet_framework_startup(args)
        return int(args.func(args) or 0)
    except EvalgapError as exc:
        print(f"evalgap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evalgap: interrupted", file=sys.stderr)
        return 130
    except Exception:  # not exit 1, which means "the gap exceeds --fail-over"
        import traceback

        traceback.print_exc()
        print("evalgap: unexpected error (above); please report it with the command that gave it.", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
