"""Image folders in the layout of the official UC Merced archive: ``Images/<class>/<file>``.

Labels are the class folders in sorted order (the order tensorflow_datasets uses). Files
``.tif .tiff .jpg .jpeg .png .bmp .gif`` (and ``.webp`` where Pillow reads it) are read with
Pillow (tfds' ``ImageFolder`` cannot read ``.tif``, the archive's format; a GIF gives its first
frame, as ``keras.utils.image_dataset_from_directory`` reads it; other files in a class folder
are left out, counted in a warning), converted to RGB (grayscale, RGBA, palette and 16-bit images
are converted, and counted), and brought to ``size x size`` with :func:`resize_with_pad` (the
seed's preprocessing), rounded to uint8. Images of more than 8 bits per sample (16-bit PNG
and TIFF, 32-bit integer TIFF) keep their top 8 bits, as ``tf.io.decode_png(channels=3)``
reads a 16-bit PNG (``value >> 8``); floating-point TIFFs are read as ``[0, 1]`` (or, where all
values lie in ``[0, 255]``, as 8-bit values). A ``.zip`` of such a folder (the official
``UCMerced_LandUse.zip``) is read in place, by the same rule as a folder: the class folders are
the sub-folders of ``Images``, ``UCMerced_LandUse/Images`` or the top level (a top level that
holds nothing but one folder of folders is that folder, as ``zip -r data.zip data/`` stores
it); a class is the folder just below them, and only the images directly in it are read
(sub-folders of a class folder and images beside the class folders are not, with a warning); a
class folder without an image is an error (where the would-be class folders hold folders, not
images, the error says so and names the folders below that hold class folders). Hidden entries (names starting with ``.``:
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



def _extensions() -> tuple[str, ...]:
    """The image files read: the archive's ``.tif``, what ``keras.utils.image_dataset_from_directory`` reads (``.jpg``,
    ``.jpeg``, ``.png``, ``.bmp``, ``.gif``) and ``.webp`` where this Pillow reads it."""
    found = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp", ".gif")
    try:
        from PIL import features

        if features.check("webp"):
            found += (".webp",)
    except Exception:  # an old or partial Pillow: no WebP
        pass
    return found


EXTENSIONS = _extensions()

#: How many levels below a folder of folders of folders the loader looks for the class folders it could mean.
_SEARCH_DEPTH = 4


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

    def others(self, parts: tuple[str, ...]) -> list[str]:
        """The names of the files directly in ``parts`` that are not images read here (not hidden), by name."""
        return sorted(f.name for f in self._path(parts).iterdir()
                      if f.suffix.lower() not in EXTENSIONS and not _hidden(f.name) and not f.is_dir())

    def has_images(self, parts: tuple[str, ...]) -> bool:
        """Whether an image file lies directly in ``parts`` (stops at the first)."""
        try:
            return any(f.suffix.lower() in EXTENSIONS and not _hidden(f.name) and not f.is_dir() for f in self._path(parts).iterdir())
        except OSError:
            return False


class _ZipTree:
    """The folders and files a zip's entry names make (``/`` or ``\\`` separated; folders named only by
    the files in them count); places are tuples of names below the zip's top level."""

    def __init__(self, zf: zipfile.ZipFile, path: Path):
        self.path = path
        self._folders: dict[tuple[str, ...], set[str]] = {(): set()}
        self._images: dict[tuple[str, ...], list[tuple[str, int, float]]] = {}
        self._others: dict[tuple[str, ...], list[str]] = {}
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            parts = tuple(p for p in name.split("/") if p not in ("", "."))
            if not parts or any(map(_hidden, parts)):
                continue
            folder = parts if name.endswith("/") else parts[:-1]
            for i in range(len(folder)):
                self._folders.setdefault(folder[:i], set()).add(folder[i])
                self._folders.setdefault(folder[: i + 1], set())
            if name.endswith("/"):
                continue
            if Path(parts[-1]).suffix.lower() in EXTENSIONS:
                self._images.setdefault(folder, []).append((info.filename, info.file_size, float(info.CRC)))
            else:
                self._others.setdefault(folder, []).append(parts[-1])

    def show(self, parts: tuple[str, ...]) -> str:
        return f"{'/'.join(parts)}/ in {self.path}" if parts else str(self.path)

    def is_dir(self, parts: tuple[str, ...]) -> bool:
        return parts in self._folders

    def folders(self, parts: tuple[str, ...]) -> list[str]:
        return sorted(self._folders.get(parts, ()))

    def images(self, parts: tuple[str, ...]) -> list[tuple[str, int, float]]:
        return sorted(self._images.get(parts, []), key=lambda e: Path(e[0].replace("\\", "/")).name)

    def others(self, parts: tuple[str, ...]) -> list[str]:
        return sorted(self._others.get(parts, []))

    def has_images(self, parts: tuple[str, ...]) -> bool:
        return bool(self._images.get(parts))


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
    files_of = {cls: tree.images(root + (cls,)) for cls in classes}
    if not all(files_of.values()):
        raise _no_image_error(tree, root, [cls for cls in classes if not files_of[cls]], len(classes))
    entries = []
    nested = []
    left_out = []
    for cls in classes:
        entries += [(member, cls, size, stamp) for member, size, stamp in files_of[cls]]
        nested += [f"{cls}/{sub}" for sub in tree.folders(root + (cls,))]
        left_out += [f"{cls}/{name}" for name in tree.others(root + (cls,))]
    if left_out:
        logger.warning("%s: %d file(s) in the class folders are left out, not being images of a kind read here (%s%s); "
                       "the images read are %s", tree.show(root), len(left_out), ", ".join(left_out[:3]),
                       ", ..." if len(left_out) > 3 else "", " ".join(EXTENSIONS))
    if nested:
        logger.warning("%s: the images in sub-folders of class folders are not read (%s%s): a class's images lie directly in "
                       "its folder", tree.show(root), ", ".join(nested[:3]), ", ..." if len(nested) > 3 else "")
    beside = tree.images(root)
    if beside:
        logger.warning("%s: %d image(s) beside the class folders are not read (%s%s): an image belongs to the class folder "
                       "it lies in", tree.show(root), len(beside), ", ".join(Path(m.replace("\\", "/")).name for m, _, _ in beside[:3]),
                       ", ..." if len(beside) > 3 else "")
    return entries, classes


def _names(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _class_roots(tree, start: tuple[str, ...], budget: int = 400) -> list[tuple[str, ...]]:
    """The folders below ``start`` (breadth first, at most :data:`_SEARCH_DEPTH` levels, ``budget`` folders looked at)
    every sub-folder of which holds images directly: folders of class folders, which the loader reads as given."""
    found, level = [], [start]
    for _ in range(_SEARCH_DEPTH):
        below = []
        for parent in level:
            for name in tree.folders(parent):
                place = parent + (name,)
                budget -= 1
                if budget < 0:
                    return found
                subs = tree.folders(place)
                if subs and all(tree.has_images(place + (sub,)) for sub in subs):
                    found.append(place)
                else:
                    below.append(place)
        level = below
    return found


def _no_image_error(tree, root: tuple[str, ...], empty: list[str], count: int) -> DataError:
    """The error for class folders without an image: where none of them holds an image and they hold folders (a
    train/ and val/ folder, a folder given one level too high), that, with the folders of class folders found below."""
    kinds = ", ".join(EXTENSIONS)
    with_folders = [cls for cls in empty if tree.folders(root + (cls,))]
    if len(empty) < count or not with_folders:  # a class among classes, or an empty folder: not a misplaced root
        cls = with_folders[0] if with_folders else empty[0]
        place = tree.show(root + (cls,))
        if with_folders:
            return DataError(f"class folder {place} holds folders ({_names(tree.folders(root + (cls,)))}), not images "
                             f"({kinds}): a class's images lie directly in its folder; move them there, or remove the folder.")
        others = tree.others(root + (cls,))
        holds = f"; it holds {_names(others)}" if others else ""
        return DataError(f"class folder {place} holds no image ({kinds}){holds}: remove it or add its images.")
    if len(with_folders) == len(empty):
        said = f"its sub-folders ({_names(empty)}) hold folders, not images, so they are not class folders"
    else:
        said = (f"none of its sub-folders ({_names(empty)}) holds an image ({kinds}), so none is a class folder "
                f"({_names(with_folders)} hold{'s' if len(with_folders) == 1 else ''} folders)")
    found = _class_roots(tree, root)
    if not found:
        return DataError(f"{tree.show(root)}: {said}, and no folder up to {_SEARCH_DEPTH} levels below it holds class folders "
                         f"of images: pass the folder that holds one sub-folder of images per class.")
    if isinstance(tree, _ZipTree):
        inside = ["/".join(place) for place in found]
        return DataError(f"{tree.show(root)}: {said}. The class folders are lower, in {_names([f'{i}/' for i in inside])} of "
                         f"the zip: unzip it and pass the folder that holds them (--data <unzipped>/{inside[0]}), or zip that "
                         "folder alone.")
    shown = [tree.show(place) for place in found]
    also = f" (found {len(shown)}: {_names(shown)})" if len(shown) > 1 else ""
    return DataError(f"{tree.show(root)}: {said}. The class folders are lower: pass the folder that holds them, "
                     f"--data {shown[0]}{also}.")


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
