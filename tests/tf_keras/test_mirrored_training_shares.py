"""Under a MirroredStrategy, fit normalizes each replica's share of a batch by its own statistics: diagnose's
training mode and recalibrate's pass do the same (they ran the whole batch through one BN call)."""

from __future__ import annotations

import numpy as np
import pytest


def test_training_mode_and_statistics_are_those_of_the_replicas_shares():
    import tensorflow as tf
    import tf_keras as keras

    import evalgap.tf_keras as eg

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs 2 logical CPU devices, configured by conftest before TensorFlow starts (run tests/tf_keras alone)")
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (96, 8, 8, 3)) * np.linspace(1, 30, 96)[:, None, None, None]).astype("float32")  # shares differ
    y = (np.arange(96) % 3).astype("int64")
    # reductions through one device: collective all-reduces of several strategies in one process share instance keys
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())

    def make():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 3))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(6)(keras.layers.Flatten()(keras.layers.ReLU()(h))))
        m = keras.Model(inp, keras.layers.Dense(3)(h))
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return m

    with strategy.scope():
        mirrored = make()
    plain = make()
    plain.set_weights(mirrored.get_weights())
    # the reference: Keras's own training call on each replica's half of each batch of 32, as fit runs it
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    second_bn = [layer for layer in plain.layers if isinstance(layer, keras.layers.BatchNormalization)][1]
    its_input = keras.Model(plain.input, second_bn.input)
    losses, inputs = [], []
    for start in range(0, 96, 16):
        xs, ys = x[start:start + 16], y[start:start + 16]
        losses.append(ce(ys, plain(xs, training=True)).numpy())
        inputs.append(its_input(xs, training=True).numpy().astype(np.float64))
    report = eg.diagnose(mirrored, (x, y), batch_size=32, shuffle=False, progress=False)
    assert report.decompositions["loss"].values["Td"] == pytest.approx(float(np.concatenate(losses).mean()), rel=1e-5)
    assert report.decompositions["loss"].values["T"] == report.decompositions["loss"].values["Td"]  # no dropout
    result = eg.recalibrate(mirrored, x, batch_size=32, shuffle=False, progress=False)
    assert result.samples == 96 and all(layer.calls_per_batch == 1 for layer in result.layers)  # not "shared x2"
    written = [bn for _, bn in eg.find_batchnorms(mirrored)][1].moving_variance.numpy()
    np.testing.assert_allclose(written, np.concatenate(inputs).var(0), rtol=1e-5)  # whole batches: 17% off
