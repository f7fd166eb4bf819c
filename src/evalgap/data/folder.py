"""Image folders in the layout of the official UC Merced archive: ``Images/<class>/<file>``.

Labels are the class folders in sorted order (the order tensorflow_datasets uses). Files
``.tif .tiff .jpg .jpeg .png`` are read with Pillow (tfds' ``ImageFolder`` cannot read
``.tif``, the archive's format), converted to RGB (grayscale, RGBA and 16-bit images are
converted, and counted), and brought to ``size x size`` with :func:`resize_with_pad` (the
seed's preprocessing), rounded to uint8. Images of more than 8 bits per sample (16-bit PNG
and TIFF, 32-bit integer TIFF) keep their top 8 bits, as ``tf.io.decode_png(channels=3)``
reads a 16-bit PNG (``value >> 8``); floating-point TIFFs are read as ``[0, 1]`` (or, where all
values lie in ``[0, 255]``, as 8-bit values). A ``.zip`` of such a folder (the official
``UCMerced_LandUse.zip``) is read in place, by the same rule as a folder: the class folders are
the sub-folders of ``Images``, ``UCMerced_LandUse/Images`` or the top level (a top level that
holds nothing but one folder of folders is that folder, as ``zip -r data.zip data/`` stores
it); a class is the folder just below them, and only the images directly in it are read
(sub-folders of a class folder and images beside the class folders are not, with a warning); a
class folder without an image is an error. Hidden entries (names starting with ``.``:
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
import zlib
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


class _FolderTree:
    """A folder on disk; places in it are tuples of names below it."""

    def __init__(self, path: Path):
        self.base = path

    def _path(self, parts: tuple[str, ...]) -> Path:
        return self.base.joinpath(*parts)

    def show(self, parts: tuple[str, ...]) -> str:
        return str(self._path(parts))

    def is_dir(self, parts: tuple[str, ...]) -> bool:
        return self._path(parts).is_dir()

    def folders(self, parts: tuple[str, ...]) -> list[str]:
        return sorted(p.name for p in self._path(parts).iterdir() if p.is_dir() and not _hidden(p.name))

    def images(self, parts: tuple[str, ...]) -> list[tuple[str, int, float]]:
        """(member, size, modification time) of the image files directly in ``parts``, by name."""
        found = []
        for f in sorted(self._path(parts).iterdir()):
            if f.suffix.lower() not in EXTENSIONS or _hidden(f.name) or f.is_dir():
                continue
            try:
                st = f.stat()
            except OSError:  # a dangling link (data not fetched by DVC or git-annex): its read fails, and says so
                st = os.stat_result((0,) * 10)
            found.append((str(f), st.st_size, st.st_mtime))
        return found


class _ZipTree:
    """The folders and files a zip's entry names make (``/`` or ``\\`` separated; folders named only by
    the files in them count); places are tuples of names below the zip's top level."""

    def __init__(self, zf: zipfile.ZipFile, path: Path):
        self.path = path
        self._folders: dict[tuple[str, ...], set[str]] = {(): set()}
        self._images: dict[tuple[str, ...], list[tuple[str, int, float]]] = {}
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            parts = tuple(p for p in name.split("/") if p not in ("", "."))
            if not parts or any(map(_hidden, parts)):
                continue
            folder = parts if name.endswith("/") else parts[:-1]
            for i in range(len(folder)):
                self._folders.setdefault(folder[:i], set()).add(folder[i])
                self._folders.setdefault(folder[: i + 1], set())
            if not name.endswith("/") and Path(parts[-1]).suffix.lower() in EXTENSIONS:
                self._images.setdefault(folder, []).append((info.filename, info.file_size, float(info.CRC)))

    def show(self, parts: tuple[str, ...]) -> str:
        return f"{'/'.join(parts)}/ in {self.path}" if parts else str(self.path)

    def is_dir(self, parts: tuple[str, ...]) -> bool:
        return parts in self._folders

    def folders(self, parts: tuple[str, ...]) -> list[str]:
        return sorted(self._folders.get(parts, ()))

    def images(self, parts: tuple[str, ...]) -> list[tuple[str, int, float]]:
        return sorted(self._images.get(parts, []), key=lambda e: Path(e[0].replace("\\", "/")).name)


def _find_root(tree) -> tuple[str, ...]:
    """The place whose sub-folders are the classes: ``Images``, ``UCMerced_LandUse/Images`` or the top level, the
    first that has sub-folders; where the top level holds one folder and no image is directly in it (a folder of
    folders, as ``zip -r data.zip data/`` stores it), that folder is looked in first. One rule for folders and zips."""
    top = tree.folders(())
    bases = [(top[0],), ()] if len(top) == 1 and not tree.images((top[0],)) else [()]
    for base in bases:
        for candidate in (base + ("Images",), base + ("UCMerced_LandUse", "Images"), base):
            if tree.is_dir(candidate) and tree.folders(candidate):
                return candidate
    raise DataError(f"{tree.show(())}: no class folders found; expected <folder>/<class>/<image> (or .../Images/<class>/<image>).")


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip" and not path.is_dir()


def _open_zip(path: Path) -> zipfile.ZipFile:
    """``zipfile.ZipFile(path)``, or a DataError that says what is wrong with the file."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a valid zip file (a truncated download?): {exc}. Download it again, "
                        "or pass the unzipped folder.") from exc
    except OSError as exc:
        raise DataError(f"cannot open {path} ({exc.strerror or exc}): check the path and its permissions.") from exc


def _listing(path: Path) -> tuple[list[tuple[str, str, int, float]], list[str]]:
    """[(member, class, size, mtime or CRC)], class names; from a folder or a zip, by the one rule of :func:`_find_root`."""
    if _is_zip(path):
        with _open_zip(path) as zf:
            tree = _ZipTree(zf, path)
    else:
        tree = _FolderTree(path)
    root = _find_root(tree)
    classes = tree.folders(root)
    entries = []
    nested = []
    for cls in classes:
        files = tree.images(root + (cls,))
        if not files:
            raise DataError(f"class folder {tree.show(root + (cls,))} holds no image ({', '.join(EXTENSIONS)}): remove it or add its images.")
        entries += [(member, cls, size, stamp) for member, size, stamp in files]
        nested += [f"{cls}/{sub}" for sub in tree.folders(root + (cls,))]
    if nested:
        logger.warning("%s: the images in sub-folders of class folders are not read (%s%s): a class's images lie directly in "
                       "its folder", tree.show(root), ", ".join(nested[:3]), ", ..." if len(nested) > 3 else "")
    beside = tree.images(root)
    if beside:
        logger.warning("%s: %d image(s) beside the class folders are not read (%s%s): an image belongs to the class folder "
                       "it lies in", tree.show(root), len(beside), ", ".join(Path(m.replace("\\", "/")).name for m, _, _ in beside[:3]),
                       ", ..." if len(beside) > 3 else "")
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
    zf = _open_zip(path) if _is_zip(path) else None
    try:
        from PIL import Image

        with progress_bar(f"decoding {len(entries)} images", len(entries)) as advance:
            n, converted = _decode_all(entries, zf, images, labels, label_of, image_size, skip_bad, skipped, advance, Image)
    finally:
        if zf is not None:
            zf.close()
    images, labels = images[:n], labels[:n]
    if converted:
        logger.warning("%d image(s) were not 8-bit RGB (grayscale, RGBA, 16-bit, ...) and were converted to it", converted)
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
                    if im.mode in WIDE_MODES:  # convert("RGB") would clip these at 255: scaled by the file's bit depth
                        converted += 1
                        arr = np.repeat(to_8bit(im)[..., None], 3, axis=-1)
                    else:
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


#: Pillow's one-channel modes of more than 8 bits per sample: 16-bit (PNG, TIFF, PGM), 32-bit integer and floating point.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(im) -> np.ndarray:
    """A one-channel image of more than 8 bits per sample (:data:`WIDE_MODES`) as uint8 ``(H, W)``.

    Integers keep their top 8 bits of the file's bit depth (``BitsPerSample`` of a TIFF, one less where its samples
    are signed, negative values 0; 16 bits otherwise: PNG, and PGM, which Pillow scales to 16 bits), as
    ``tf.io.decode_png(channels=3)`` reads a 16-bit PNG: ``value >> 8``. Floating point: ``[0, 1]`` is scaled to
    ``[0, 255]``; values already within ``[0, 255]`` (but not all within ``[0, 1]``) are taken as they are; others
    are refused (a ValueError: no bit depth says what they mean).
    """
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("a floating-point image with NaN or infinite values: save it with 8 or 16 bits per sample")
        low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            a = a * 255
        elif not (low >= 0 and high <= 255):
            raise ValueError(f"a floating-point image with values in [{low:g}, {high:g}], which is neither [0, 1] nor "
                             "[0, 255]: save it with 8 or 16 bits per sample")
        return np.rint(a).astype(np.uint8)
    bits = 16
    tags = getattr(im, "tag_v2", None)
    if tags is not None and im.format == "TIFF":
        declared = tags.get(258)  # BitsPerSample
        declared = declared[0] if isinstance(declared, tuple) else declared
        if isinstance(declared, int) and declared > 0:
            bits = declared
        sample_format = tags.get(339)  # SampleFormat: 1 unsigned, 2 signed, 3 floating point
        if (sample_format[0] if isinstance(sample_format, tuple) else sample_format) == 2:
            bits -= 1
    a = np.clip(a.astype(np.int64), 0, 2**bits - 1)
    a = a >> (bits - 8) if bits >= 8 else a * 255 // (2**bits - 1)
    return a.astype(np.uint8)


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
    """``x`` and ``y`` arrays from a ``.npz`` (keys ``x``/``y``, or ``images``/``labels``); a file that is no ``.npz``
    of plain arrays (not a zip, truncated, ``.npy``, pickled objects) is a DataError saying how to write one."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist.")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a .npz file: pass the file (np.savez(path, x=images, y=labels)), or the folder with --data.")

    def invalid(why: str) -> DataError:
        return DataError(f"{path} is not a valid .npz of numeric arrays ({why}): write one with "
                         "np.savez(path, x=images, y=labels), from NumPy arrays of numbers (no Python objects).")

    try:
        z = np.load(path, allow_pickle=False)
    except ValueError:  # neither a zip nor a .npy: NumPy takes it for a pickle
        raise invalid("not a zip archive of arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise invalid(f"unreadable: {exc}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise invalid(f"a single .npy array of shape {getattr(z, 'shape', '?')}, not named arrays x and y")
    with z:
        for xk, yk in (("x", "y"), ("images", "labels")):
            if xk in z and yk in z:
                try:
                    x, y = z[xk], z[yk]
                except ValueError as exc:
                    if "pickle" in str(exc):  # an object array: only pickle could read it
                        raise invalid(f"'{xk}' or '{yk}' holds Python objects, which are only readable as a pickle") from None
                    raise invalid(f"a damaged member: {exc}") from None
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                    raise invalid(f"a damaged member: {exc}") from None
                break
        else:
            raise DataError(f"{path} holds {list(z.keys())}; expected arrays named x and y (or images and labels).")
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{path}: x and y must hold one row per sample, got shapes {x.shape} and {y.shape}: "
                        "save arrays with a leading sample axis, np.savez(path, x=images, y=labels).")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}.")
    return x, y
