"""Keras 2's fit calls its callbacks inside the strategy's scope: GapMonitor and PreciseBN(training_metrics=True)
measure there under a MirroredStrategy (their fresh metric objects made replicated variables that refuse
``assign_add`` outside a replica: every epoch failed)."""

from __future__ import annotations

import numpy as np
import pytest


def test_gap_monitor_and_training_metrics_in_a_mirrored_fit_equal_a_diagnosis_outside_the_scope():
    import tensorflow as tf
    import tf_keras as keras

    import evalgap.tf_keras as eg

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs 2 logical CPU devices, configured by conftest before TensorFlow starts (run tests/tf_keras alone)")
    rng = np.random.default_rng(0)
    x = rng.normal(50, 20, (64, 6)).astype("float32")
    y = (x[:, 0] > 50).astype("int64")
    # reductions through one device: collective all-reduces of several strategies in one process share instance keys
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(8)(inp))
        m = keras.Model(inp, keras.layers.Dense(2)(h))
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    monitor = eg.GapMonitor((x, y), batch_size=16, max_samples=64, verbose=0)
    precise = eg.PreciseBN((x, y), batch_size=16, training_metrics=True)
    history = m.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor, precise])
    assert "train_mode_accuracy" in history.history and "gap_bn_stale" in history.history
    # the monitor's last measurement (after the last epoch, before PreciseBN wrote) against diagnose outside the scope,
    # at the same weights: P does not depend on the moving statistics PreciseBN wrote since
    outside = eg.diagnose(m, (x, y), batch_size=16, max_samples=64, progress=False)
    for key, d in outside.decompositions.items():
        assert monitor.last.decompositions[key].values["P"] == pytest.approx(d.values["P"], rel=1e-5), key
        assert monitor.last.decompositions[key].values["Td"] == pytest.approx(d.values["Td"], rel=1e-5), key
