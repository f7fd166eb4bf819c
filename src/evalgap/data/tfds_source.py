"""tensorflow_datasets by name (``--tfds uc_merced``), with the real ``tfds.load`` code.

Offline, ``tfds.load`` retries for minutes before failing. Before asking tfds to download,
a 3-second reachability check decides; without network the error says how to use a folder
or the official zip instead. ``manual_dir`` holding the data set's official archive
(:data:`MANUAL_ARCHIVES`: ``uc_merced`` -> ``UCMerced_LandUse.zip``) is read in place, in the
same label order as tfds. Images come as RGB: grayscale (one channel) is repeated, RGBA and
grayscale with alpha lose the alpha channel, 16-bit images keep their top 8 bits, as
:func:`~evalgap.data.load_image_folder` reads files (each counted in ``converted``).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np

from ..errors import DataError
from .folder import ImageSet, load_image_folder
from .resize import resize_with_pad

logger = logging.getLogger("evalgap.data")

#: Where tfds downloads prepared data sets from first.
TFDS_HOST = ("storage.googleapis.com", 443)


def reachable(host: tuple[str, int] = TFDS_HOST, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


#: The official archive each data set's ``manual_dir`` holds, read in place (the folder loader's rules).
MANUAL_ARCHIVES = {"uc_merced": "UCMerced_LandUse.zip"}


def _manual_archive(name: str, manual_dir: str | os.PathLike) -> Path:
    """The archive of data set ``name`` (``uc_merced`` or ``uc_merced:2.0.0``) in ``manual_dir``, or a DataError."""
    base = name.split(":")[0].split("/")[0].strip()
    folder = Path(manual_dir)
    if base not in MANUAL_ARCHIVES:
        known = ", ".join(f"{k} ({v})" for k, v in MANUAL_ARCHIVES.items())
        raise DataError(f"--tfds-manual-dir is read only for {known}, not for {name!r}: leave --tfds-manual-dir out to "
                        "load it with tfds, or pass --data <its folder or .zip>.")
    archive = MANUAL_ARCHIVES[base]
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"--tfds-manual-dir {folder} {what}: give the folder that holds {archive} (or pass --data {archive}).")
    path = folder / archive
    if not path.is_file():
        others = sorted(p.name for p in folder.glob("*.zip"))
        found = f" (it holds {', '.join(others)})" if others else ""
        raise DataError(f"--tfds-manual-dir {folder} holds no {archive}{found}: put the official {archive} there, or pass "
                        "--data <the zip or its unzipped folder>.")
    return path


def _rgb(img: np.ndarray) -> tuple[np.ndarray, bool]:
    """An image as 8-bit RGB ``(H, W, 3)`` (converted as the folder loader converts files) and whether it was converted."""
    img = np.asarray(img)
    converted = False
    if img.ndim == 2:
        img = img[..., None]
    if img.dtype == np.uint16:  # the top 8 bits, as tf.io.decode_png(channels=3) reads a 16-bit PNG
        img, converted = (img >> 8).astype(np.uint8), True
    elif img.dtype != np.uint8:
        raise DataError(f"tfds images of dtype {img.dtype} are not supported: evalgap reads uint8 (or uint16) images.")
    channels = img.shape[-1]
    if channels in (1, 2):  # grayscale (with alpha): the gray channel in R, G and B, as Pillow's convert("RGB")
        img, converted = np.repeat(img[..., :1], 3, axis=-1), True
    elif channels == 4:  # RGBA: the alpha dropped, as Pillow's convert("RGB")
        img, converted = img[..., :3], True
    elif channels != 3:
        raise DataError(f"tfds images with {channels} channels are not supported: evalgap reads grayscale, RGB and RGBA images.")
    return img, converted


#: How to list the data sets tfds knows.
LIST_HINT = "python -c \"import tensorflow_datasets as tfds; print(tfds.list_builders())\""


def _not_found(name: str, exc: Exception) -> DataError:
    """A one-line DataError for a name ``tfds.builder`` refused: tfds's DatasetNotFoundError pastes every data set's
    name (hundreds of lines); they become a few close matches (difflib) and how to list them all. Other refusals (a
    config or version the data set lacks) keep tfds's words, on one line, cut at 400 characters."""
    import difflib
    import re

    text = str(exc)
    if any(t.__name__ == "DatasetNotFoundError" for t in type(exc).__mro__) or "Available datasets:" in text:
        known = re.findall(r"^\s*- ([\w./:-]+)\s*$", text.split("Available datasets:", 1)[-1], flags=re.M)
        if not known:
            try:
                import tensorflow_datasets as tfds

                known = list(tfds.list_builders())
            except Exception:  # no list to match against: the message without close matches
                known = []
        base = name.split(":")[0].split("/")[0].strip()
        close = difflib.get_close_matches(base.lower(), known, n=5, cutoff=0.6)
        near = f" Close names: {', '.join(close)}." if close else ""
        return DataError(f"tfds has no data set named {base!r}.{near} List them with {LIST_HINT} (or see "
                         "https://www.tensorflow.org/datasets/catalog/overview), or pass --data FOLDER.")
    said = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
    said = said if len(said) <= 400 else said[:400] + " ..."
    return DataError(f"tfds cannot make data set {name!r}: {said}")


def load_tfds(
    name: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool | None = None,
    image_size: int = 256,
    limit_per_class: int | None = None,
    skip_bad: bool = False,
) -> ImageSet:
    """Load an image classification data set from tfds, resized with padding to ``image_size``.

    ``download=None`` (default) downloads only when the data set is not prepared in
    ``data_dir`` and the network answers; ``False`` never downloads; ``True`` always tries.
    ``skip_bad`` leaves unreadable images of a manual archive out (:func:`load_image_folder`).
    """
    if manual_dir is not None:
        archive = _manual_archive(name, manual_dir)
        logger.info("reading the archive %s in place", archive)
        return load_image_folder(archive, image_size, limit_per_class=limit_per_class, skip_bad=skip_bad)
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DataError("tensorflow-datasets is not installed: pip install 'evalgap[tensorflow]', or pass --data FOLDER.") from exc
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    except Exception as exc:  # tfds raises its own DatasetNotFoundError
        raise _not_found(name, exc) from None
    prepared = builder.is_prepared()
    if not prepared:
        if download is False:
            raise DataError(f"tfds data set {name!r} is not prepared in {builder.data_dir} and download=False.")
        if download is None and not reachable():
            raise DataError(
                f"tfds data set {name!r} is not prepared in {builder.data_dir} and the network is unreachable "
                "(tfds would retry for minutes). Use a local copy instead: --data <folder with one sub-folder per "
                "class> (e.g. UCMerced_LandUse/Images), or put the official zip in a folder and pass "
                "--tfds-manual-dir <that folder>; or --download to try anyway."
            )
        try:
            builder.download_and_prepare()
        except Exception as exc:  # network errors, NonMatchingChecksumError, disk full, ...
            hint = (
                " The downloaded file does not match tfds's recorded checksum (a changed or truncated download): "
                "delete it from the downloads folder and retry, or use the official zip with --tfds-manual-dir."
                if "checksum" in f"{type(exc).__name__} {exc}".lower()
                else " Use a local copy instead: --data <folder> or --tfds-manual-dir <folder with the zip>."
            )
            raise DataError(f"tfds could not download and prepare {name!r} ({type(exc).__name__}: {exc}).{hint}") from exc
    ds = builder.as_dataset(split=split)
    names = builder.info.features["label"].names
    images, labels, count, converted = [], [], {}, 0
    for example in tfds.as_numpy(ds):
        label = int(example["label"])
        if limit_per_class is not None and count.get(label, 0) >= limit_per_class:
            continue
        count[label] = count.get(label, 0) + 1
        img, changed = _rgb(example["image"])
        converted += changed
        images.append(np.clip(np.rint(resize_with_pad(img, image_size, image_size)), 0, 255).astype(np.uint8))
        labels.append(label)
    if not images:
        raise DataError(f"tfds data set {name!r} split {split!r} is empty.")
    if converted:
        logger.warning("%d image(s) were not 8-bit RGB (grayscale, RGBA, 16-bit, ...) and were converted to it", converted)
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), list(names), f"tfds:{name}", converted)
