"""Atomic file writes: a temporary file in the target's folder, then one rename.

A write that fails or is interrupted (even by Ctrl-C) leaves the previous file, if any,
untouched and no temporary file behind. The file written has the permissions ``open()``
would give a new file (``0o666`` less the umask), or those of the file it replaces. A file
system error while writing (no permission, a folder or a file in the way, a read-only or
full disk) is raised as :class:`OutputError`, both an ``OSError`` and a ``DataError`` (the
command exits 2 with its message). :func:`check_writable` asks the same questions before the
work that produces the file.
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import Callable

from .errors import DataError


class OutputError(DataError, OSError):
    """A file cannot be written where asked. An ``OSError`` (``errno``, ``strerror`` and ``filename`` of the cause)
    and a :class:`~evalgap.errors.DataError`: the message names the path and what to do."""

    def __init__(self, message: str, cause: OSError | None = None):
        super().__init__(message)
        if cause is not None:
            self.errno, self.strerror, self.filename = cause.errno, cause.strerror, cause.filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _new_temporary(folder: str, suffix: str) -> str:
    """An empty file of a fresh name in ``folder``, created with mode ``0o666`` (the umask applies, as for ``open()``)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".evalgap-{secrets.token_hex(8)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file in {folder}: every name tried exists.")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, suffix: str = "") -> str:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path``; return ``path``.

    The temporary file lives in the target's folder (created if missing), so the rename is
    atomic on one file system. ``suffix`` keeps an extension that writers look at
    (``.npz``, ``.keras``, ``.png``). ``path`` gets the mode of the file it replaces, else
    that of a new file (``0o666`` less the umask).
    """
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "Is a directory", path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = _new_temporary(folder, suffix or ".tmp")
        try:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                mode = stat.S_IMODE(os.stat(tmp).st_mode)  # as the umask (and a default ACL) made it
            write(tmp)
            os.chmod(tmp, mode)  # also where the writer replaced the temporary file by one of its own
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OutputError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and os.path.abspath(os.fspath(exc.filename)) != os.path.abspath(path) else ""
        raise OutputError(f"cannot write {path}: {_reason(exc)}{where}. Give a file in a folder you can write to.", exc) from exc
    return path


def _nearest_existing(path: str) -> str:
    """``path`` or the closest folder above it that exists (what a write there would have to create its folders in)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str | os.PathLike, what: str, *, folder: bool = False, folder_exists: bool = False) -> None:
    """Raise :class:`OutputError` now, naming ``what`` (a flag: ``--json``), where ``path`` cannot be written: a file
    target that is an existing folder, a folder target that is a file, a file in the way of its folders, or a folder
    in which no file can be created (tried: a temporary file is created and removed, so permissions, read-only file
    systems and ``/proc`` answer as the real write would). Missing folders are not created; with ``folder_exists``
    a file target's folder must exist already (the command's reports and ``-o``: a mistyped folder is not made)."""
    path = os.fspath(path)
    if not folder and os.path.isdir(path):
        example = os.path.join(path, "name" + os.path.splitext(path.rstrip("/" + os.sep))[1])
        raise OutputError(f"{what} {path} is a folder: give a file name (e.g. {example}).")
    if folder and os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{what} {path} is a file, not a folder: give a folder to write to.")
    start = path if folder else os.path.dirname(os.path.abspath(path))
    existing = _nearest_existing(start)
    if not os.path.isdir(existing):
        raise OutputError(f"{what} {path}: {existing} is a file, not a folder, so nothing can be written below it; "
                          "choose another path.")
    if folder_exists and not folder and not os.path.isdir(start):
        raise OutputError(f"the folder of {what} {path} does not exist: create {start} first, or choose another path.")
    try:
        os.unlink(_new_temporary(existing, ".probe"))
    except OSError as exc:
        raise OutputError(f"{what} {path}: no file can be created in {existing} ({_reason(exc)}); choose a folder you "
                          "can write to.", exc) from exc


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)
