"""Saturated softmax and sigmoid outputs are scored as Keras 2's ``evaluate`` scores them: from the logits the
activations mark their outputs with, not from probabilities clipped at 1e-7 (a float64 NumPy reference)."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras
from tf_keras import layers

import evalgap.tf_keras as eg


def _exact_cross_entropy(logits: np.ndarray, y: np.ndarray, binary: bool) -> float:
    z = logits.astype(np.float64)
    if binary:
        z, t = z[:, 0], y.astype(np.float64)
        return float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    return float(np.mean(-log_p[np.arange(len(y)), y]))


@pytest.mark.parametrize("task", ["softmax", "sigmoid"])
def test_saturated_probabilities_are_scored_from_their_logits(task):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(150, 8)) * 3 + 5).astype("float32")
    binary = task == "sigmoid"
    y = rng.integers(0, 3, 150) if not binary else rng.integers(0, 2, 150)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    logits = layers.Dense(1 if binary else 3, name="logits")(layers.BatchNormalization()(layers.Dense(16)(inp)))
    model = keras.Model(inp, layers.Activation(task)(logits))
    head = model.get_layer("logits")
    head.kernel.assign(head.kernel.numpy() * 40)  # probabilities far below the clip
    model.compile("adam", "binary_crossentropy" if binary else "sparse_categorical_crossentropy", metrics=["accuracy"])
    logits_of = keras.Model(inp, logits)

    expected = model.evaluate(x, y, batch_size=150, verbose=0, return_dict=True)
    assert expected["loss"] == pytest.approx(_exact_cross_entropy(logits_of(x).numpy(), y, binary), rel=1e-4)
    report = eg.diagnose(model, (x, y), batch_size=150, progress=False)
    assert report.decompositions["loss"].values["E"] == pytest.approx(expected["loss"], rel=1e-5)
    result = eg.recalibrate(model, (x, y), batch_size=150, training_metrics=True, progress=False)
    batch_logits = logits_of(x, training=True).numpy()  # BN on the batch's statistics (updates them: last)
    assert result.training_metrics["loss"] == pytest.approx(_exact_cross_entropy(batch_logits, y, binary), rel=1e-4)


def test_a_pandas_dataframe_is_cut_into_rows():
    """tf_keras takes a DataFrame and a Series as fit does: rows by position (a Series with a shuffled index too)."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)).astype("float32") * 4 + 1, rng.integers(0, 2, 64)
    order = rng.permutation(64)
    frame = pd.DataFrame(x, columns=list("abc"), index=order)  # an index that is not 0..63, as after a split
    labels = pd.Series(y, index=order)
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    model = keras.Model(inp, layers.Dense(2)(layers.BatchNormalization()(layers.Dense(8)(inp))))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    expected = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    report = eg.diagnose(model, (frame, labels), batch_size=16, progress=False)
    for name in ("loss", "accuracy"):
        assert report.decompositions[name].values["E"] == pytest.approx(expected[name], rel=1e-5)
