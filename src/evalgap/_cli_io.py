"""What the ``evalgap`` command reads: models from files, data from folders, tfds or npz."""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any, Iterator

import numpy as np

from .errors import DataError, ModelError


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="image folder (<class>/<image>, or the archive's Images/) or its .zip")
    src.add_argument("--tfds", metavar="NAME", help="a tensorflow_datasets image classification data set, e.g. uc_merced")
    src.add_argument("--npz", metavar="FILE", help=".npz with arrays x and y")
    p.add_argument("--tfds-data-dir", metavar="DIR", help="tfds data_dir")
    p.add_argument("--tfds-manual-dir", metavar="DIR", help="folder holding the data set's downloaded zip")
    p.add_argument("--download", action="store_true", help="let tfds download even if the network check fails")
    p.add_argument("--image-size", type=int, default=256, help="images are resized with padding to S x S (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="the training batch size (default 32)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most N samples (whole batches)")
    p.add_argument("--limit-per-class", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (counted) instead of failing")


def load_arrays(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(x uint8/float NHWC, y int, description) from --data / --tfds / --npz."""
    from .data import load_image_folder, load_npz, load_tfds

    if args.batch_size is not None and args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if not getattr(args, "tfds", None) and (args.tfds_data_dir or args.tfds_manual_dir or args.download):
        raise DataError("--tfds-data-dir, --tfds-manual-dir and --download go with --tfds NAME.")
    if getattr(args, "npz", None):
        x, y = load_npz(args.npz)
        return x, y, args.npz
    if args.tfds:
        s = load_tfds(
            args.tfds, data_dir=args.tfds_data_dir, manual_dir=args.tfds_manual_dir,
            download=True if args.download else None, image_size=args.image_size, limit_per_class=args.limit_per_class,
        )
    else:
        s = load_image_folder(args.data, args.image_size, limit_per_class=args.limit_per_class, skip_bad=args.skip_bad)
    note = f"{s.source}: {len(s)} images, {len(s.class_names)} classes"
    if s.converted:
        note += f", {s.converted} converted to RGB (grayscale, RGBA, ...)"
    if s.skipped:
        note += f", {len(s.skipped)} unreadable file(s) left out"
    return s.images, s.labels, note


def keras_batches(x: np.ndarray, y: np.ndarray, batch_size: int, max_samples: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    n = len(x) if max_samples is None else min(len(x), max_samples)
    for i in range(0, n - n % batch_size if n >= batch_size else n, batch_size):
        yield x[i : i + batch_size].astype("float32"), y[i : i + batch_size]


def load_keras_model(path: str):
    import keras

    if not os.path.exists(path):
        raise ModelError(f"{path} does not exist: pass a model saved with model.save('model.keras').")
    try:
        return keras.saving.load_model(path)
    except Exception as exc:
        raise ModelError(f"{path} is not a Keras model file that Keras {keras.__version__} can load ({type(exc).__name__}: {exc}).") from exc


def load_torch_model(spec: str, weights: str | None):
    import torch

    if ":" not in spec:
        raise ModelError(f"--torch-model must be module:factory (e.g. mypkg.models:resnet50), got {spec!r}.")
    module_name, factory_name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import {spec!r}: {exc}. Make the module importable (PYTHONPATH) and check the name.") from exc
    model = factory()
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"the weights in {weights} do not match {spec}(): {str(exc).splitlines()[0]} ...") from exc
    return model


def torch_batches(x: np.ndarray, y: np.ndarray, batch_size: int, max_samples: int | None) -> list[Any]:
    import torch

    out = []
    for xb, yb in keras_batches(x, y, batch_size, max_samples):
        t = torch.from_numpy(np.ascontiguousarray(xb.transpose(0, 3, 1, 2) if xb.ndim == 4 else xb))
        out.append((t, torch.from_numpy(np.asarray(yb)).long()))
    return out
