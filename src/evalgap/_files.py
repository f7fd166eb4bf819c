"""Atomic file writes: a temporary file in the target's folder, then one rename.

A write that fails or is interrupted (even by Ctrl-C) leaves the previous file, if any,
untouched and no temporary file behind. The file written has the permissions ``open()``
would give a new file (``0o666`` less the umask), or those of the file it replaces.
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import Callable


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
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)
