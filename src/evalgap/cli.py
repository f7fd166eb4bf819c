"""The ``evalgap`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import EvalgapError


def _demo(args: argparse.Namespace) -> int:
    if args.framework == "torch":
        from .seed.demo import run_torch_demo

        return run_torch_demo(epochs=args.epochs, out=args.out)
    from .seed.demo import run_keras_demo

    return run_keras_demo(epochs=args.epochs, out=args.out)


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
