"""``evalgap.tf_keras.recalibrate(..., training_metrics=True)`` and ``PreciseBN(training_metrics=True)``
in Keras 2: the cases in ``tests/_training_metrics_cases.py``."""

from __future__ import annotations

import tf_keras as keras

import evalgap.tf_keras as eg

from .._training_metrics_cases import TrainingMetricsCases
from ._reference import snapshot


class TestKeras2(TrainingMetricsCases):
    keras, eg, snapshot = keras, eg, staticmethod(snapshot)
