"""`evalgap diagnose` and `evalgap recalibrate` on models saved by Keras 2 (.keras, .h5, SavedModel): loaded with
tf_keras and run through evalgap.tf_keras."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tf_keras as keras
from PIL import Image

from evalgap.cli import main
from evalgap.data import load_image_folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_keras2")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (d / "imgs" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / "imgs" / c / f"{i}.png")
    data = load_image_folder(d / "imgs", 16, cache=False)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.InputLayer((16, 16, 3)), keras.layers.Conv2D(4, 3, padding="same", name="conv"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
    model.compile(keras.optimizers.Adam(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(data.images.astype("float32"), data.labels, epochs=2, batch_size=12, verbose=0)
    model.save(d / "m.keras")
    model.save(d / "m.h5")
    model.save(d / "m_savedmodel")
    return d, data


def _population_variance(model, images):
    """Float64 biased variance per channel of the BN layer's input over all images."""
    conv = keras.Model(model.inputs, model.get_layer("conv").output)
    out = np.asarray(conv.predict(images.astype("float32"), verbose=0), dtype=np.float64)
    return out.reshape(-1, out.shape[-1]).var(axis=0)


@pytest.mark.parametrize("name", ["m.keras", "m.h5", "m_savedmodel"])
def test_diagnose_a_keras2_model_in_every_format(saved, name, tmp_path, capsys, monkeypatch):
    d, data = saved
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    args = ["diagnose", str(d / name), "--data", str(d / "imgs"), "--batch-size", "12", "-q", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["framework"].startswith("tf_keras/")
    assert "resized with padding to 16x16, the model's input size" in report["notes"][0]
    model = keras.models.load_model(d / name)
    expected = model.evaluate(data.images.astype("float32"), data.labels, batch_size=12, verbose=0, return_dict=True)
    values = report["metrics"]
    assert values["accuracy"]["values"]["E"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert values["loss"]["values"]["E"] == pytest.approx(expected["loss"], rel=1e-4)


def test_recalibrate_a_keras2_model_in_place_and_to_a_copy(saved, tmp_path, capsys, monkeypatch):
    d, data = saved
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    common = ["--data", str(d / "imgs"), "--batch-size", "12", "--no-shuffle", "-q"]
    target = tmp_path / "m.h5"
    target.write_bytes((d / "m.h5").read_bytes())
    assert main(["recalibrate", str(target), *common, "--in-place"]) == 0, capsys.readouterr().err
    fixed = keras.models.load_model(target)
    np.testing.assert_allclose(fixed.get_layer("bn").moving_variance.numpy(), _population_variance(fixed, data.images), rtol=1e-4)
    # a SavedModel folder is read, and written as a .keras copy; it cannot be replaced in place
    assert main(["recalibrate", str(d / "m_savedmodel"), *common, "-o", str(tmp_path / "fixed.keras")]) == 0
    copy = keras.models.load_model(tmp_path / "fixed.keras")
    np.testing.assert_allclose(copy.get_layer("bn").moving_variance.numpy(), fixed.get_layer("bn").moving_variance.numpy(), rtol=1e-6)
    capsys.readouterr()
    assert main(["recalibrate", str(d / "m_savedmodel"), *common, "--in-place"]) == 2
    err = capsys.readouterr().err
    assert "--in-place" in err and ".keras or .h5" in err and "-o NAME.keras" in err, err


def test_a_keras2_model_without_tf_keras_is_named_as_such(saved, capsys, monkeypatch):
    d, _ = saved
    monkeypatch.setitem(sys.modules, "evalgap.tf_keras.layers", None)  # as if tf_keras could not be imported
    assert main(["diagnose", str(d / "m.keras"), "--data", str(d / "imgs"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "saved by Keras 2" in err and "pip install 'evalgap[tf-keras]'" in err and len(err.strip().splitlines()) == 1, err
