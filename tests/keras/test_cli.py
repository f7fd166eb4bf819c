"""`evalgap diagnose` and `evalgap recalibrate` on a saved .keras model."""

from __future__ import annotations

import json
import os
import re
import zipfile

import keras
import numpy as np
import pytest

from evalgap.cli import main

pytest.importorskip("sklearn")
from evalgap.data import load_digits_rgb  # noqa: E402
from evalgap.seed.keras_models import small_resnet  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    x, y = load_digits_rgb(16)
    order = np.random.default_rng(0).permutation(len(x))[:960]
    x, y = x[order], y[order]
    keras.utils.set_random_seed(0)
    model = small_resnet((16, 16, 3), 10, width=4, momentum=0.999)
    model.fit(x.astype("float32"), y, batch_size=120, epochs=2, verbose=0)
    model.save(d / "model.keras")
    np.savez(d / "data.npz", x=x, y=y)
    return d


def test_diagnose_writes_reports_and_fails_over_the_threshold(saved, capsys):
    args = ["diagnose", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-q"]
    code = main(args + ["--json", str(saved / "r.json"), "--html", str(saved / "r.html"), "--fail-over", "5"])
    out = capsys.readouterr()
    report = json.loads((saved / "r.json").read_text())
    assert report["schema"] == "evalgap.report/1" and report["causes"][0]["term"] == "stale_moving_statistics"
    assert report["gap_points"] > 5 and code == 1 and "exceeds --fail-over" in out.err
    assert (saved / "r.html").read_text().startswith("<!doctype html>")
    assert main(args + ["--fail-over", "100"]) == 0


def test_fail_over_on_a_loss_means_evaluation_loss_higher_by_more_than_the_threshold(saved, capsys):
    """--primary loss: 'worse' is a higher evaluation loss (the gap top - E is then negative); the threshold is in
    the loss's own units."""
    args = ["diagnose", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-q",
            "--primary", "loss", "--json", str(saved / "loss.json")]
    assert main(args + ["--fail-over", "1e9"]) == 0
    values = json.loads((saved / "loss.json").read_text())["metrics"]["loss"]["values"]
    top = "F" if "F" in values else "T"
    worse = values["E"] - values[top]  # evaluation loss above training-mode loss
    assert worse > 0.05, values  # stale statistics (momentum 0.999) make evaluation worse
    capsys.readouterr()
    assert main(args + ["--fail-over", str(worse / 2)]) == 1
    assert "exceeds --fail-over" in capsys.readouterr().err
    assert main(args + ["--fail-over", str(worse * 2)]) == 0


def test_recalibrate_in_place_replaces_the_model_file(saved, tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes((saved / "model.keras").read_bytes())
    assert main(["recalibrate", str(target), "--npz", str(saved / "data.npz"), "--batch-size", "120", "--in-place", "-q"]) == 0
    assert target.read_bytes() != (saved / "model.keras").read_bytes()
    args = ["diagnose", str(target), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-q", "--json", str(tmp_path / "f.json")]
    assert main(args) == 0
    terms = json.loads((tmp_path / "f.json").read_text())["metrics"]["accuracy"]["terms"]
    assert abs(terms["stale_moving_statistics"]) < 0.005


def test_recalibrate_writes_a_fixed_copy_and_keeps_the_input(saved, capsys):
    before = (saved / "model.keras").read_bytes()
    out = saved / "fixed.keras"
    assert main(["recalibrate", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-o", str(out), "-q"]) == 0
    assert (saved / "model.keras").read_bytes() == before
    fixed = keras.saving.load_model(out)
    data = np.load(saved / "data.npz")
    args = ["diagnose", str(out), "--npz", str(saved / "data.npz"), "--batch-size", "120", "-q", "--json", str(saved / "f.json")]
    assert main(args + ["--fail-over", "5"]) == 0
    terms = json.loads((saved / "f.json").read_text())["metrics"]["accuracy"]["terms"]
    assert abs(terms["stale_moving_statistics"]) < 0.005  # the saved statistics are the population's
    assert fixed.count_params() > 0 and len(data["x"]) == 960


def test_bad_input_exits_2_with_a_message(saved, tmp_path, capsys):
    not_model = tmp_path / "x.keras"
    not_model.write_text("hello")
    assert main(["diagnose", str(not_model), "--npz", str(saved / "data.npz")]) == 2
    assert "not a Keras model" in capsys.readouterr().err
    assert main(["diagnose", str(saved / "model.keras"), "--data", str(tmp_path / "missing")]) == 2
    assert main(["recalibrate", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), "-o", str(saved / "model.keras")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_frameworks_start_up_lines_are_hidden_unless_verbose(saved):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    cmd = [sys.executable, "-m", "evalgap", "diagnose", str(saved / "model.keras"), "--npz", str(saved / "data.npz"),
           "--batch-size", "120", "--max-samples", "240", "-q"]
    quiet = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    for noise in ("oneDNN", "cuda drivers", "cpu_feature_guard", "absl::InitializeLog"):
        assert noise not in quiet.stderr, quiet.stderr
    assert "stale_moving_statistics" in quiet.stdout
    if keras.backend.backend() == "tensorflow":  # -v shows them (TensorFlow prints them when it loads)
        loud = subprocess.run(cmd[:3] + ["-v"] + cmd[3:], env=env, capture_output=True, text=True, timeout=300)
        assert "oneDNN" in loud.stderr or "cuda" in loud.stderr.lower()


@pytest.mark.parametrize("argv, flag", [
    (["diagnose", "m.keras", "--data", "d", "--image-size", "0"], "--image-size"),
    (["diagnose", "m.keras", "--data", "d", "--image-size", "-3"], "--image-size"),
    (["diagnose", "m.keras", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["recalibrate", "m.keras", "--npz", "d.npz", "-o", "f.keras", "--max-samples", "0"], "--max-samples"),
    (["recalibrate", "m.keras", "--npz", "d.npz", "-o", "f.keras", "--seed", "-1"], "--seed"),
    (["diagnose", "m.keras", "--data", "d", "--batch-size", "ten"], "--batch-size"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--framework", "torch", "--epochs", "-2"], "--epochs"),
    (["reproduce", "--data", "d", "--epochs", "0"], "--epochs"),
    (["reproduce", "--data", "d", "--image-size", "0"], "--image-size"),
    (["reproduce", "--data", "d", "--image-size", "16"], "--image-size"),  # ResNet50 takes at least 32x32
    (["reproduce", "--data", "d", "--batch-size", "-4"], "--batch-size"),
])
def test_numbers_out_of_range_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"argument {flag}" in err and "whole number >=" in err, err


def test_demo_refuses_epochs_below_one_before_training():
    from evalgap import DataError
    from evalgap.seed.demo import run_keras_demo, run_torch_demo

    for run in (run_keras_demo, run_torch_demo):
        with pytest.raises(DataError, match=r"--epochs\) must be >= 1, got 0"):
            run(epochs=0)


def test_in_place_on_a_model_that_is_not_keras_names_in_place(saved, tmp_path, capsys):
    model = keras.saving.load_model(saved / "model.keras")
    model.save(tmp_path / "model.h5")  # Keras 3's legacy HDF5 format
    before = (tmp_path / "model.h5").read_bytes()
    assert main(["recalibrate", str(tmp_path / "model.h5"), "--npz", str(saved / "data.npz"), "--in-place", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--in-place" in err and "must then end in .keras" in err and "-o NAME.keras" in err and "-o must end" not in err, err
    assert (tmp_path / "model.h5").read_bytes() == before


def test_reproduce_checks_its_output_folder_before_training_and_counts_classes_by_name(tmp_path, monkeypatch, capsys):
    import evalgap.seed.reproduce as job

    data = _image_folder(tmp_path / "Images", 8)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(job, "reproduce", lambda *a, **k: pytest.fail("trained before the output folder was checked"))
    assert main(["reproduce", "--data", str(tmp_path), "--image-size", "32", "--out", str(tmp_path / "afile" / "rep")]) == 2
    assert "--out" in capsys.readouterr().err
    (data / "c").mkdir()  # the last class: its only image unreadable, left out with --skip-bad
    (data / "c" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    seen = {}
    monkeypatch.setattr(job, "reproduce", lambda x, y, classes, **k: seen.update(classes=classes, labels=set(y.tolist())))
    assert main(["reproduce", "--data", str(tmp_path), "--image-size", "32", "--skip-bad", "--out", str(tmp_path / "r")]) == 0
    assert seen == {"classes": 3, "labels": {0, 1}}  # three folders, three outputs: not the highest label + 1


def _image_folder(root, size: int, per_class: int = 6):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _pooled_model(shape):
    layers = keras.layers
    inp = keras.Input(shape)
    conv = layers.Conv2D(3, 3, padding="same", name="conv")(layers.Rescaling(1 / 255.0)(inp))
    h = layers.GlobalAveragePooling2D()(layers.ReLU()(layers.BatchNormalization(name="bn")(conv)))
    model = keras.Model(inp, layers.Dense(2)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # saved whole, so loading it warns of nothing
    return model


def _population_variance(model, images):
    """Float64 biased variance per channel of the BN layer's input over all images (the exact population statistic);
    the convolution is called on its own, so any image size goes through it."""
    out = keras.ops.convert_to_numpy(model.get_layer("conv")(images.astype("float32") / 255.0)).astype(np.float64)
    return out.reshape(-1, out.shape[-1]).var(axis=0)


def test_image_size_defaults_to_a_fixed_model_input_and_must_agree_with_it(tmp_path, monkeypatch, capsys):
    from evalgap.data import load_image_folder

    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "imgs", 40)
    _pooled_model((16, 16, 3)).save(tmp_path / "m16.keras")
    common = ["--data", str(data), "--batch-size", "12", "--no-shuffle", "-q"]
    assert main(["recalibrate", str(tmp_path / "m16.keras"), *common, "-o", str(tmp_path / "fixed.keras")]) == 0
    assert "resized with padding to 16x16, the model's input size" in capsys.readouterr().out
    fixed = keras.saving.load_model(tmp_path / "fixed.keras")
    at16 = load_image_folder(data, 16, cache=False).images
    expected = _population_variance(fixed, at16)
    np.testing.assert_allclose(np.asarray(fixed.get_layer("bn").moving_variance), expected, rtol=1e-3)
    at256 = load_image_folder(data, 256, cache=False).images  # what the old default measured: another statistic
    assert np.abs(_population_variance(fixed, at256) / expected - 1).max() > 0.05
    # a contradicting --image-size is refused before anything is read or written
    assert main(["diagnose", str(tmp_path / "m16.keras"), *common, "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 32" in err and "16x16" in err and "--image-size 16" in err, err
    assert main(["diagnose", str(tmp_path / "m16.keras"), *common, "--image-size", "16", "--json", str(tmp_path / "r.json")]) == 0
    # a non-square fixed input cannot be made by the square resize: said so
    _pooled_model((16, 24, 3)).save(tmp_path / "m16x24.keras")
    assert main(["diagnose", str(tmp_path / "m16x24.keras"), *common]) == 2
    assert "16x24" in capsys.readouterr().err


def test_image_size_stays_256_for_a_model_of_any_input_size(tmp_path, monkeypatch, capsys):
    from evalgap.data import load_image_folder

    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "imgs", 20, per_class=3)
    _pooled_model((None, None, 3)).save(tmp_path / "any.keras")
    common = ["--data", str(data), "--batch-size", "6", "--no-shuffle", "-q"]
    assert main(["recalibrate", str(tmp_path / "any.keras"), *common, "-o", str(tmp_path / "fixed.keras")]) == 0
    assert "the model's input size" not in capsys.readouterr().out
    fixed = keras.saving.load_model(tmp_path / "fixed.keras")
    expected = _population_variance(fixed, load_image_folder(data, 256, cache=False).images)
    np.testing.assert_allclose(np.asarray(fixed.get_layer("bn").moving_variance), expected, rtol=1e-3)
    assert main(["recalibrate", str(tmp_path / "any.keras"), *common, "--image-size", "12", "-o", str(tmp_path / "f12.keras")]) == 0
    f12 = keras.saving.load_model(tmp_path / "f12.keras")
    expected12 = _population_variance(f12, load_image_folder(data, 12, cache=False).images)
    np.testing.assert_allclose(np.asarray(f12.get_layer("bn").moving_variance), expected12, rtol=1e-3)


def test_the_same_command_gives_the_same_dropout_masks(tmp_path):
    """--seed seeds the random layers the model is loaded with: T (dropout on) is the same in every run."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 6)).astype("float32"), rng.integers(0, 3, 96)
    inp = keras.Input((6,))
    h = keras.layers.Dropout(0.5)(keras.layers.BatchNormalization()(keras.layers.Dense(32)(inp)))
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.save(tmp_path / "drop.keras")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    values = []
    for seed in (0, 0, 1):
        out = tmp_path / f"r{len(values)}.json"
        assert main(["diagnose", str(tmp_path / "drop.keras"), "--npz", str(tmp_path / "d.npz"), "--batch-size", "16",
                     "--seed", str(seed), "-q", "--json", str(out)]) == 0
        values.append(json.loads(out.read_text())["metrics"]["loss"]["values"]["T"])
    assert values[0] == values[1] and values[2] != values[0]  # masks from the seed: the same, another seed others


def test_images_of_another_size_than_the_models_input_exit_2(saved, tmp_path, capsys):
    """evaluate refuses inputs of another shape than the model's Input; so do diagnose and recalibrate (before the
    passes, which a functional model's stateless call would run on them)."""
    x = np.zeros((32, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "small.npz", x=x, y=np.zeros(32, np.int64))
    for command in (["diagnose"], ["recalibrate", "-o", str(tmp_path / "f.keras")]):
        assert main([command[0], str(saved / "model.keras"), "--npz", str(tmp_path / "small.npz"), *command[1:], "-q"]) == 2
        assert "takes inputs of shape (None, 16, 16, 3)" in capsys.readouterr().err
    assert not (tmp_path / "f.keras").exists()


# ---- outputs: never over an input, writable before the work; bad zips; tfds channels; reproduce's words ------------


def _never_loaded(monkeypatch):
    """Fail the test if the command loads a model (the refusal must come first)."""
    import evalgap._cli_io as cli_io

    def fail(*a, **k):
        pytest.fail("the model was loaded before the outputs were checked")

    monkeypatch.setattr(cli_io, "load_keras_model", fail)


def test_diagnose_refuses_to_write_a_report_over_an_input_before_loading(saved, tmp_path, monkeypatch, capsys):
    model = tmp_path / "model.keras"
    model.write_bytes((saved / "model.keras").read_bytes())
    (tmp_path / "link.keras").symlink_to(model)
    npz = tmp_path / "data.npz"
    npz.write_bytes((saved / "data.npz").read_bytes())
    before = {p: p.read_bytes() for p in (model, npz)}
    _never_loaded(monkeypatch)
    common = [str(model), "--npz", str(npz), "--batch-size", "120", "-q"]
    for extra, said in ((["--json", str(model)], "--json .*is MODEL"),
                        (["--html", str(tmp_path / "link.keras")], "--html .*link.keras is MODEL"),
                        (["--json", str(npz)], "--json .*is --npz"),
                        (["--json", str(tmp_path / "r.x"), "--html", str(tmp_path / "r.x")], "--html .*is also --json")):
        assert main(["diagnose", *common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert re.search(said, err) and "own" in err, err
    assert {p: p.read_bytes() for p in (model, npz)} == before and not (tmp_path / "r.x").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux /proc: a folder no one can create files in")
def test_unwritable_outputs_exit_2_before_the_work(saved, tmp_path, monkeypatch, capsys):
    """An existing folder as -o / --json, a file in the way, a folder no file can be created in (/proc refuses root
    too), demo --out onto a file: exit 2 naming the flag, before the model is loaded or the demo trains."""
    import evalgap.seed.demo as demo

    (tmp_path / "isdir.keras").mkdir()
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(demo, "run_keras_demo", lambda **k: pytest.fail("the demo ran before --out was checked"))
    monkeypatch.setattr(demo, "run_torch_demo", lambda **k: pytest.fail("the demo ran before --out was checked"))
    model = str(saved / "model.keras")
    data = ["--npz", str(saved / "data.npz"), "--batch-size", "120", "-q"]
    with monkeypatch.context() as m:
        _never_loaded(m)
        for argv, said in (
            (["recalibrate", model, *data, "-o", str(tmp_path / "isdir.keras")], "-o .*isdir.keras is a folder"),
            (["recalibrate", model, *data, "-o", "/proc/fixed.keras"], "-o /proc/fixed.keras: no file can be created in /proc"),
            (["diagnose", model, *data, "--json", str(tmp_path)], "--json .* is a folder"),
            (["diagnose", model, *data, "--json", "/proc/r.json"], "--json /proc/r.json: no file can be created in /proc"),
            (["diagnose", model, *data, "--html", str(tmp_path / "afile" / "r.html")], "--html .*afile is a file, not a folder"),
            (["demo", "--epochs", "1", "--out", str(tmp_path / "afile")], "--out .*afile"),
            (["demo", "--framework", "torch", "--epochs", "1", "--out", "/proc/demo"], "--out /proc/demo"),
        ):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert re.search(said, err) and "Traceback" not in err, (argv, err)
    # the last guard: a write that fails after the work (here the check is skipped) is exit 2 with the path, no traceback
    import evalgap.cli as cli

    monkeypatch.setattr(cli, "check_writable", lambda *a, **k: None)
    assert main(["diagnose", model, *data, "--json", "/proc/r.json"]) == 2
    err = capsys.readouterr().err
    assert "cannot write /proc/r.json" in err and "Traceback" not in err, err
    assert main(["recalibrate", model, *data, "-o", "/proc/fixed.keras"]) == 2
    assert "cannot write /proc/fixed.keras" in capsys.readouterr().err


def test_recalibrate_refuses_the_input_as_output_through_a_link(saved, tmp_path, monkeypatch, capsys):
    model = tmp_path / "model.keras"
    model.write_bytes((saved / "model.keras").read_bytes())
    (tmp_path / "link.keras").symlink_to(model)
    os.link(model, tmp_path / "hard.keras")
    before = model.read_bytes()
    _never_loaded(monkeypatch)
    for source, output in (("link.keras", "model.keras"), ("model.keras", "link.keras"), ("hard.keras", "model.keras")):
        assert main(["recalibrate", str(tmp_path / source), "--npz", str(saved / "data.npz"), "-o", str(tmp_path / output), "-q"]) == 2
        assert "is the input" in capsys.readouterr().err
    assert model.read_bytes() == before


def test_a_truncated_zip_exits_2_with_a_message(saved, tmp_path, capsys):
    from PIL import Image

    with zipfile.ZipFile(tmp_path / "full.zip", "w") as zf:
        for c in ("a", "b"):
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
            zf.write(tmp_path / "x.png", f"Images/{c}/x.png")
    raw = (tmp_path / "full.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(raw[: len(raw) // 2])
    assert main(["diagnose", str(saved / "model.keras"), "--data", str(tmp_path / "cut.zip"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "cut.zip is not a valid zip file (a truncated download?)" in err and "Traceback" not in err, err


def test_reproduce_tfds_with_grayscale_images_gives_the_job_rgb(tmp_path, monkeypatch):
    """A 1-channel tfds data set (MNIST-like) reached ResNet50 with one channel (exit 3); it comes as RGB, counted."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    import evalgap.seed.reproduce as job

    gray = np.random.default_rng(0).integers(0, 256, (6, 40, 40, 1), dtype=np.uint8)

    class Builder:
        data_dir = str(tmp_path)
        info = type("Info", (), {"features": {"label": type("Label", (), {"names": ["zero", "one"]})()}})()

        def is_prepared(self):
            return True

        def as_dataset(self, split):
            return tf.data.Dataset.from_tensor_slices({"image": gray, "label": np.arange(6) % 2})

    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
    seen = {}
    monkeypatch.setattr(job, "reproduce", lambda x, y, classes, **k: seen.update(shape=x.shape, source=k["source"]))
    assert main(["reproduce", "--tfds", "fake_mnist", "--image-size", "32", "--out", str(tmp_path / "r")]) == 0
    assert seen["shape"] == (6, 32, 32, 3) and "6 converted to 8-bit RGB" in seen["source"], seen


def test_help_says_what_an_interrupted_reproduce_keeps(capsys):
    for argv in (["--help"], ["reproduce", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        out = capsys.readouterr().out
        assert done.value.code == 0 and "nothing was written" not in out and "130" in out, out
        assert re.search(r"reproduce\s+keeps the variants finished before it|the variants finished before it are kept", out), out
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    assert "130  interrupted (Ctrl-C) during the work; nothing was written" in capsys.readouterr().out  # it writes at the end


def test_an_interrupted_reproduce_keeps_the_finished_variants_and_says_the_batch_it_used(tmp_path, monkeypatch, capsys):
    """The variants' real reporting and writing around a stand-in for training: the first variant finishes, Ctrl-C
    comes in the second (exit 130); the files hold the first and the output says which files were kept. The variant
    line and the JSON name the batch used (--batch-size, or capped at the number of images), and the schedule reads
    'every 2nd epoch'."""
    import evalgap.seed.reproduce as job
    from evalgap.seed.common import precise_plan, variant_batch_size

    data = _image_folder(tmp_path / "Images", 8)  # 12 images, 2 classes

    def run_variant(variant, images, labels, classes, epochs, *, batch_size=None, on_epoch=None, precise_every="seed",
                    precise_samples=0, info=None, **k):
        if variant.name == "precise-bn":
            raise KeyboardInterrupt
        bs = variant_batch_size(variant.batch_size, batch_size, len(images))
        info["precise_val"] = precise_plan(labels, precise_bn=variant.precise_bn, every=precise_every, samples=precise_samples,
                                           batch_size=bs)[2]
        rows = [{"epoch": e, "seconds": 0.1, "loss": 1.0, "accuracy": 0.5, "val_loss": 2.0, "val_accuracy": 0.25} for e in (1, 2)]
        for row in rows:
            on_epoch(variant, row)
        return rows

    monkeypatch.setattr(job, "run_variant", run_variant)
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rep"
    common = ["reproduce", "--data", str(data.parent), "--image-size", "32", "--epochs", "2", "--precise-every", "2", "--out", str(out)]
    assert main([*common, "--variants", "seed,precise-bn", "--batch-size", "5"]) == 130
    printed = capsys.readouterr().out
    kept = [str(out / f) for f in ("reproduce.json", "reproduce.csv", "reproduce.png")]
    assert f"Interrupted during precise-bn: kept {', '.join(kept)} with the finished variant(s) seed." in " ".join(printed.split())
    written = json.loads((out / "reproduce.json").read_text())
    assert list(written["variants"]) == ["seed"] and written["variants"]["seed"]["batch_size"] == 5
    said = "the question's code: batch 5 (--batch-size 5, in place of 96), momentum 0.99, raw pixels"
    assert f"seed: {said}" in printed and "batch 96," not in printed and written["variants"]["seed"]["description"] == said
    assert written["variants"]["seed"]["precise_val"].endswith("after every 2nd epoch"), written["variants"]["seed"]["precise_val"]
    assert main([*common, "--variants", "seed", "--out", str(tmp_path / "rep2")]) == 0  # 12 images: the batch is 12, not 96
    assert "seed: the question's code: batch 12 (capped at the 12 images, in place of 96)" in capsys.readouterr().out


def test_every_api_refuses_counts_that_are_not_whole_numbers_of_at_least_1_before_the_work(saved):
    """recalibrate and diagnose of evalgap.keras, .tf_keras, .flax (and .torch) check batch_size, max_batches and
    max_samples the same way, first: max_samples=0 wrote one batch's statistics, "16" and 2.5 were taken."""
    import importlib
    import inspect

    import evalgap.keras
    from evalgap import DataError

    model = keras.saving.load_model(saved / "model.keras")
    z = np.load(saved / "data.npz")
    before = [np.array(v) for v in model.weights]
    for value, named in [(0, "max_samples must be >= 1 (or None for all samples), got 0"), (-3, "got -3"),
                         (2.5, "max_samples must be a whole number >= 1")]:
        with pytest.raises(DataError, match=re.escape(named)):
            evalgap.keras.recalibrate(model, (z["x"], z["y"]), batch_size=120, max_samples=value, progress=False)
    assert all(np.array_equal(b, np.array(v)) for b, v in zip(before, model.weights))
    for name in ("evalgap.keras", "evalgap.tf_keras", "evalgap.flax", "evalgap.torch"):
        try:
            api = importlib.import_module(name)
        except ImportError:
            continue
        for fn in (api.recalibrate, api.diagnose):
            for arg in ("batch_size", "max_batches", "max_samples"):
                if arg not in inspect.signature(fn).parameters:
                    continue
                for value, says in [(0, f"{arg} must be >= 1"), ("16", f"{arg} must be a whole number >= 1"),
                                    (2.5, "got 2.5 of type float"), (True, "got True of type bool")]:
                    with pytest.raises(DataError, match=re.escape(says)):
                        fn(None, None, **{arg: value})  # refused before the model or the data are looked at


# ---- classes the model cannot score, reports in missing folders, reproduce's --out, tfds names, folders too high ----


def test_diagnose_refuses_data_of_more_classes_than_the_model_has_outputs_before_any_pass(tmp_path, monkeypatch, capsys):
    """3 class folders (or npz labels 0-2) for a 2-class model said "labels must be class indices in [0, 2) ... but
    they range over [1, 2]", one batch's range, from inside a pass: one line with both numbers and the fix, first."""
    import evalgap.keras

    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "imgs", 16, per_class=2)
    _image_folder(tmp_path / "more", 16, per_class=2)
    (data / "c").mkdir()
    for f in (tmp_path / "more" / "a").iterdir():
        f.rename(data / "c" / f.name)
    _pooled_model((16, 16, 3)).save(tmp_path / "m.keras")
    np.savez(tmp_path / "three.npz", x=np.zeros((6, 16, 16, 3), np.uint8), y=np.arange(6) % 3)
    with monkeypatch.context() as m:
        m.setattr(evalgap.keras, "diagnose", lambda *a, **k: pytest.fail("a pass ran before the classes were checked"))
        for source, said in ((["--data", str(data)], f"--data {data} holds 3 classes"),
                             (["--npz", str(tmp_path / "three.npz")], "has labels up to 2, so 3 classes")):
            assert main(["diagnose", str(tmp_path / "m.keras"), *source, "--batch-size", "4", "-q"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and said in err and "the model has 2 outputs" in err and "so label 2 would" in err, err
    # one sigmoid output scores 2 classes: not refused
    from evalgap._cli_io import keras_output_classes

    inp = keras.Input((4,))
    assert keras_output_classes(keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(inp)))[0] is None


def test_a_report_in_a_missing_folder_exits_2_before_loading_and_creates_nothing(saved, tmp_path, monkeypatch, capsys):
    """--json /nonexist/a.json created the folder while recalibrate -o refused one: both refuse, naming it."""
    _never_loaded(monkeypatch)
    for flag in ("--json", "--html"):
        target = tmp_path / "missing" / "deeper" / "r.out"
        assert main(["diagnose", str(saved / "model.keras"), "--npz", str(saved / "data.npz"), flag, str(target), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"the folder of {flag} {target} does not exist: create {target.parent} first" in err, err
    assert not (tmp_path / "missing").exists()


def test_reproduce_with_unreadable_data_leaves_no_output_folder(tmp_path, monkeypatch, capsys):
    """reproduce --data /nonexistent --out X exited 2 and left an empty X/: the data are read before X is made (a
    folder in the way of X is still refused before the data are read)."""
    import evalgap.seed.reproduce as job

    monkeypatch.setattr(job, "reproduce", lambda *a, **k: pytest.fail("trained on data that cannot be read"))
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    _image_folder(tmp_path / "two" / "train", 8)
    _image_folder(tmp_path / "two" / "val", 8)
    for data, said in ((tmp_path / "nonexistent", "does not exist"), (tmp_path / "two", "hold folders, not images")):
        out = tmp_path / "X" / "rep"
        assert main(["reproduce", "--data", str(data), "--image-size", "32", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "X").exists()
    assert main(["reproduce", "--data", str(tmp_path / "two" / "train"), "--image-size", "32", "--out", str(tmp_path / "two" / "train" / "a" / "0.png" / "o")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_train_val_folder_and_an_unknown_tfds_name_exit_2_with_one_line_naming_the_fix(saved, tmp_path, monkeypatch, capsys):
    """--data data/two (train/ and val/ of class folders) said "class folder data/two/train holds no image ... remove
    it"; --tfds nosuchds printed 460 lines (tfds's every name)."""
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    _image_folder(tmp_path / "two" / "train", 16)
    _image_folder(tmp_path / "two" / "val", 16)
    assert main(["diagnose", str(saved / "model.keras"), "--data", str(tmp_path / "two"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hold folders, not images" in err and f"--data {tmp_path / 'two' / 'train'}" in err, err
    pytest.importorskip("tensorflow_datasets")
    assert main(["diagnose", str(saved / "model.keras"), "--tfds", "nosuchds", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tfds has no data set named 'nosuchds'" in err and "list_builders" in err, err
