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


def models_in_a_row(keras, eg, count: int = 4):
    """``count`` small compiled models (BatchNorm, Dropout) trained, diagnosed and recalibrated one after another in
    this process, as in a notebook, with a ragged last batch (100 samples in batches of 32). Returns TensorFlow's log
    messages meanwhile, the last model, its report (taken before its recalibration) and the data."""
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.random((100, 8)).astype("float32"), rng.integers(0, 3, 100)
    layers = keras.layers
    with tensorflow_log() as messages:
        for _ in range(count):
            model = keras.Sequential([keras.Input(shape=(8,)), layers.Dense(16), layers.BatchNormalization(), layers.Dropout(0.2),
                                      layers.Dense(3, activation="softmax")])
            model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)
            report = eg.diagnose(model, (x, y), batch_size=32, progress=False)
            eg.recalibrate(model, (x, y), batch_size=32, drop_ragged=False, progress=False)
    return messages, model, report, (x, y)
