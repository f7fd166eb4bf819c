"""Bad input and interruptions: an evalgap.EvalgapError naming the problem, and the model exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest

from ._reference import changed, far_batches, linen_model, nnx_model, nnx_snapshot, snapshot

import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import evalgap.flax as eg  # noqa: E402
from evalgap import DataError, EvalgapError, ModelError, RecalibrationError  # noqa: E402


class Boom(Exception):
    pass


def stream(data, at, exc):
    for i, b in enumerate(data):
        if i == at:
            raise exc("stop")
        yield b


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at", [0, 3])
def test_data_failing_or_interrupted_mid_pass_changes_nothing(exc, at):
    model, data = nnx_model(), far_batches()
    before = nnx_snapshot(model)
    expected = KeyboardInterrupt if exc is KeyboardInterrupt else RecalibrationError  # Ctrl-C stays Ctrl-C
    with pytest.raises(expected) as info:
        eg.recalibrate(model, stream(data, at, exc), progress=False)
    if expected is RecalibrationError:
        where = "reading the first batch failed" if at == 0 else f"failed while reading batch {at} of the data"
        assert "restored" in str(info.value) and f"{where} (Boom: stop)" in str(info.value)  # the batch the data failed on
    assert changed(before, nnx_snapshot(model)) == set()
    with pytest.raises(expected):
        eg.diagnose(model, stream(data, at, exc), progress=False)
    assert changed(before, nnx_snapshot(model)) == set()


def test_linen_interrupted_mid_pass_leaves_the_variables():
    (module, variables), data = linen_model(), far_batches()
    before = snapshot(variables)
    with pytest.raises(KeyboardInterrupt):
        eg.recalibrate((module, variables), stream(data, 2, KeyboardInterrupt), progress=False)
    with pytest.raises(RecalibrationError, match="while reading batch 2 of the data"):
        eg.recalibrate((module, variables), stream(data, 2, Boom), progress=False)
    assert snapshot(variables) == before


def test_non_finite_inputs_name_the_first_layer():
    model, data = nnx_model(), far_batches(3)
    data[1][0][0, 0, 0, 0] = np.nan
    before = nnx_snapshot(model)
    with pytest.raises(DataError, match="bn1 received NaN or Inf.*the inputs"):
        eg.recalibrate(model, data, progress=False)
    assert changed(before, nnx_snapshot(model)) == set()
    (module, variables), inf = linen_model(), far_batches(3)
    inf[2][0][1, 2, 3, 1] = np.inf
    with pytest.raises(DataError, match="bn1 received NaN or Inf"):
        eg.recalibrate((module, variables), inf, progress=False)


def test_nan_weights_name_the_first_layer_after_them():
    model, data = nnx_model(), far_batches(2)
    model.fc.kernel[...] = model.fc.kernel[...] * np.nan
    with pytest.raises(DataError, match="bn3 received NaN or Inf.*the layers before bn3"):
        eg.recalibrate(model, data, progress=False)


def test_wrong_input_shape_names_the_batch():
    model, data = nnx_model(), far_batches(3)
    before = nnx_snapshot(model)
    bad = data + [(np.ones((16, 8, 8, 5), np.float32), data[0][1])]  # 5 channels for a 3-channel model
    with pytest.raises(RecalibrationError, match="batch 3"):
        eg.recalibrate(model, bad, progress=False)
    assert changed(before, nnx_snapshot(model)) == set()
    (module, variables), data = linen_model(), far_batches(2)
    before = snapshot(variables)
    with pytest.raises(RecalibrationError, match="batch 2"):
        eg.recalibrate((module, variables), data + [(np.ones((16, 8, 8, 5), np.float32),)], progress=False)
    with pytest.raises(ModelError, match="first batch"):
        eg.recalibrate((module, variables), [(np.ones((16, 8, 8, 5), np.float32),)], progress=False)
    assert snapshot(variables) == before


def test_clear_errors_for_data_and_models():
    model = nnx_model()
    with pytest.raises(DataError, match="no batch"):
        eg.recalibrate(model, [], progress=False)
    with pytest.raises(DataError, match="batch_size"):
        eg.recalibrate(model, (np.ones((32, 8, 8, 3), np.float32), np.zeros(32)), progress=False)
    with pytest.raises(DataError, match="one value per channel"):
        eg.recalibrate(model, [(far_batches(1)[0][0][:1],)], progress=False)
    module, variables = linen_model()
    with pytest.raises(ModelError, match=r"\(module, variables\)"):
        eg.recalibrate(module, far_batches(1), progress=False)
    with pytest.raises(ModelError, match="flax.nnx.Module"):
        eg.recalibrate(object(), far_batches(1), progress=False)
    for error in (DataError, ModelError, RecalibrationError):
        assert issubclass(error, EvalgapError)


def test_no_batchnorm_recalibrate_refuses_diagnose_explains():
    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(3, rngs=rngs)
            self.fc = nnx.Linear(3, 5, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.norm(x.mean((1, 2))))

    model, data = Plain(nnx.Rngs(0)), far_batches(2)
    with pytest.raises(ModelError, match="no BatchNorm"):
        eg.recalibrate(model, data, progress=False)
    report = eg.diagnose(model, data, progress=False)
    assert report.recalibration is None or not report.recalibration.layers
    assert report.finding("other_normalization") is not None and "norm" in str(report)

    class LinenPlain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5)(x.mean((1, 2)))

    variables = LinenPlain().init(__import__("jax").random.key(0), data[0][0])
    with pytest.raises(ModelError, match="no BatchNorm"):
        eg.recalibrate((LinenPlain(), variables), data, progress=False)


def test_every_layer_frozen_changes_nothing_and_says_so():
    model = nnx_model()
    model.bn1.use_running_average = model.bn3.use_running_average = True  # dropout still on: the model is training
    before = nnx_snapshot(model)
    result = eg.recalibrate(model, far_batches(2), progress=False)
    assert changed(before, nnx_snapshot(model)) == set()
    assert {layer.status for layer in result.layers} == {"frozen"} and not result.recalibrated
    assert any("include_frozen=True" in n for n in result.notes)


def test_dict_batches_without_an_input_key_name_the_keys_and_the_fix():
    model, data = nnx_model(), far_batches(2)
    (module, variables), unkeyed = linen_model(), [{"feat": x, "label": y} for x, y in data]
    before, linen_before = nnx_snapshot(model), snapshot(variables)
    for target in (model, (module, variables)):
        for run in (eg.recalibrate, eg.diagnose):
            with pytest.raises(DataError) as info:
                run(target, unkeyed, progress=False)
            text = str(info.value)
            assert "without an input key" in text and "'feat', 'label'" in text and "'image'" in text and "(x, y)" in text
    assert changed(before, nnx_snapshot(model)) == set() and snapshot(variables) == linen_before
    with pytest.raises(DataError, match="'feat', 'label'.*batch_size="):  # arrays, not batches
        eg.recalibrate(model, {"feat": data[0][0], "label": data[0][1]}, batch_size=8, progress=False)


def test_a_model_that_takes_a_dict_still_gets_one():
    """A dict batch without an input key is the model's input (its targets taken out): the statistics of a + b."""

    class TwoInputs(nnx.Module):
        def __init__(self, rngs):
            self.bn = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, inputs):
            return self.bn(inputs["a"] + inputs["b"])

    rng = np.random.default_rng(0)
    data = [{"a": rng.normal(5, 2, (8, 3)).astype(np.float32), "b": rng.normal(-1, 1, (8, 3)).astype(np.float32),
             "label": rng.integers(0, 3, 8)} for _ in range(3)]
    model = TwoInputs(nnx.Rngs(0))
    eg.recalibrate(model, data, progress=False)
    x = np.concatenate([d["a"].astype(np.float64) + d["b"] for d in data])
    np.testing.assert_allclose(np.asarray(model.bn.mean[...], np.float64), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.bn.var[...], np.float64), x.var(0), rtol=1e-5)


@pytest.mark.parametrize("batches", [["abc", "def"], [("abc", np.zeros(2))], [(np.array(["a", "b"]), np.zeros(2))]])
def test_string_inputs_are_named_in_a_short_message(batches):
    model = nnx_model()
    before = nnx_snapshot(model)
    for target in (model, linen_model()):
        for run in (eg.recalibrate, eg.diagnose):
            with pytest.raises(DataError, match="not a numeric array") as info:
                run(target, batches, progress=False)
            assert len(str(info.value)) < 300 and "GraphDef" not in str(info.value)
    assert changed(before, nnx_snapshot(model)) == set()
