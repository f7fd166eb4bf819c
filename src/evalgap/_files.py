"""Atomic file writes: a temporary file in the target's folder, then one rename.

A write that fails or is interrupted (even by Ctrl-C) leaves the previous file, if any,
untouched and no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, suffix: str = "") -> str:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path``; return ``path``.

    The temporary file lives in the target's folder (created if missing), so the rename is
    atomic on one file system. ``suffix`` keeps an extension that writers look at
    (``.npz``, ``.keras``, ``.png``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".evalgap-", suffix=suffix or ".tmp")
    os.close(fd)
    try:
        write(tmp)
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
