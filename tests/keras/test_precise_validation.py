"""The seed job's side measurement (PreciseValidation): when it measures, what it logs, what it leaves."""

from __future__ import annotations

import numpy as np
import pytest

import keras

from evalgap.seed.keras_callbacks import PreciseValidation


class Logs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append(dict(logs or {}))


def _model():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, name="d1")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.99, name="bn")(h)
    outputs = keras.layers.Dense(1, name="d2")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def test_measures_only_at_the_given_epochs_with_exact_statistics_and_leaves_training_alone():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 5)) * 3 + 2).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    model = _model()
    logs = Logs()
    fit = dict(batch_size=16, epochs=3, shuffle=False, verbose=0)
    model.fit(x, y, callbacks=[PreciseValidation((x, y), (x, y), batch_size=16, at=[2, 3]), logs], **fit)
    assert ["precise_val_loss" in row for row in logs.rows] == [False, True, True]

    keras.utils.set_random_seed(0)
    plain = _model()
    plain.fit(x, y, **fit)
    for a, b in zip(model.variables, plain.variables):  # moving statistics put back, trajectory untouched
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))

    # epoch 3's measurement, by hand in float64: BN's input is d1's output over all 64 rows (4 full batches)
    w1, b1 = (np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in model.get_layer("d1").weights)
    gamma, beta = (np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in model.get_layer("bn").weights[:2])
    w2, b2 = (np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in model.get_layer("d2").weights)
    h = x.astype(np.float64) @ w1 + b1
    eps = model.get_layer("bn").epsilon
    pred = ((h - h.mean(0)) / np.sqrt(h.var(0) + eps) * gamma + beta) @ w2 + b2
    assert logs.rows[2]["precise_val_loss"] == pytest.approx(float(np.mean((pred - y) ** 2)), rel=1e-4)
