"""The PreciseBN callback: when it runs, what it logs, and the seed's symptom closed."""

from __future__ import annotations

import numpy as np
import pytest

import keras

import evalgap.keras as eg
from evalgap.seed.keras_models import small_resnet

from ._reference import snapshot

pytest.importorskip("sklearn")
from evalgap.data import load_digits_rgb  # noqa: E402

BATCH = 120


class TrainingModeAccuracy(keras.callbacks.Callback):
    """After each epoch: accuracy with BN on batch statistics (eager ``training=True``),
    at the epoch's final weights; every variable restored afterwards."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.values = x, y, []

    def on_epoch_end(self, epoch, logs=None):
        saved = [(v, v.numpy()) for v in self.model.variables]
        n = len(self.x) - len(self.x) % BATCH
        correct = 0
        for i in range(0, n, BATCH):
            p = keras.ops.convert_to_numpy(self.model(self.x[i : i + BATCH], training=True))
            correct += int((p.argmax(1) == self.y[i : i + BATCH]).sum())
        for v, value in saved:
            v.assign(value)
        self.values.append(correct / n)


def digits():
    """1680 shuffled digits (14 whole batches of 120: a ragged batch of 117 crashes oneDNN
    kernels in TF 2.21 and torch 2.13 on some CPUs, see docs/decisions.md)."""
    x, y = load_digits_rgb(16)
    order = np.random.default_rng(0).permutation(len(x))[:1680]
    return x[order].astype("float32"), y[order]


def test_seed_in_miniature_without_and_with_precise_bn():
    x, y = digits()
    runs = {}
    for name, extra in (("plain", []), ("precise", [eg.PreciseBN((x, y), batch_size=BATCH, verbose=0)])):
        keras.utils.set_random_seed(1)
        model = small_resnet((16, 16, 3), 10, momentum=0.99, width=8)
        probe = TrainingModeAccuracy(x, y)
        history = model.fit(x, y, batch_size=BATCH, epochs=3, validation_data=(x, y), callbacks=extra + [probe], verbose=0, shuffle=False)
        runs[name] = (history.history, probe.values)
    plain, plain_train_mode = runs["plain"]
    assert plain["accuracy"][-1] - plain["val_accuracy"][-1] > 0.3, plain  # the symptom
    precise, train_mode = runs["precise"]
    assert train_mode[-1] > 0.6
    for epoch, (val, tm) in enumerate(zip(precise["val_accuracy"], train_mode)):
        assert abs(val - tm) <= 0.02, (epoch, val, tm)
    assert all(s > 0 for s in precise["precise_bn_seconds"])


def test_runs_before_validation_not_on_standalone_evaluate():
    x, y = digits()
    x, y = x[:480], y[:480]
    events = []

    class Spy(eg.PreciseBN):
        def _run(self):
            events.append(("recalibrate", self._epoch))
            super()._run()

    class Order(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            events.append(("validation", None))

        def on_epoch_end(self, epoch, logs=None):
            events.append(("epoch_end", epoch))

    model = small_resnet((16, 16, 3), 10, width=4)
    cb = Spy((x, y), batch_size=BATCH, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(x, y), callbacks=[cb, Order()], verbose=0)
    assert events == [
        ("recalibrate", 0), ("validation", None), ("epoch_end", 0),
        ("recalibrate", 1), ("validation", None), ("epoch_end", 1),
    ]
    before = snapshot(model)
    model.evaluate(x, y, batch_size=BATCH, callbacks=[cb], verbose=0)
    assert snapshot(model) == before and events[-1] == ("epoch_end", 1)


def test_without_validation_every_and_max_samples():
    x, y = digits()
    x, y = x[:480], y[:480]
    model = small_resnet((16, 16, 3), 10, width=4)
    cb = eg.PreciseBN((x, y), batch_size=BATCH, every=2, max_samples=250, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=3, callbacks=[cb], verbose=0)
    seconds = history.history["precise_bn_seconds"]
    assert seconds[0] == 0 and seconds[1] > 0 and seconds[2] == 0
    # epoch 3 was not due: the run at the end of training catches the last weights
    assert cb.last is not None and cb.last.batches == 2 and cb.last.samples == 240
    # and the model now holds the exact statistics for its final weights, over the same two
    # batches drawn at random from all 480 samples (max_samples draws whole random batches)
    again = eg.recalibrate(model, (x, y), batch_size=BATCH, max_batches=2, progress=False)
    assert again.max_drift < 1e-4


def test_gap_monitor_logs_the_terms_and_changes_nothing(capsys):
    x, y = digits()
    keras.utils.set_random_seed(1)
    model = small_resnet((16, 16, 3), 10, momentum=0.999, width=8)
    monitor = eg.GapMonitor((x, y), batch_size=BATCH, max_samples=256)

    history = model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(x, y), callbacks=[monitor], verbose=0)
    h = history.history
    assert monitor.updates == 28 and monitor.last.samples == 240  # 2 whole batches of 120 in 256
    stale = monitor.last.finding("stale_moving_statistics")
    assert stale is not None and stale.numbers["updates"] == 28
    assert set(h) >= {"gap_bn_stale", "gap_batch_stats", "precise_val_accuracy", "precise_val_loss"}
    assert h["gap_bn_stale"][-1] > 0.1 and h["precise_val_accuracy"][-1] > h["val_accuracy"][-1]
    assert "distorted by stale BatchNorm statistics" in capsys.readouterr().out
    # the monitor never changes the model
    before = snapshot(model)
    monitor.on_epoch_end(1, {})
    assert snapshot(model) == before


def _tiny(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _trainable(model):
    return [np.array(v.numpy()) for v in model.trainable_variables]


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch DataLoader is data for the torch backend")
def test_callbacks_on_the_training_dataloader_leave_its_shuffled_order_alone():
    import torch

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 6)).astype("float32"), rng.integers(0, 3, 96)

    own_generator = False

    def run(callbacks_for):
        torch.manual_seed(5)
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        if own_generator:  # the reproducible set-up: the loader's own generator
            loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
        else:  # the sampler draws from torch's global generator
            loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
        model = _tiny()
        model.fit(loader, epochs=3, verbose=0, callbacks=callbacks_for(loader))
        return _trainable(model)

    for own_generator in (False, True):
        plain = run(lambda loader: [])
        for make in (lambda d: [eg.PreciseBN(d, verbose=0)], lambda d: [eg.GapMonitor(d, max_samples=32, verbose=0)]):
            got = run(make)
            for a, b in zip(plain, got):
                np.testing.assert_array_equal(a, b)  # the same batches in the same order: bit-identical weights


def test_a_reshuffling_tf_dataset_is_warned_about_and_a_second_build_of_it_leaves_training_alone(caplog):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 6)).astype("float32"), rng.integers(0, 3, 96)

    def pipeline(reshuffle=True):
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(96, seed=7, reshuffle_each_iteration=reshuffle).batch(16).prefetch(1)

    with caplog.at_level("WARNING", logger="evalgap"):
        eg.PreciseBN(pipeline(), verbose=0)
        eg.GapMonitor(pipeline(), verbose=0)
        eg.PreciseBN(pipeline(reshuffle=False), verbose=0)
        eg.PreciseBN(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), verbose=0)
    warned = [r.getMessage() for r in caplog.records if "reshuffles on every iteration" in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == ["PreciseBN", "GapMonitor"]

    if keras.backend.backend() != "tensorflow":
        return
    # the advice holds: fit on one build, the callback on a second build of the same pipeline
    def run(with_callback):
        train = pipeline()
        model = _tiny()
        model.fit(train, epochs=3, verbose=0, callbacks=[eg.PreciseBN(pipeline(), verbose=0)] if with_callback else [])
        return _trainable(model)

    for a, b in zip(run(False), run(True)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="Keras on torch refuses steps_per_execution > 1")
def test_gap_monitor_counts_every_step_of_an_execution():
    """steps_per_execution=4: fit calls on_train_batch_end once per 4 steps (its last step's index), and each step
    updates the moving statistics: the monitor's count equals the optimizer's iterations (it was a quarter)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32") * 3 + 5, rng.integers(0, 2, 64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6), keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=4)
    monitor = eg.GapMonitor((x, y), batch_size=8, max_samples=16, verbose=0)
    model.fit(x, y, batch_size=8, epochs=3, callbacks=[monitor], verbose=0)  # 8 steps per epoch, 2 executions each
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 24
    ema = next(f for f in monitor.last.findings if "updates" in (f.numbers or {}))  # the EMA arithmetic the report states
    assert monitor.updates == 24 and ema.numbers["updates"] == 24
