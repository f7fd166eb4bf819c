"""``evalgap.keras.recalibrate(..., training_metrics=True)`` and ``PreciseBN(training_metrics=True)``
on every Keras 3 backend: the cases in ``tests/_training_metrics_cases.py``, plus a model whose
BatchNorm calls depend on the batch shape (a compiled step reused across shapes)."""

from __future__ import annotations

import pytest

import keras

import evalgap
import evalgap.keras as eg

from .._training_metrics_cases import BATCH, CLASSES, TrainingMetricsCases, _data
from ._reference import snapshot


class TestKeras3(TrainingMetricsCases):
    keras, eg, snapshot = keras, eg, staticmethod(snapshot)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="a compiled step reused across shapes (jax.jit); eager torch retraces nothing")
def test_a_model_whose_bn_calls_depend_on_the_batch_shape_gets_a_clear_error_and_is_left_as_it_was():
    class ShapeDependent(keras.Model):
        def __init__(self):
            super().__init__()
            self.d, self.bn, self.out = keras.layers.Dense(8), keras.layers.BatchNormalization(), keras.layers.Dense(CLASSES)

        def call(self, x, training=None):
            h = self.bn(self.d(x), training=training)
            if x.shape[0] is not None and x.shape[0] < BATCH:  # small batches go through the BN twice
                h = self.bn(h, training=training)
            return self.out(h)

    model = ShapeDependent()
    x, _ = _data()
    model(x[:BATCH])
    before = snapshot(model)
    with pytest.raises(evalgap.ModelError, match="differ between input shapes"):
        eg.recalibrate(model, [x[:BATCH], x[BATCH:BATCH + 4], x[BATCH:2 * BATCH]], drop_ragged=False, progress=False)
    assert snapshot(model) == before
