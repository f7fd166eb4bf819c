"""Arrays are batched the way fit(shuffle=True) trains: a seeded permutation, random whole batches for probes.

The issue this guards: arrays loaded class by class (an image folder) used to be cut into
batches in that order, so every batch held one or two classes that no training step ever
saw, the diagnosis blamed batch statistics and the "exact" statistics were those of
batches training never used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import keras
from keras import layers

import evalgap.keras as eg

pytest.importorskip("sklearn")
from evalgap.data import load_digits_rgb  # noqa: E402

BATCH = 40


@pytest.fixture(scope="module")
def sorted_digits():
    x, y = load_digits_rgb(16)
    keep = np.random.default_rng(0).permutation(len(x))[:1680]
    x, y = x[keep].astype("float32") / 255.0, y[keep]
    order = np.argsort(y, kind="stable")  # class order, as a folder loads
    return x[order], y[order]


def net():
    inp = keras.Input((16, 16, 3))
    h = inp
    for i, f in enumerate((6, 12)):
        h = layers.Conv2D(f, 3, strides=2, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
        h = layers.ReLU()(h)
    out = layers.Dense(10, activation="softmax")(layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def trained(sorted_digits):
    x, y = sorted_digits
    keras.utils.set_random_seed(0)
    model = net()
    model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, shuffle=True)
    eg.recalibrate(model, (x, y), batch_size=BATCH, progress=False)
    return model


def test_class_ordered_arrays_give_the_diagnosis_of_shuffled_arrays(sorted_digits, trained):
    x, y = sorted_digits
    perm = np.random.default_rng(7).permutation(len(x))
    ordered = eg.diagnose(trained, (x, y), batch_size=BATCH, progress=False)
    shuffled = eg.diagnose(trained, (x[perm], y[perm]), batch_size=BATCH, progress=False)
    a, b = ordered.decompositions["accuracy"], shuffled.decompositions["accuracy"]
    # E and P do not depend on the batches (evaluation mode): equal up to float summation order
    assert a.values["E"] == pytest.approx(b.values["E"], abs=1e-6)
    # Td, P: other random batches of 40 give other batch statistics, a point or two of noise
    for term in a.terms:
        assert abs(a.terms[term] - b.terms[term]) < 0.02, (term, a.terms, b.terms)
    assert abs(a.terms["batch_statistics"]) < 0.02 and "batch_statistics" not in dict(ordered.causes), str(ordered)
    assert ordered.probe["order"].startswith(f"arrays cut into batches of {BATCH} shuffled with seed 0")
    assert ordered.probe["classes_per_batch"] > 8.0  # shuffled batches of 40 hold nearly all 10 classes
    assert any("shuffled with seed 0" in n for n in ordered.notes)


def test_the_given_order_is_kept_on_request_and_the_finding_says_why(sorted_digits, trained):
    x, y = sorted_digits
    report = eg.diagnose(trained, (x, y), batch_size=BATCH, shuffle=False, progress=False)
    name, value = report.causes[0]
    assert name == "batch_statistics" and value < -0.05, str(report)
    finding = report.finding("batch_statistics")
    mix = report.probe
    assert mix["classes_per_batch"] < 2.0 and mix["classes_per_shuffled_batch"] > 8.0
    assert "not representative" in finding.message and f"{mix['classes_per_batch']:.1f} of the 10 classes" in finding.message
    assert finding.numbers["classes_per_batch"] == pytest.approx(mix["classes_per_batch"])


def test_recalibrated_statistics_do_not_depend_on_the_order_arrays_come_in(sorted_digits, trained):
    x, y = sorted_digits
    perm = np.random.default_rng(7).permutation(len(x))
    weights = trained.get_weights()
    stats = {}
    for name, data in (("ordered", (x, y)), ("shuffled", (x[perm], y[perm]))):
        trained.set_weights(weights)
        r = eg.recalibrate(trained, data, batch_size=BATCH, progress=False)
        stats[name] = {layer.name: (layer.mean_after, layer.var_after) for layer in r.layers}
    trained.set_weights(weights)
    # bn0 normalizes the inputs' convolution: its population statistics do not depend on the batching
    np.testing.assert_allclose(stats["ordered"]["bn0"][1], stats["shuffled"]["bn0"][1], rtol=1e-5)
    # bn1's inputs went through bn0 with each batch's statistics: other random batches of 40 move its
    # variance by 0.1-0.2% (measured on the three backends); batches in class order move it by 4-10%
    shuffled_diff = np.max(np.abs(stats["ordered"]["bn1"][1] / stats["shuffled"]["bn1"][1] - 1))
    in_order = eg.recalibrate(trained, (x, y), batch_size=BATCH, shuffle=False, progress=False)
    trained.set_weights(weights)
    ordered_diff = np.max(np.abs(in_order["bn1"].var_after / stats["shuffled"]["bn1"][1] - 1))
    assert shuffled_diff < 0.005 and ordered_diff > 0.02 and ordered_diff > 10 * shuffled_diff, (shuffled_diff, ordered_diff)


def test_max_samples_draws_whole_batches_from_all_of_the_data(sorted_digits, trained):
    x, y = sorted_digits
    report = eg.diagnose(trained, (x, y), batch_size=BATCH, max_samples=200, progress=False)
    assert report.probe["samples"] == 200 and report.probe["batches"] == 5
    assert report.probe["classes"] == 10  # the first 200 samples in class order hold 2 classes
    assert "5 of 42 whole batches drawn at random (seed 0)" in report.probe["order"]
    again = eg.diagnose(trained, (x, y), batch_size=BATCH, max_samples=200, progress=False)
    assert again.decompositions["accuracy"].values == report.decompositions["accuracy"].values  # seeded
    other = eg.diagnose(trained, (x, y), batch_size=BATCH, max_samples=200, seed=1, progress=False)
    assert other.probe["classes"] == 10


def test_streams_keep_the_users_order_and_say_so(sorted_digits, trained):
    x, y = sorted_digits
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, 400, BATCH)]
    report = eg.diagnose(trained, batches, max_samples=200, progress=False)
    assert report.probe["samples"] == 200 and report.probe["classes"] == 2  # the first 5 batches, as given
    assert report.probe["order"].startswith("the first 5 batches of the data's own batches")


UC_MERCED = Path(__file__).resolve().parents[3] / "shared" / "data" / "uc_merced" / "UCMerced_LandUse"


@pytest.mark.skipif(not UC_MERCED.is_dir(), reason=f"UC Merced images not found at {UC_MERCED} (../shared/data/uc_merced)")
def test_cli_max_samples_on_the_uc_merced_folder_draws_from_every_class(tmp_path, capsys):
    from evalgap.cli import main

    inp = keras.Input((16, 16, 3))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(4, 3, strides=4)(layers.Rescaling(1 / 255.0)(inp))))
    model = keras.Model(inp, layers.Dense(21, activation="softmax")(layers.GlobalAveragePooling2D()(h)))
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.save(tmp_path / "m.keras")
    args = ["diagnose", str(tmp_path / "m.keras"), "--data", str(UC_MERCED), "--image-size", "16", "--limit-per-class", "10",
            "--batch-size", "16", "--max-samples", "160", "-q", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    probe = json.loads((tmp_path / "r.json").read_text())["probe"]
    # 210 images in class order: the first 160 hold 16 classes; 10 random batches of 16 hold all 21
    # (a class is left out only if all 10 of its images are: about 6e-7 per class)
    assert probe["samples"] == 160 and probe["classes"] == 21, probe


def test_an_unbatched_dataset_and_list_labels_are_named_with_the_fix():
    tf = pytest.importorskip("tensorflow")
    from evalgap import DataError

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 10)).astype("float32"), rng.integers(0, 3, 64)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    before = [np.array(v.numpy()) for v in model.variables]
    with pytest.raises(DataError, match=r"inputs of shape \(10,\): one dimension short.*\.batch\(batch_size\)"):
        eg.diagnose(model, tf.data.Dataset.from_tensor_slices((x, y)), progress=False)
    with pytest.raises(DataError, match=r"inputs of shape \(10,\)"):
        eg.recalibrate(model, tf.data.Dataset.from_tensor_slices(x), progress=False)
    with pytest.raises(DataError, match=r"y is a Python list of numbers: pass it as an array \(np.asarray\(y\)\)"):
        eg.diagnose(model, (x, list(y)), batch_size=16, progress=False)
    with pytest.raises(DataError, match=r"a list is read as a list of batches.*pass a tuple, \(x, y\)"):
        eg.recalibrate(model, [x, y], batch_size=16, progress=False)
    for v, b in zip(model.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    assert eg.recalibrate(model, [(x[:32], y[:32]), (x[32:], y[32:])], batch_size=32, progress=False).batches == 2  # batches
    assert eg.diagnose(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16), progress=False).samples == 64
    # one feature given as (n,) for Input((1,)): Keras adds the axis, so no refusal
    one = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    one.compile("adam", "mse")
    report = eg.diagnose(one, (x[:, 0], x[:, 1]), batch_size=16, progress=False)
    assert report.decompositions["loss"].values["E"] == pytest.approx(one.evaluate(x[:, 0], x[:, 1], batch_size=16, verbose=0), rel=1e-5)
