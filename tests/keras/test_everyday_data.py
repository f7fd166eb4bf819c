"""Everyday Keras data the diagnosis broke on, each against Keras itself or a float64 NumPy reference: a pandas
DataFrame as x, channels-first images, a history of the wrong type."""

from __future__ import annotations

import numpy as np
import pytest

import keras
from keras import layers

import evalgap.keras as eg
from evalgap import DataError

from ._reference import snapshot


def _tabular():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(150, 8)) * 3 + 5).astype("float32")
    return x, rng.integers(0, 3, 150)


def _mlp():
    inp = keras.Input((8,))
    h = layers.BatchNormalization(name="bn")(layers.Dense(16, name="hidden")(inp))
    model = keras.Model(inp, layers.Dense(3, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_a_pandas_dataframe_is_data_as_keras_takes_it():
    pd = pytest.importorskip("pandas")
    x, y = _tabular()
    frame, labels = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)]), pd.Series(y)
    model = _mlp()
    expected = model.evaluate(frame, labels, batch_size=32, verbose=0, return_dict=True)
    before = snapshot(model)
    report = eg.diagnose(model, (frame, labels), batch_size=32, progress=False)
    assert snapshot(model) == before
    for name in ("loss", "accuracy"):
        assert report.decompositions[name].values["E"] == pytest.approx(expected[name], rel=1e-5, abs=1e-6)
    result = eg.recalibrate(model, (frame, labels), batch_size=30, shuffle=False, progress=False)
    assert result.batches == 5 and result.skipped_batches == 0
    hidden = x.astype(np.float64) @ np.asarray(model.get_layer("hidden").kernel, dtype=np.float64) \
        + np.asarray(model.get_layer("hidden").bias, dtype=np.float64)  # what the BN layer sees
    bn = model.get_layer("bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), hidden.mean(0), rtol=1e-4, atol=1e-4 * hidden.std(0).max())
    np.testing.assert_allclose(np.asarray(bn.moving_variance), hidden.var(0), rtol=1e-4)


def test_channels_first_images_are_measured_and_normalized_per_channel():
    rng = np.random.default_rng(0)
    centre, spread = np.array([900.0, 100.0, 400.0]), np.array([30.0, 5.0, 60.0])
    x = (rng.normal(size=(64, 3, 10, 12)) * spread[:, None, None] + centre[:, None, None]).astype("float32")
    y = rng.integers(0, 4, 64)
    inp = keras.Input((3, 10, 12))
    h = layers.Conv2D(4, 3, data_format="channels_first", padding="same")(inp)
    h = layers.BatchNormalization(axis=1)(h)
    h = layers.GlobalAveragePooling2D(data_format="channels_first")(h)
    model = keras.Model(inp, layers.Dense(4)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    found = eg.diagnose(model, (x, y), batch_size=16, progress=False).finding("input_scale")
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(found.numbers["mean"], x64.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(found.numbers["std"], x64.std(axis=(0, 2, 3)), rtol=1e-6)
    pasted = eval(found.remedy, {"keras": keras})  # the layer, as pasted
    out = np.asarray(keras.ops.convert_to_numpy(pasted(x)), dtype=np.float64)
    assert "axis=1" in found.remedy and out.shape == x.shape
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=2e-3)  # the constants are printed to 4 digits
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1.0, atol=2e-3)


def test_a_history_of_the_wrong_type_is_a_clear_error():
    x, y = _tabular()
    model = _mlp()
    with pytest.raises(DataError, match="history must be what model.fit returns.*got list"):
        eg.diagnose(model, (x, y), batch_size=30, history=[0.5, 0.6], progress=False)


def _saturated(activation: str, classes: int):
    """A classifier whose softmax/sigmoid saturates (probabilities below Keras's 1e-7 clip) in both modes."""
    inp = keras.Input((8,))
    h = layers.BatchNormalization(name="bn")(layers.Dense(16, name="hidden")(inp))
    logits = layers.Dense(classes, name="logits")(h)
    model = keras.Model(inp, layers.Activation(activation, name="probabilities")(logits))
    head = model.get_layer("logits")
    head.kernel.assign(np.asarray(head.kernel) * 40)
    return model, keras.Model(inp, logits)


def _cross_entropy(logits: np.ndarray, y: np.ndarray, binary: bool, clipped: bool) -> float:
    """Float64 per-sample cross-entropy from the logits: exact, or as Keras computes it from clipped probabilities."""
    z = logits.astype(np.float64)
    low, high = float(np.float32(1e-7)), float(np.float32(1 - 1e-7))  # Keras clips in float32
    if binary:
        z, t = z[:, 0], y.astype(np.float64)
        if clipped:
            p = np.clip(1 / (1 + np.exp(-z)), low, high)
            return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))
        return float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    if clipped:
        log_p = np.log(np.clip(np.exp(log_p), low, high))
    return float(np.mean(-log_p[np.arange(len(y)), y]))


@pytest.mark.parametrize("task", ["softmax", "sigmoid"])
def test_saturated_probabilities_are_scored_as_evaluate_scores_them(task):
    """On TensorFlow, Keras's cross-entropies compute from the logits behind a softmax/sigmoid output (inside
    evaluate's graph); E, and Td from the statistics pass, must too. Elsewhere Keras clips the probabilities."""
    x, y = _tabular()
    binary = task == "sigmoid"
    y = (y > 0).astype("int64") if binary else y
    model, logits_of = _saturated(task, 1 if binary else 3)
    model.compile("adam", "binary_crossentropy" if binary else "sparse_categorical_crossentropy", metrics=["accuracy"])
    clipped = keras.backend.backend() != "tensorflow"
    expected = model.evaluate(x, y, batch_size=150, verbose=0, return_dict=True)
    reference = _cross_entropy(np.asarray(keras.ops.convert_to_numpy(logits_of(x))), y, binary, clipped)
    assert expected["loss"] == pytest.approx(reference, rel=1e-4)
    assert reference > 1.0  # saturated: far from what the clip would give on TensorFlow
    report = eg.diagnose(model, (x, y), batch_size=150, progress=False)
    assert report.decompositions["loss"].values["E"] == pytest.approx(expected["loss"], rel=1e-5)
    result = eg.recalibrate(model, (x, y), batch_size=150, training_metrics=True, progress=False)
    batch_logits = np.asarray(keras.ops.convert_to_numpy(logits_of(x, training=True)))  # BN on the batch's statistics
    assert result.training_metrics["loss"] == pytest.approx(_cross_entropy(batch_logits, y, binary, clipped), rel=1e-4)


def test_an_extra_trailing_axis_of_one_is_taken_as_keras_takes_it():
    """Input((6, 4)) with data of shape (N, 6, 4, 1), as MNIST's x[..., None]: Keras squeezes the axis."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6, 4, 1)).astype("float32") * 3 + 2, rng.integers(0, 3, 64)
    inp = keras.Input((6, 4))
    model = keras.Model(inp, layers.Dense(3)(layers.Flatten()(layers.BatchNormalization()(inp))))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    expected = model.evaluate(x, y, batch_size=16, verbose=0)
    report = eg.diagnose(model, (x, y), batch_size=16, progress=False)
    assert report.decompositions["loss"].values["E"] == pytest.approx(expected, rel=1e-5)


def test_a_masked_output_is_scored_over_its_real_positions_as_evaluate_scores_it():
    """A padded-sequence tagger: Embedding(mask_zero=True) -> LSTM -> BatchNormalization -> Dense per position. The
    output carries the padding mask and evaluate weights the loss and metrics by it; a compiled step drops the mask
    (E was the accuracy over every position, 0.2875 for 0.3366 on TensorFlow). E equals evaluate, and T (training mode,
    BN on batch statistics) equals the masked accuracy of model(x, training=True) batch by batch, in float64 NumPy."""
    rng = np.random.default_rng(0)
    n, length, vocab, classes, batch = 64, 10, 20, 4, 16
    x = rng.integers(1, vocab, (n, length)).astype("int32")
    for i, real in enumerate(rng.integers(3, length + 1, n)):
        x[i, real:] = 0
    y = rng.integers(0, classes, (n, length))
    keras.utils.set_random_seed(1)
    inp = keras.Input((length,), dtype="int32")
    h = layers.LSTM(8, return_sequences=True)(layers.Embedding(vocab, 8, mask_zero=True)(inp))
    model = keras.Model(inp, layers.Dense(classes, activation="softmax")(layers.BatchNormalization(momentum=0.5)(h)))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=batch, epochs=2, verbose=0)
    expected = model.evaluate(x, y, batch_size=batch, verbose=0, return_dict=True)
    mask = x != 0
    # T: training mode on a copy (BatchNorm's batch statistics skip the padding; the copy's moving statistics move)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    hits = np.concatenate([np.asarray(keras.ops.convert_to_numpy(copy(x[i:i + batch], training=True))).argmax(-1) == y[i:i + batch]
                           for i in range(0, n, batch)])

    report = eg.diagnose(model, (x, y), batch_size=batch, shuffle=False, progress=False)

    for key in ("loss", "accuracy"):
        assert report.decompositions[key].values["E"] == pytest.approx(expected[key], rel=1e-5), key
    assert report.decompositions["accuracy"].values["T"] == pytest.approx(hits[mask].mean(), abs=1e-6)
