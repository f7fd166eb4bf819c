"""evalgap.tf_keras.diagnose: planted causes come out on top, with Keras 2 remedies; the model is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras
from tf_keras import layers

import evalgap.tf_keras as eg

from .._tf_logs import models_in_a_row
from ._reference import layer_state, snapshot

pytest.importorskip("sklearn")
from evalgap.data import load_digits_rgb  # noqa: E402

BATCH = 120


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_rgb(16)
    order = np.random.default_rng(0).permutation(len(x))[:1680]  # 14 whole batches
    return x[order].astype("float32"), y[order]


def net(momentum=0.99, dropout=0.0, width=6):
    inp = keras.Input((16, 16, 3))
    h = inp
    for i, f in enumerate((width, 2 * width)):
        h = layers.Conv2D(f, 3, strides=2, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization(momentum=momentum, name=f"bn{i}")(h)
        h = layers.ReLU()(h)
    h = layers.GlobalAveragePooling2D()(h)
    if dropout:
        h = layers.Dropout(dropout, seed=7, name="dropout")(h)
    model = keras.Model(inp, layers.Dense(10, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_stale_moving_statistics_and_raw_inputs(digits):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = net(momentum=0.999)
    history = model.fit(x, y, batch_size=BATCH, epochs=4, verbose=0)
    before, before_layers = snapshot(model), layer_state(model)
    report = eg.diagnose(model, (x, y), batch_size=BATCH, history=history, progress=False)
    assert snapshot(model) == before and layer_state(model) == before_layers  # nothing changed
    name, value = report.causes[0]
    assert name == "stale_moving_statistics" and value > 0.15, str(report)
    d = report.decompositions["accuracy"]
    assert sum(d.terms.values()) == pytest.approx(d.values["F"] - d.values["E"], abs=1e-12)
    stale = report.finding("stale_moving_statistics")
    assert stale.numbers["steps_per_epoch"] == 14 and stale.numbers["updates"] == 56
    assert "evalgap.tf_keras.PreciseBN" in stale.remedy
    raw = report.finding("input_scale")
    assert raw is not None and "raw [0, 255]" in raw.message and "tf_keras.layers.Rescaling(1 / 255.0)" in raw.remedy
    layer = eval(raw.remedy.split("  #")[0], {"tf_keras": keras})  # the snippet, pasted: a Keras 2 layer (tf.keras is Keras 3 here)
    assert keras.Sequential([keras.Input((16, 16, 3)), layer]).output_shape == (None, 16, 16, 3)
    assert report.finding("drift").numbers["first_layer"] == "bn0"
    assert report.framework.startswith("tf_keras/")
    eg.recalibrate(model, (x, y), batch_size=BATCH, progress=False)
    healthy = eg.diagnose(model, (x, y), batch_size=BATCH, progress=False)
    assert abs(healthy.gap_points) < 1.0 and healthy.causes == [], str(healthy)


def test_heavy_dropout_and_a_frozen_backbone(digits):
    x, y = digits
    xn = x[:960] / 255.0
    yn = y[:960]
    keras.utils.set_random_seed(0)
    model = net(dropout=0.7)
    model.fit(xn, yn, batch_size=BATCH, epochs=4, verbose=0)
    eg.recalibrate(model, (xn, yn), batch_size=BATCH, progress=False)
    before, seed = snapshot(model), model.get_layer("dropout")._random_generator._seed
    report = eg.diagnose(model, (xn, yn), batch_size=BATCH, progress=False)  # T: training mode, dropout on
    assert snapshot(model) == before
    assert model.get_layer("dropout")._random_generator._seed == seed  # tracing T took no seed from the user's later traces
    name, value = report.causes[0]
    assert name == "training_only_layers" and value < -0.01, str(report)

    # a backbone called with training=False: inference mode in fit, so frozen; its stale statistics cause no gap
    backbone = model  # trained, then its statistics made stale: recalibrating them too would help
    inp = keras.Input((16, 16, 3))
    wrapped = keras.Model(inp, backbone(inp, training=False))
    wrapped.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    bn = backbone.get_layer("bn1")
    bn.moving_mean.assign(bn.moving_mean.numpy() + 3.0)
    report = eg.diagnose(wrapped, (xn, yn), batch_size=BATCH, progress=False)
    frozen = report.finding("frozen")
    assert frozen is not None and frozen.numbers["effect"] > 0 and "include_frozen=True" in frozen.remedy, str(report)
    assert not report.causes or report.causes[0][0] != "stale_moving_statistics", str(report)


def test_labels_the_compiled_loss_ignores_are_taken_as_evaluate_takes_them():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(64, 8, 8))
    y[:, :2] = -1  # the void label
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, padding="same"), layers.BatchNormalization(),
                              layers.ReLU(), layers.Conv2D(3, 1)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1))
    expected = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    report = eg.diagnose(model, (x, y), batch_size=16, shuffle=False, progress=False)
    assert report.decompositions["loss"].values["E"] == pytest.approx(expected["loss"], rel=1e-5)


def test_bad_labels_and_one_shot_generators_are_refused(digits):
    from evalgap import DataError

    x, y = digits
    xn, yn = x[:240] / 255.0, y[:240]
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        eg.diagnose(net(), (xn, yn + 10), batch_size=BATCH, progress=False)
    with pytest.raises(DataError, match="labels must be numbers"):
        eg.diagnose(net(), (xn, np.array([f"class{i}" for i in yn])), batch_size=BATCH, progress=False)
    with pytest.raises(DataError, match=r"y is a Python list of numbers: pass it as an array"):
        eg.diagnose(net(), (xn, [int(v) for v in yn]), batch_size=BATCH, progress=False)
    with pytest.raises(DataError, match=r"inputs of shape \(16, 16, 3\): one dimension short.*\.batch\(batch_size\)"):
        import tensorflow as tf

        eg.diagnose(net(), tf.data.Dataset.from_tensor_slices((xn, yn)), progress=False)
    with pytest.raises(DataError, match="re-iterable"):
        eg.PreciseBN(b for b in [(xn, yn)])


def test_no_retracing_warning_over_several_models():
    """Keras 2: each model's passes trace their own steps; over several models in one process TensorFlow must not
    warn of a function re-traced in a loop."""
    messages, _, report, _ = models_in_a_row(keras, eg)
    assert not [m for m in messages if "retracing" in m], [m[:120] for m in messages]
    assert report.decompositions["loss"].values["E"] > 0


@pytest.mark.parametrize("how", ["lambda", "ops"])
def test_inputs_scaled_in_code_no_layer_class_names_get_no_scale_advice(digits, how):
    """preprocess_input in a Lambda or on the Keras tensor (TFOpLambda layers, as the transfer-learning tutorial
    writes it): the first convolution receives [-1, 1], not the raw pixels (both got "raw [0, 255] pixels" and
    Rescaling(1 / 255)); the note names what it receives, checked against a model cut at that layer's input."""
    x, y = digits
    x, y = x[:240], y[:240]
    preprocess = keras.applications.mobilenet_v2.preprocess_input
    inp = keras.Input((16, 16, 3))
    scaled = layers.Lambda(preprocess)(inp) if how == "lambda" else preprocess(inp)
    received = np.asarray(keras.Model(inp, scaled).predict(x[:BATCH], verbose=0), np.float64)
    model = keras.Model(inp, net()(scaled))
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    before = snapshot(model)
    report = eg.diagnose(model, (x, y), batch_size=BATCH, shuffle=False, progress=False)
    assert report.finding("input_scale") is None, str(report)
    assert snapshot(model) == before
    note = next(n for n in report.notes if n.startswith("input scale not judged"))
    assert f"receives values in [{received.min():.3g}, {received.max():.3g}]" in note, note
