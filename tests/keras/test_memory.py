"""Memory stays bounded by about one batch plus per-channel state, however many batches."""

from __future__ import annotations

import resource

import keras
import numpy as np
from keras import layers

import evalgap.keras as eg


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def test_many_batches_from_a_generator():
    model = keras.Sequential([keras.Input((32, 32, 3)), layers.Conv2D(8, 3), layers.BatchNormalization(), layers.GlobalAveragePooling2D(), layers.BatchNormalization()])

    def batches(n):
        rng = np.random.default_rng(1)
        for _ in range(n):
            yield rng.normal(5, 10, (64, 32, 32, 3)).astype("float32")  # 0.79 MB a batch

    eg.recalibrate(model, batches(40), progress=False)  # warm-up: compilation, allocator pools
    before = _max_rss_mb()
    result = eg.recalibrate(model, batches(800), progress=False)  # 630 MB if anything kept them
    grown = _max_rss_mb() - before
    assert result.batches == 800 and result.samples == 51200
    assert grown < 150, f"peak memory grew by {grown:.0f} MB over 800 batches"
