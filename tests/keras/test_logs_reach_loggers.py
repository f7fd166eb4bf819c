"""PreciseBN's and GapMonitor's values reach History, CSVLogger and TensorBoard whatever the callbacks' order."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import keras

import evalgap.keras as eg
from evalgap.seed.keras_models import small_resnet

pytest.importorskip("sklearn")
tf = pytest.importorskip("tensorflow")
from evalgap.data import load_digits_rgb  # noqa: E402

BATCH = 120


def _tensorboard_scalars(folder) -> dict[str, list[float]]:
    """Every scalar in the TensorBoard event files under ``folder``, read back with TensorFlow."""
    from tensorflow.core.util import event_pb2

    out: dict[str, list[float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = np.asarray(tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value)
                if number.dtype.kind == "f" and number.size == 1:
                    out.setdefault(value.tag, []).append(float(number))
    return out


def test_values_reach_history_csv_and_tensorboard_when_listed_last(tmp_path):
    x, y = load_digits_rgb(16)
    keep = np.random.default_rng(0).permutation(len(x))[:480]
    x, y = x[keep].astype("float32"), y[keep]
    keras.utils.set_random_seed(0)
    model = small_resnet((16, 16, 3), 10, width=4)
    loggers = [keras.callbacks.CSVLogger(str(tmp_path / "log.csv")), keras.callbacks.TensorBoard(str(tmp_path / "tb"), write_graph=False)]
    ours = [eg.PreciseBN((x, y), batch_size=BATCH, verbose=0), eg.GapMonitor((x, y), batch_size=BATCH, max_samples=480, verbose=0)]
    history = model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(x, y), callbacks=loggers + ours, verbose=0)
    keys = ("precise_bn_seconds", "gap_bn_stale", "gap_batch_stats", "precise_val_accuracy", "precise_val_loss")
    for key in keys:
        assert len(history.history[key]) == 2, key
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == 2
    for key in keys:
        assert [float(r[key]) for r in rows] == pytest.approx(history.history[key], rel=1e-6), key
    scalars = _tensorboard_scalars(tmp_path / "tb")
    for key in keys:
        assert scalars[f"epoch_{key}"] == pytest.approx(history.history[key], rel=1e-5), key
    # with PreciseBN (and a probe of all the data), validation is the precise measurement: nothing stale left
    assert history.history["val_accuracy"][-1] == pytest.approx(history.history["precise_val_accuracy"][-1], abs=1e-6)
    assert abs(history.history["gap_bn_stale"][-1]) < 1e-6


def test_reordering_calls_every_callback_once_and_infinite_data_need_a_limit():
    from evalgap import DataError

    x, y = load_digits_rgb(16)
    x, y = x[:240].astype("float32"), y[:240]
    keras.utils.set_random_seed(0)
    model = small_resnet((16, 16, 3), 10, width=4)

    class Count(keras.callbacks.Callback):
        begins = 0

        def on_train_begin(self, logs=None):
            Count.begins += 1

    monitor = eg.GapMonitor((x, y), batch_size=BATCH, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[Count(), eg.PreciseBN((x, y), batch_size=BATCH, verbose=0), monitor])
    assert Count.begins == 1 and monitor.model is model and monitor.last is not None
    forever = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    with pytest.raises(DataError, match="repeat forever.*max_batches"):
        eg.recalibrate(model, forever, progress=False)
    with pytest.raises(DataError, match="repeat forever.*max_samples"):
        eg.diagnose(model, forever, progress=False)
    assert eg.recalibrate(model, forever, max_batches=3, progress=False).batches == 3
