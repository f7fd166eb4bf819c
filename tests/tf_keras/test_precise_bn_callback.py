"""The Keras 2 callbacks: the seed's symptom in miniature closed by PreciseBN; GapMonitor's logs; nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras
from tf_keras import layers

import evalgap.tf_keras as eg

from ._reference import snapshot

pytest.importorskip("sklearn")
from evalgap.data import load_digits_rgb  # noqa: E402

BATCH = 120


def small_resnet(classes=10, momentum=0.99, width=8) -> keras.Model:
    """The seed's recipe at toy size in Keras 2: raw 0..255 inputs, BN momentum 0.99, Adam, sparse CE, accuracy."""

    def bn():
        return layers.BatchNormalization(momentum=momentum)

    inp = keras.Input((16, 16, 3))
    x = layers.ReLU()(bn()(layers.Conv2D(width, 3, padding="same", use_bias=False)(inp)))
    for filters in (2 * width, 4 * width):
        y = layers.ReLU()(bn()(layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)))
        y = bn()(layers.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        s = bn()(layers.Conv2D(filters, 1, strides=2, use_bias=False)(x))
        x = layers.ReLU()(layers.Add()([y, s]))
    model = keras.Model(inp, layers.Dense(classes, activation="softmax")(layers.GlobalAveragePooling2D()(x)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class TrainingModeAccuracy(keras.callbacks.Callback):
    """After each epoch: accuracy with BN on batch statistics (eager ``training=True``), at the
    epoch's final weights; every variable restored afterwards."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.values = x, y, []

    def on_epoch_end(self, epoch, logs=None):
        saved = [(v, v.numpy()) for v in self.model.variables]
        correct = 0
        for i in range(0, len(self.x), BATCH):
            p = np.asarray(self.model(self.x[i : i + BATCH], training=True))
            correct += int((p.argmax(1) == self.y[i : i + BATCH]).sum())
        for v, value in saved:
            v.assign(value)
        self.values.append(correct / len(self.x))


@pytest.fixture(scope="module")
def digits():
    """1680 shuffled raw 0..255 digits: 14 whole batches of 120 (a ragged last batch crashes oneDNN in fit, docs/decisions.md)."""
    x, y = load_digits_rgb(16)
    order = np.random.default_rng(0).permutation(len(x))[:1680]
    return x[order].astype("float32"), y[order]


def test_seed_in_miniature_without_and_with_precise_bn(digits):
    x, y = digits
    runs = {}
    for name, extra in (("plain", []), ("precise", [eg.PreciseBN((x, y), batch_size=BATCH, verbose=0)])):
        keras.utils.set_random_seed(1)
        model = small_resnet()
        probe = TrainingModeAccuracy(x, y)
        history = model.fit(x, y, batch_size=BATCH, epochs=3, validation_data=(x, y), callbacks=extra + [probe], verbose=0, shuffle=False)
        runs[name] = (history.history, probe.values)
    plain, _ = runs["plain"]
    assert plain["accuracy"][-1] - plain["val_accuracy"][-1] > 0.3, plain  # the symptom: train == validation data
    precise, train_mode = runs["precise"]
    assert train_mode[-1] > 0.6
    for epoch, (val, tm) in enumerate(zip(precise["val_accuracy"], train_mode)):
        assert abs(val - tm) <= 0.02, (epoch, val, tm)  # validation now tells the truth
    assert all(s > 0 for s in precise["precise_bn_seconds"])
    assert precise["loss"] == pytest.approx(plain["loss"], rel=1e-4)  # the same training: moving statistics never feed the gradient


def test_runs_before_validation_and_gap_monitor_changes_nothing(digits, capsys):
    x, y = digits
    x, y = x[:480], y[:480]
    events = []

    class Spy(eg.PreciseBN):
        def _run(self):
            events.append(("recalibrate", self._epoch))
            super()._run()

    class Order(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            events.append(("validation", None))

    keras.utils.set_random_seed(1)
    model = small_resnet(momentum=0.999, width=4)
    monitor = eg.GapMonitor((x, y), batch_size=BATCH, max_samples=256)
    history = model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(x, y), callbacks=[monitor], verbose=0)
    h = history.history
    assert monitor.updates == 8 and monitor.last.samples == 240  # 2 whole batches of 120 in 256
    assert set(h) >= {"gap_bn_stale", "gap_batch_stats", "precise_val_accuracy", "precise_val_loss"}
    assert h["gap_bn_stale"][-1] > 0.05 and h["precise_val_accuracy"][-1] > h["val_accuracy"][-1]  # 8 updates at momentum 0.999
    assert "distorted by stale BatchNorm statistics" in capsys.readouterr().out
    before = snapshot(model)
    monitor.on_epoch_end(1, {})
    assert snapshot(model) == before

    model.fit(x, y, batch_size=BATCH, epochs=1, validation_data=(x, y), callbacks=[Spy((x, y), batch_size=BATCH, verbose=0), Order()], verbose=0)
    assert events == [("recalibrate", 0), ("validation", None)]
    assert eg.recalibrate(model, (x, y), batch_size=BATCH, progress=False).max_drift < 1e-4  # PreciseBN left exact statistics


def test_gap_monitor_counts_every_step_of_an_execution():
    """steps_per_execution=4: one on_train_batch_end per 4 steps, each step a BN update (it counted a quarter)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32") * 3 + 5, rng.integers(0, 2, 64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(6), layers.BatchNormalization(), layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=4)
    monitor = eg.GapMonitor((x, y), batch_size=8, max_samples=16, verbose=0)
    model.fit(x, y, batch_size=8, epochs=3, callbacks=[monitor], verbose=0)  # 8 steps per epoch, 2 executions each
    assert int(model.optimizer.iterations.numpy()) == 24
    ema = next(f for f in monitor.last.findings if "updates" in (f.numbers or {}))
    assert monitor.updates == 24 and ema.numbers["updates"] == 24


def _tiny(optimizer) -> keras.Model:
    keras.utils.set_random_seed(1)
    inp = keras.Input((6,))
    h = layers.ReLU()(layers.BatchNormalization(name="bn1")(layers.Dense(8)(inp)))
    h = layers.ReLU()(layers.BatchNormalization(name="bn2")(layers.Dense(8)(h)))
    model = keras.Model(inp, layers.Dense(3, activation="softmax")(h))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _tiny_data(n=160, seed=0):
    r = np.random.RandomState(seed)
    x = (r.randn(n, 6) * 3 + 2).astype("float32")
    return x, (x[:, 0] + x[:, 1] > 4).astype("int32") + (x[:, 2] > 2).astype("int32")


def test_an_ema_optimizer_gets_statistics_of_the_weights_fit_swaps_in_at_its_end():
    """fit swaps the EMA weights in after the last epoch: PreciseBN's end-of-training run is for those weights."""
    (x, y), (xv, yv) = _tiny_data(), _tiny_data(64, seed=5)
    model = _tiny(keras.optimizers.SGD(0.05, use_ema=True, ema_momentum=0.9))
    model.fit(x, y, batch_size=32, epochs=3, validation_data=(xv, yv), verbose=0, shuffle=False,
              callbacks=[eg.PreciseBN((x, y), batch_size=32, shuffle=False, verbose=0)])
    stats = lambda: [w for n in ("bn1", "bn2") for w in model.get_layer(n).get_weights()[2:]]  # noqa: E731
    after_fit, loss_after_fit = stats(), model.evaluate(xv, yv, batch_size=32, verbose=0)[0]
    eg.recalibrate(model, (x, y), batch_size=32, shuffle=False, progress=False)  # the reference, at the same weights
    for got, want in zip(after_fit, stats()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert loss_after_fit == pytest.approx(model.evaluate(xv, yv, batch_size=32, verbose=0)[0], rel=1e-5)


def test_a_sequence_augmenting_with_np_random_draws_what_it_would_without_the_callbacks():
    """The callbacks' passes leave NumPy's global random state: training identical to a fit without them."""
    (x, y), (xv, yv) = _tiny_data(), _tiny_data(64, seed=5)

    class Augmenting(keras.utils.Sequence):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            xb = x[i * 32 : (i + 1) * 32]
            return (xb + np.random.normal(0, 0.5, xb.shape)).astype("float32"), y[i * 32 : (i + 1) * 32]

    final = {}
    for name in ("none", "precise_bn", "gap_monitor"):
        model = _tiny(keras.optimizers.SGD(0.05))
        np.random.seed(123)
        callbacks = {"none": [], "precise_bn": [eg.PreciseBN(Augmenting(), verbose=0)],
                     "gap_monitor": [eg.GapMonitor(Augmenting(), max_samples=64, verbose=0)]}[name]
        model.fit(Augmenting(), epochs=2, validation_data=(xv, yv), verbose=0, shuffle=False, callbacks=callbacks)
        final[name] = [w.numpy() for w in model.trainable_weights]
    for name in ("precise_bn", "gap_monitor"):
        for got, want in zip(final[name], final["none"]):
            np.testing.assert_array_equal(got, want, err_msg=name)
