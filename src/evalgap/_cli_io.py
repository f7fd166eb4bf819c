"""What the ``evalgap`` command reads: models from files, data from folders, tfds or npz."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import zipfile
from typing import Any

import numpy as np

from .engine.tasks import whole_number_floats
from .errors import DataError, ModelError

#: The size images are resized to when neither --image-size nor the model fixes it (the seed's).
DEFAULT_IMAGE_SIZE = 256


def _int_at_least(low: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse names the flag and exits 2 otherwise)."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _int_at_least(0, text)


def at_least(low: int):
    """argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        return _int_at_least(low, text)

    return parse


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="image folder (<class>/<image>, or the archive's Images/) or its .zip")
    src.add_argument("--tfds", metavar="NAME", help="a tensorflow_datasets image classification data set, e.g. uc_merced")
    src.add_argument("--npz", metavar="FILE", help=".npz with arrays x and y (images NHWC, or NCHW as PyTorch holds them)")
    p.add_argument("--tfds-data-dir", metavar="DIR", help="tfds data_dir")
    p.add_argument("--tfds-manual-dir", metavar="DIR", help="folder holding the data set's downloaded zip")
    p.add_argument("--download", action="store_true", help="let tfds download even if the network check fails")
    p.add_argument("--image-size", type=positive_int, default=None, metavar="S",
                   help=f"images are resized with padding to S x S (default: a Keras model's input height and width where its input "
                        f"shape fixes them, else {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--batch-size", type=positive_int, default=32, help="the training batch size (default 32)")
    p.add_argument("--max-samples", type=positive_int, default=None, metavar="N",
                   help="use N // --batch-size whole batches drawn at random from all of the data, and at least one: N "
                        "below --batch-size still takes one whole batch (the report's notes then say how many samples)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the shuffled batches and of the model's random layers (dropout masks in training mode; default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="batch the images in the order they are read, instead of shuffled as fit does")
    p.add_argument("--limit-per-class", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (counted) instead of failing")


def load_arrays(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str, int | None]:
    """(x uint8/float NHWC, y int, description, number of classes) from --data / --tfds / --npz; the number of classes
    is that of the class folders (tfds: class names), None for --npz (its labels say it: :func:`check_classes`)."""
    from .data import load_npz

    if getattr(args, "npz", None):
        _check_tfds_flags(args)
        x, y = load_npz(args.npz)
        return x, y, args.npz, None
    s = load_image_set(args)
    return s.images, s.labels, describe(s), len(s.class_names)


def load_image_set(args: argparse.Namespace) -> Any:
    """The :class:`evalgap.data.ImageSet` of --data (a folder or a zip) or --tfds, resized to --image-size."""
    from .data import load_image_folder, load_tfds

    size = DEFAULT_IMAGE_SIZE if args.image_size is None else args.image_size
    _check_tfds_flags(args)
    if args.tfds:
        return load_tfds(
            args.tfds, data_dir=args.tfds_data_dir, manual_dir=args.tfds_manual_dir, download=True if args.download else None,
            image_size=size, limit_per_class=args.limit_per_class, skip_bad=args.skip_bad,
        )
    return load_image_folder(args.data, size, limit_per_class=args.limit_per_class, skip_bad=args.skip_bad)


def _check_tfds_flags(args: argparse.Namespace) -> None:
    if not getattr(args, "tfds", None) and (args.tfds_data_dir or args.tfds_manual_dir or args.download):
        raise DataError("--tfds-data-dir, --tfds-manual-dir and --download go with --tfds NAME.")


def describe(s: Any) -> str:
    """One line on an ImageSet: where from, how many images and classes, what was converted or left out."""
    note = f"{s.source}: {len(s)} images, {len(s.class_names)} classes"
    if s.converted:
        note += f", {s.converted} converted to 8-bit RGB (grayscale, RGBA, 16-bit, ...)"
    if s.skipped:
        note += f", {len(s.skipped)} unreadable file(s) left out"
    return note


def saved_by_keras2(path: str) -> bool:
    """True for a model that Keras 2 (tf_keras) saved: a ``.keras`` zip or HDF5 file recording keras_version 2.x, or a
    SavedModel folder with Keras metadata (Keras 3 writes none)."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "keras_metadata.pb"))
    version = None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                version = json.loads(zf.read("metadata.json")).get("keras_version")
        else:
            with open(path, "rb") as fh:
                hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
            if hdf5:
                import h5py

                with h5py.File(path, "r") as f:
                    version = f.attrs.get("keras_version")
    except (ImportError, OSError, KeyError, ValueError, AttributeError):  # unreadable, or not a model: the loader says so
        return False
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    return isinstance(version, str) and version.startswith("2.")


def load_keras_model(path: str, seed: int | None = None) -> Any:
    """The Keras 3 model saved in ``path``, or the Keras 2 (tf_keras) one where Keras 2 saved it (:func:`saved_by_keras2`).
    ``seed``: Keras's global seeds are set first (``set_random_seed``), so the random layers the model is built with
    (their seed generators) draw the same dropout masks in every run of the same command."""
    if not os.path.exists(path):
        raise ModelError(f"{path} does not exist: pass a model saved with model.save('model.keras').")
    if saved_by_keras2(path):
        try:
            from .tf_keras.layers import keras as keras2
        except ImportError as exc:
            raise ModelError(f"{path} was saved by Keras 2, and tf_keras cannot be imported here ({exc}): install tf-keras "
                             "matching your TensorFlow (pip install 'evalgap[tf-keras]').") from None
        if seed is not None:
            keras2.utils.set_random_seed(seed)
        try:
            return keras2.models.load_model(path)
        except Exception as exc:
            raise ModelError(f"{path} is a Keras 2 model that tf_keras {keras2.__version__} cannot load ({type(exc).__name__}: {exc}).") from exc
    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)
    try:
        return keras.saving.load_model(path)
    except Exception as exc:
        raise ModelError(f"{path} is not a Keras model file that Keras {keras.__version__} can load ({type(exc).__name__}: {exc}).") from exc


def keras_api(path: str) -> Any:
    """The evalgap module for the model in ``path``: ``evalgap.tf_keras`` where Keras 2 saved it, else ``evalgap.keras``."""
    return importlib.import_module("evalgap.tf_keras" if saved_by_keras2(path) else "evalgap.keras")


def _fixed_input_size(model: Any) -> tuple[int, int] | None:
    """(height, width) of a Keras model's one image input where its shape fixes both, else None."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed or unbuilt model: no input shape to read
        return None
    if not inputs or len(inputs) != 1:
        return None
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:3]):
        return None
    return int(shape[1]), int(shape[2])


def keras_image_size(model: Any, given: int | None) -> tuple[int, str | None]:
    """The size ``--data`` / ``--tfds`` images are resized to for a Keras model, and a note when the model chose it.

    A model whose input shape fixes height and width gets them (``given`` must then agree); otherwise
    ``given``, by default 256.
    """
    fixed = _fixed_input_size(model)
    if fixed is None:
        return (DEFAULT_IMAGE_SIZE if given is None else given), None
    height, width = fixed
    if height != width:
        raise DataError(f"the model takes {height}x{width} images, but --data and --tfds resize to squares (S x S): "
                        f"pass --npz with images of {height}x{width}, or use the Python API with your own preprocessing.")
    if given is not None and given != height:
        raise DataError(f"--image-size {given} does not fit the model, whose input is {height}x{width}: "
                        f"leave --image-size out (the model's size is used) or pass --image-size {height}.")
    return height, (None if given is not None else f"resized with padding to {height}x{width}, the model's input size")


def _label_classes(y: Any, ignored: set[int]) -> int | None:
    """The highest class index + 1 of labels that are class indices (integers or whole-number floats, shape (N,) or
    (N, 1)), values in ``ignored`` (a loss's ``ignore_class``) left out; None for other labels (one-hot, soft)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not y.size or y.dtype.kind not in "biuf":
        return None
    if y.dtype.kind == "f" and not whole_number_floats(y):
        return None
    if ignored:
        y = y[~np.isin(y, list(ignored))]
    return int(y.max()) + 1 if y.size else None


def keras_output_classes(model: Any) -> tuple[int | None, set[int]]:
    """The number of class scores of a Keras model with one output of shape (None, C), C > 1 (else None), and the
    labels its loss ignores (``ignore_class``)."""
    from ._keras_common import ignored_labels

    try:
        outputs = model.outputs
    except (AttributeError, ValueError):  # a subclassed or unbuilt model: no output shape to read
        return None, set()
    if not outputs or len(outputs) != 1:
        return None, set()
    shape = tuple(outputs[0].shape)
    classes = int(shape[1]) if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1 else None
    return classes, ignored_labels(getattr(model, "loss", None))


def torch_output_classes(model: Any, x: Any) -> int | None:
    """The number of class scores of a PyTorch model whose output for a batch is (N, C), C > 1: one forward of the
    first two samples in mode E as the passes run it (:func:`evalgap.torch.predict.predictor`: without gradients,
    modes set by flag, no ``train()``/``eval()`` of the user's called, put back), torch's RNG put back. None where the
    output is of another form or the forward fails (the passes then say why)."""
    import torch

    from .engine import Batch
    from .torch.data import model_device
    from .torch.predict import predictor

    if len(x) == 0:
        return None
    try:
        with torch.random.fork_rng(devices=[]), predictor(model, "E", (), (), forward=float_input, device=model_device(model)) as run:
            out = run(Batch(x[:2], raw=(x[:2],)))
    except Exception:  # the model cannot take the data: diagnose names the batch and the reason
        return None
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1 else None


def check_classes(data_classes: int | None, y: Any, model_classes: int | None, ignored: set[int], source: str) -> None:
    """Before any pass: data of more classes (class folders, or npz labels' highest index + 1) than the model has
    outputs are a DataError naming both numbers (the passes would find one batch's labels out of range)."""
    if model_classes is None:
        return
    if data_classes is not None:
        said = f"{source} holds {data_classes} classes"
    else:
        data_classes = _label_classes(y, ignored)
        if data_classes is None:
            return
        said = f"{source} has labels up to {data_classes - 1}, so {data_classes} classes"
    if data_classes > model_classes:
        missing = f"label {model_classes}" if data_classes == model_classes + 1 else f"labels {model_classes} to {data_classes - 1}"
        raise DataError(f"{said}, but the model has {model_classes} outputs (class scores), so {missing} would have no "
                        f"output to score them: pass the data of the model's {model_classes} classes, or the model trained "
                        f"on these {data_classes}.")


def load_torch_model(spec: str, weights: str | None):
    """``module:factory`` called with no argument, with the ``state_dict`` in ``weights`` loaded."""
    import torch

    if ":" not in spec:
        raise ModelError(f"--torch-model must be module:factory (e.g. mypkg.models:resnet50), got {spec!r}.")
    module_name, factory_name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import {spec!r}: {exc}. Make the module importable (PYTHONPATH) and check the name.") from exc
    try:
        model = factory()
    except Exception as exc:
        raise ModelError(f"{spec}() failed ({type(exc).__name__}: {exc}): the factory must build the model with no argument.") from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module: point --torch-model at a function that builds the model.")
    if weights:
        if not os.path.exists(weights):
            raise ModelError(f"{weights} does not exist: pass a state_dict saved with torch.save(model.state_dict(), path).")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{weights} is not a file torch.load can read as weights ({type(exc).__name__}): save it with torch.save(model.state_dict(), path).") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            detail = detail if len(detail) <= 600 else detail[:600] + " ..."
            raise ModelError(
                f"the weights in {weights} do not match {spec}(): {detail} Give the --torch-model factory that builds the "
                "model these weights were saved from (torch.save(model.state_dict(), ...)), with the same arguments."
            ) from exc
    return model


def torch_arrays(x: np.ndarray, y: np.ndarray, model: Any = None) -> tuple[Any, Any]:
    """Images as an NCHW tensor (NHWC arrays get a view, no copy) and the labels as class ids (int64) where they are
    integers or whole-number floats (as pandas stores them), other floats as they are, for the API's checks to judge
    as they judge the same arrays; not numbers: DataError.

    4-D ``x`` is NHWC (image folders, tfds, most npz files) unless its axis 1, not its last, holds as
    many channels as the model's first convolution takes (an npz saved from PyTorch, NCHW); without a
    convolution to ask, axis 1 of size 1, 3 or 4 with another last axis means NCHW. 3-D ``x`` (N, H, W)
    for a model whose first convolution is 2-D holds grayscale images without their channel axis: it
    gets one, (N, 1, H, W), where that convolution takes 1 channel; otherwise it is a DataError
    naming the shape (a batch of them would be read as one image of batch-size channels).
    """
    import torch

    from ._checks import check_label_dtype

    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DataError(f"the images must be numbers, got {x.dtype} values: save x as a numeric array (e.g. uint8 pixels), "
                        "np.savez(path, x=images, y=labels).")
    check_label_dtype(y)
    t = torch.from_numpy(x)
    if t.dim() == 4 and _layout(tuple(t.shape), _first_conv_channels(model)) == "NHWC":
        t = t.permute(0, 3, 1, 2)
    conv = _first_conv(model)
    if t.dim() == 3 and conv is not None and len(conv.kernel_size) == 2:
        if conv.in_channels in (0, 1):  # 0: a lazy convolution, which takes what the first batch has
            t = t.unsqueeze(1)
        else:
            raise DataError(
                f"x has shape {tuple(x.shape)}: images without a channel axis (N, H, W), but the model's first convolution "
                f"takes {conv.in_channels} channels: save x with its channels, (N, {conv.in_channels}, H, W) or "
                f"(N, H, W, {conv.in_channels}) (grayscale as RGB: np.repeat(x[:, None], {conv.in_channels}, axis=1)).")
    whole = y.dtype.kind in "biu" or whole_number_floats(y)
    return t, torch.from_numpy(y.astype(np.int64) if whole else y)


def _first_conv(model: Any) -> Any:
    """The model's first convolution module (in ``modules()`` order), or None."""
    from torch import nn

    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def _first_conv_channels(model: Any) -> int | None:
    conv = _first_conv(model)
    return None if conv is None else int(conv.in_channels)


def _layout(shape: tuple[int, ...], channels: int | None) -> str:
    if channels is not None:
        if shape[1] == channels and shape[3] != channels:
            return "NCHW"
        return "NHWC"
    return "NCHW" if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4) else "NHWC"


def float_input(model, batch):
    """``forward=`` for the CLI's torch path: images stay uint8 in memory, each batch becomes float32."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(x.float().contiguous())
