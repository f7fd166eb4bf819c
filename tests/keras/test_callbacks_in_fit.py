"""PreciseBN and GapMonitor inside fit: EMA weights, SwapEMAWeights, random augmentation, resumed runs, data they refuse."""

from __future__ import annotations

import random

import numpy as np
import pytest

import keras

import evalgap.keras as eg
from evalgap import DataError

BATCH, N = 32, 160  # 5 steps per epoch


def data(n=N, seed=0):
    r = np.random.RandomState(seed)
    x = (r.randn(n, 6) * 3 + 2).astype("float32")
    y = ((x[:, 0] + x[:, 1] > 4).astype("int32") + (x[:, 2] > 2).astype("int32"))
    return x, y


def tiny(optimizer=None, seed=1):
    """Dense-BN-Dense-BN-Dense, BN momentum 0.99."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name="bn1")(keras.layers.Dense(8)(inp)))
    h = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name="bn2")(keras.layers.Dense(8)(h)))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(h))
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def moving_stats(model):
    return [np.asarray(w) for name in ("bn1", "bn2") for w in model.get_layer(name).get_weights()[2:]]


def test_an_ema_optimizer_gets_statistics_of_the_weights_fit_swaps_in_at_its_end():
    """fit swaps the EMA weights in after the last epoch: PreciseBN's end-of-training run is for those weights."""
    x, y = data()
    xv, yv = data(64, seed=5)
    model = tiny(keras.optimizers.SGD(0.05, use_ema=True, ema_momentum=0.9))
    model.fit(x, y, batch_size=BATCH, epochs=3, validation_data=(xv, yv), verbose=0,
              callbacks=[eg.PreciseBN((x, y), batch_size=BATCH, shuffle=False, verbose=0)])
    after_fit, loss_after_fit = moving_stats(model), model.evaluate(xv, yv, batch_size=BATCH, verbose=0)[0]
    eg.recalibrate(model, (x, y), batch_size=BATCH, shuffle=False, progress=False)  # the reference, at the same weights
    for got, want in zip(after_fit, moving_stats(model)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert loss_after_fit == pytest.approx(model.evaluate(xv, yv, batch_size=BATCH, verbose=0)[0], rel=1e-5)


def test_with_swap_ema_weights_validation_runs_with_exact_statistics_of_the_ema_weights():
    """SwapEMAWeights stays ahead of PreciseBN (listed before or after it): val_* are exact for the weights validated."""
    x, y = data()
    xv, yv = data(64, seed=5)

    class Validated(keras.callbacks.Callback):  # the weights (and statistics) validation runs with
        def on_test_begin(self, logs=None):
            self.weights = self.model.get_weights()

    for listed in (lambda p: [p, keras.callbacks.SwapEMAWeights()], lambda p: [keras.callbacks.SwapEMAWeights(), p]):
        model = tiny(keras.optimizers.SGD(0.5, use_ema=True, ema_momentum=0.9))
        validated = Validated()
        history = model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(xv, yv), verbose=0,
                            callbacks=listed(eg.PreciseBN((x, y), batch_size=BATCH, shuffle=False, verbose=0)) + [validated])
        reference = tiny()
        reference.set_weights(validated.weights)
        eg.recalibrate(reference, (x, y), batch_size=BATCH, shuffle=False, progress=False)
        assert history.history["val_loss"][-1] == pytest.approx(reference.evaluate(xv, yv, batch_size=BATCH, verbose=0)[0], rel=1e-5)


def test_precise_bn_goes_right_behind_swap_ema_weights_and_moves_no_other_callback():
    """A callback listed before SwapEMAWeights (a checkpoint of the raw weights) stays before it; PreciseBN runs right
    after the swap, whatever its place in the list (SwapEMAWeights was moved to the front, ahead of the user's)."""
    x, y = data()
    order = []

    class Swap(keras.callbacks.SwapEMAWeights):
        def on_test_begin(self, logs=None):
            order.append("swap")
            super().on_test_begin(logs)

    class First(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            order.append("first")

    class Precise(eg.PreciseBN):
        def on_test_begin(self, logs=None):
            order.append("precise")
            super().on_test_begin(logs)

    model = tiny(keras.optimizers.SGD(0.5, use_ema=True, ema_momentum=0.9))
    model.fit(x, y, batch_size=BATCH, epochs=1, validation_data=(x, y), verbose=0,
              callbacks=[First(), Swap(), Precise((x, y), batch_size=BATCH, verbose=0)])
    assert order == ["first", "swap", "precise"]


class Augmenting(keras.utils.PyDataset):
    """Batches with noise from NumPy's and Python's global random states, as everyday augmentation draws it."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // BATCH

    def __getitem__(self, i):
        xb = self.x[i * BATCH : (i + 1) * BATCH]
        noise = np.random.normal(0, 0.5, xb.shape) * random.uniform(0.5, 1.5)
        return (xb + noise).astype("float32"), self.y[i * BATCH : (i + 1) * BATCH]


def test_the_callbacks_leave_global_random_states_so_augmentation_draws_what_it_would_without_them():
    """A PyDataset augmenting with np.random / random, read by the callbacks too: training identical to a fit without them."""
    x, y = data()
    xv, yv = data(64, seed=5)
    final = {}
    for name in ("none", "precise_bn", "gap_monitor"):
        model = tiny()
        np.random.seed(123)
        random.seed(123)
        train = Augmenting(x, y)
        callbacks = {"none": [], "precise_bn": [eg.PreciseBN(train, verbose=0)], "gap_monitor": [eg.GapMonitor(train, max_samples=64, verbose=0)]}[name]
        model.fit(train, epochs=3, validation_data=(xv, yv), verbose=0, callbacks=callbacks)
        final[name] = [np.asarray(w) for w in model.trainable_weights]
    for name in ("precise_bn", "gap_monitor"):
        for got, want in zip(final[name], final["none"]):
            np.testing.assert_array_equal(got, want, err_msg=name)


def _updates(report):
    found = [f.numbers for f in report.findings if f.numbers and "updates" in f.numbers]
    assert found, [f.message for f in report.findings]
    return found[0]


def test_gap_monitor_on_resumed_training_counts_the_steps_of_earlier_fits():
    """A fresh GapMonitor in fit(initial_epoch=3): 4 epochs x 5 steps = 20 BN updates, as diagnose told the run says."""
    x, y = data()
    model = tiny()
    model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
    monitor = eg.GapMonitor((x, y), batch_size=BATCH, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=4, initial_epoch=3, verbose=0, callbacks=[monitor])
    reference = eg.diagnose(model, (x, y), batch_size=BATCH, steps_per_epoch=5, epochs=4, progress=False)
    assert monitor.updates == 4 * (N // BATCH)
    got, want = _updates(monitor.last), _updates(reference)
    assert got["updates"] == want["updates"] == 20
    assert got["initial_weight"] == pytest.approx(want["initial_weight"]) == pytest.approx(0.99**20)


def test_gap_monitor_every_2_on_data_of_unknown_length_reports_one_epoch_of_steps():
    """Steps per epoch counted on data of unknown length are one epoch's, whatever ``every``: the same as every=1."""
    tf = pytest.importorskip("tensorflow")
    x, y = data()
    unknown = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(BATCH)
    reported = {}
    for every in (1, 2):
        monitor = eg.GapMonitor(unknown, every=every, verbose=0)
        tiny().fit(unknown, epochs=2, verbose=0, callbacks=[monitor])
        found = [f.numbers for f in monitor.last.findings if f.numbers and "steps_per_epoch" in f.numbers]
        reported[every] = found[0]["steps_per_epoch"]
    assert reported[2] == reported[1] == N // BATCH


def test_gap_monitor_refuses_a_generator_at_construction_as_precise_bn_does():
    """From the generator fit trains on, GapMonitor's probe would take fit's batches: refused, as PreciseBN refuses it."""
    x, y = data()

    def batches():
        while True:
            for i in range(0, N, BATCH):
                yield x[i : i + BATCH], y[i : i + BATCH]

    with pytest.raises(DataError, match="PreciseBN.*generator"):
        eg.PreciseBN(batches(), verbose=0)
    with pytest.raises(DataError, match="GapMonitor.*generator"):
        eg.GapMonitor(batches(), verbose=0)


def test_precise_bn_refuses_data_that_repeat_forever_without_max_samples_at_construction():
    """As diagnose does (same message): not at the first validation; with max_samples it is accepted."""
    tf = pytest.importorskip("tensorflow")
    x, y = data()
    forever = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    with pytest.raises(DataError, match="repeat forever.*max_samples") as engine_error:
        eg.diagnose(tiny(), forever, progress=False)
    with pytest.raises(DataError, match="repeat forever.*max_samples=") as callback_error:
        eg.PreciseBN(forever, verbose=0)
    assert str(engine_error.value).split(":")[0] in str(callback_error.value)
    eg.PreciseBN(forever, max_samples=N, verbose=0)
