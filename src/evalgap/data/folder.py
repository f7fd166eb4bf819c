"""Image folders in the layout of the official UC Merced archive: ``Images/<class>/<file>``.

Labels are the class folders in sorted order (the order tensorflow_datasets uses). Files
``.tif .tiff .jpg .jpeg .png`` are read with Pillow (tfds' ``ImageFolder`` cannot read
``.tif``, the archive's format), converted to RGB (grayscale and RGBA are converted, and
counted), and brought to ``size x size`` with :func:`resize_with_pad` (the seed's
preprocessing), rounded to uint8. A ``.zip`` of such a folder (the official
``UCMerced_LandUse.zip``) is read in place. Hidden entries (names starting with ``.``:
``.ipynb_checkpoints/``, macOS ``._*`` files) and ``__MACOSX/`` are skipped, files and
folders, as ``keras.utils.image_dataset_from_directory`` and tfds skip them.

Decoding happens once: the arrays are cached in ``$EVALGAP_CACHE`` (default
``~/.cache/evalgap``) under a key made of every file's path, size and modification time and
the image size, written atomically; later epochs and runs load the cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._files import atomic_write
from .._progress import progress_bar
from ..errors import DataError
from .resize import resize_with_pad

logger = logging.getLogger("evalgap.data")

EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png")


@dataclass
class ImageSet:
    """Decoded images (uint8, NHWC), labels (int64) and class names in label order."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str
    converted: int = 0
    skipped: list[str] = field(default_factory=list)
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.labels)


def _cache_dir() -> Path:
    return Path(os.environ.get("EVALGAP_CACHE", Path.home() / ".cache" / "evalgap"))


def _hidden(name: str) -> bool:
    """A name the loader skips: hidden (``.ipynb_checkpoints``, macOS ``._x.png``) or macOS's zip folder ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


def _class_folders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not _hidden(p.name)]


def _find_root(path: Path) -> Path:
    """The folder whose sub-folders are the classes (``Images`` in the official layout)."""
    for candidate in (path / "Images", path / "UCMerced_LandUse" / "Images", path):
        if candidate.is_dir() and _class_folders(candidate):
            return candidate
    raise DataError(f"{path}: no class folders found; expected <folder>/<class>/<image> (or .../Images/<class>/<image>).")


def _listing(path: Path) -> tuple[list[tuple[str, str, int, float]], list[str]]:
    """[(member, class, size, mtime)], class names; from a folder or a zip."""
    entries = []
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                parts = Path(info.filename).parts
                if info.is_dir() or len(parts) < 2 or any(map(_hidden, parts)) or Path(info.filename).suffix.lower() not in EXTENSIONS:
                    continue
                entries.append((info.filename, parts[-2], info.file_size, float(info.CRC)))
        entries.sort(key=lambda e: (e[1], Path(e[0]).name))  # as a folder lists them: by class, then file name
        classes = sorted({e[1] for e in entries})
    else:
        root = _find_root(path)
        classes = sorted(p.name for p in _class_folders(root))
        for cls in classes:
            files = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in EXTENSIONS and not _hidden(f.name))
            if not files:
                raise DataError(f"class folder {root / cls} holds no image ({', '.join(EXTENSIONS)}): remove it or add its images.")
            for f in files:
                try:
                    st = f.stat()
                except OSError:  # a dangling link (data not fetched by DVC or git-annex): its read fails, and says so
                    st = os.stat_result((0,) * 10)
                entries.append((str(f), cls, st.st_size, st.st_mtime))
    if not entries:
        raise DataError(f"{path}: no image files ({', '.join(EXTENSIONS)}) found.")
    return entries, classes


def load_image_folder(
    path: str | os.PathLike,
    image_size: int = 256,
    *,
    limit_per_class: int | None = None,
    cache: bool = True,
    skip_bad: bool = False,
) -> ImageSet:
    """Read ``path`` (folder or zip) into uint8 arrays of ``image_size x image_size x 3``.

    ``skip_bad=True`` leaves unreadable files out (listed in ``skipped``); otherwise the
    first one raises :class:`evalgap.DataError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: pass the folder that holds one sub-folder per class (or the archive's .zip).")
    entries, classes = _listing(path)
    if limit_per_class is not None:
        kept, count = [], {}
        for e in entries:
            if count.get(e[1], 0) < limit_per_class:
                kept.append(e)
                count[e[1]] = count.get(e[1], 0) + 1
        entries = kept
    key = hashlib.sha256(repr((image_size, skip_bad, [e[0:4] for e in entries])).encode()).hexdigest()[:24]
    cache_file = _cache_dir() / f"images-{key}.npz"
    if cache and cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as z:
            return ImageSet(z["images"], z["labels"], list(z["classes"]), str(path), int(z["converted"]), list(z["skipped"]), True)

    label_of = {c: i for i, c in enumerate(classes)}
    images = np.zeros((len(entries), image_size, image_size, 3), dtype=np.uint8)
    labels = np.zeros(len(entries), dtype=np.int64)
    skipped: list[str] = []
    zf = zipfile.ZipFile(path) if path.suffix.lower() == ".zip" else None
    try:
        from PIL import Image

        with progress_bar(f"decoding {len(entries)} images", len(entries)) as advance:
            n, converted = _decode_all(entries, zf, images, labels, label_of, image_size, skip_bad, skipped, advance, Image)
    finally:
        if zf is not None:
            zf.close()
    images, labels = images[:n], labels[:n]
    if converted:
        logger.warning("%d image(s) were not RGB (grayscale, RGBA, ...) and were converted to RGB", converted)
    result = ImageSet(images, labels, classes, str(path), converted, skipped)
    if cache:
        _save_cache(cache_file, result)
    return result


def _decode_all(entries, zf, images, labels, label_of, image_size, skip_bad, skipped, advance, Image) -> tuple[int, int]:
    """Decode, convert to RGB and resize every entry into ``images``; return (images kept, converted).
    Pillow's warnings about damaged files are not printed: a file it cannot read is an error or skipped."""
    n = converted = 0
    for member, cls, _, _ in entries:
        advance(1)
        try:
            raw = zf.read(member) if zf is not None else Path(member).read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                with Image.open(io.BytesIO(raw)) as im:
                    if im.mode != "RGB":
                        converted += 1
                        im = im.convert("RGB")
                    arr = np.asarray(im)
        except Exception as exc:  # Pillow raises many types on corrupt data
            if skip_bad:
                skipped.append(member)
                continue
            where = f"{member} in {zf.filename}" if zf is not None else member
            raise DataError(f"cannot read image {where}: {exc}. Fix or remove the file, or pass skip_bad=True (--skip-bad).") from exc
        images[n] = np.clip(np.rint(resize_with_pad(arr, image_size, image_size)), 0, 255).astype(np.uint8)
        labels[n] = label_of[cls]
        n += 1
    return n, converted


def _save_cache(cache_file: Path, s: ImageSet) -> None:
    try:
        atomic_write(
            cache_file,
            lambda tmp: np.savez(tmp, images=s.images, labels=s.labels, classes=np.array(s.class_names), converted=s.converted,
                                 skipped=np.array(s.skipped, dtype=str)),
            suffix=".npz",
        )
    except OSError as exc:  # a cache that cannot be written only costs time
        logger.warning("could not write the image cache %s: %s", cache_file, exc)


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` arrays from a ``.npz`` (keys ``x``/``y``, or ``images``/``labels``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist.")
    with np.load(path, allow_pickle=False) as z:
        for xk, yk in (("x", "y"), ("images", "labels")):
            if xk in z and yk in z:
                x, y = z[xk], z[yk]
                break
        else:
            raise DataError(f"{path} holds {list(z.keys())}; expected arrays named x and y (or images and labels).")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}.")
    return x, y
