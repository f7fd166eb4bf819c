"""What TensorFlow logs while a block runs (its Python logger, ``tensorflow``), for tests that check evalgap makes it
say nothing alarming (e.g. its warning about functions re-traced in a loop)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def tensorflow_log() -> Iterator[list[str]]:
    """The messages TensorFlow logs inside the block, in a list filled as they come."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
