"""A progress bar (rich) that can be switched off, shared by the adapters."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


def _interactive() -> bool:
    import sys

    if sys.stderr is not None and sys.stderr.isatty():
        return True
    return "ipykernel" in sys.modules  # Jupyter: rich draws the bar as a widget


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a transient rich bar on stderr when ``enabled`` and stderr is a terminal
    (or a notebook: rich renders it there)."""
    if not enabled or not _interactive():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
