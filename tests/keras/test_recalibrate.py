"""evalgap.keras.recalibrate on the current backend, against an eager float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import keras
from keras import layers

import evalgap.keras as eg
from evalgap import DataError, ModelError, RecalibrationError

from ._reference import assert_close_to_reference, layer_state, reference_stats, snapshot

BACKEND = keras.backend.backend()


def far_data(n=96, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(100.0, 30.0, size=(n, size, size, 3))).astype("float32")
    y = rng.integers(0, 4, size=n)
    return x, y


def functional_model():
    inp = keras.Input((8, 8, 3))
    h = layers.Conv2D(6, 3, padding="same")(inp)
    h = layers.BatchNormalization()(h)
    h = layers.ReLU()(h)
    h = layers.Dropout(0.5)(h)
    h = layers.Conv2D(6, 3, padding="same")(h)
    frozen = layers.BatchNormalization(name="frozen_bn")
    h = frozen(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(5)(h)
    h = layers.BatchNormalization(momentum=0.9)(h)
    out = layers.Dense(4)(h)
    model = keras.Model(inp, out)
    frozen.trainable = False
    return model


def sequential_nested_model():
    inner_in = keras.Input((8, 8, 3))
    z = layers.Conv2D(4, 3, padding="same")(inner_in)
    z = layers.BatchNormalization()(z)
    z = layers.Activation("relu")(z)
    z = layers.Conv2D(4, 3, strides=2)(z)
    z = layers.BatchNormalization(axis=-1)(z)
    backbone = keras.Model(inner_in, z, name="backbone")
    return keras.Sequential(
        [keras.Input((8, 8, 3)), layers.Rescaling(1 / 255.0, offset=-0.2), backbone, layers.Flatten(), layers.Dense(4), layers.BatchNormalization()]
    )


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = layers.Conv2D(5, 3)
        self.bn = layers.BatchNormalization()
        self.drop = layers.Dropout(0.3)
        self.pool = layers.GlobalAveragePooling2D()
        self.bn_shared = layers.BatchNormalization()
        self.head = layers.Dense(4)

    def call(self, x, training=None):
        h = self.pool(self.drop(self.bn(self.conv(x), training=training), training=training))
        h = self.bn_shared(h, training=training) + self.bn_shared(2.0 * h + 3.0, training=training)
        return self.head(h)


def batches_of(x, size):
    return [x[i : i + size] for i in range(0, len(x) - len(x) % size, size)]


@pytest.mark.parametrize("make", [functional_model, sequential_nested_model, Subclassed], ids=["functional", "sequential-nested", "subclassed"])
def test_exact_statistics_and_nothing_else_changes(make):
    x, y = far_data()
    model = make()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # moving stats, optimizer state exist
    bns = [bn for _, bn in eg.find_batchnorms(model)]
    targets = [bn for bn in bns if bn.trainable]
    ref = reference_stats(model, batches_of(x, 16), targets)
    before, before_layers = snapshot(model), layer_state(model)

    result = eg.recalibrate(model, (x, y), batch_size=16, shuffle=False, progress=False)  # the reference's batches

    for bn in targets:
        assert_close_to_reference(bn, ref[id(bn)])
    after = snapshot(model)
    changed = {k for k in before if before[k] != after[k]}
    expected = {v.path for bn in targets for v in (bn.moving_mean, bn.moving_variance)}
    assert changed == expected
    assert layer_state(model) == before_layers
    assert result.batches == 6 and result.samples == 96 and result.batch_size == 16
    assert len(result.recalibrated) == len(targets)
    assert {layer.name.split("/")[-1] for layer in result.frozen} == {bn.name for bn in bns if not bn.trainable}


@pytest.mark.parametrize(
    "shape, axis", [((8, 8, 3), -1), ((3, 8, 8), 1), ((12, 5), -1), ((5,), -1), ((4, 3, 3, 2), -1)], ids=["nhwc", "nchw", "nlc", "nc", "ndhwc"]
)
def test_mean_far_above_spread_measured_stably(shape, axis):
    # |mean| / std = 100 (raw-pixel-like inputs straight into BN): E[x^2] - E[x]^2 in float32 is ~1e-3
    # off here; the reference is NumPy float64 on the same float32 values
    rng = np.random.default_rng(3)
    x = (50.0 + 0.5 * rng.standard_normal((64, *shape))).astype("float32")
    bn = layers.BatchNormalization(axis=axis)
    model = keras.Sequential([keras.Input(shape), bn])
    flat = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])

    eg.recalibrate(model, x, batch_size=16, shuffle=False, progress=False)

    # the mean to float32's resolution at 50 (ulp 4e-6), the variance to 1e-5 (float32 batch means limit it to ~2e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_mean.numpy(), np.float64), flat.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance.numpy(), np.float64), flat.var(axis=0), rtol=1e-5)


def test_shared_layer_pools_both_calls_and_is_reported():
    x, _ = far_data(64)
    model = Subclassed()
    model(x[:2])
    ref = reference_stats(model, batches_of(x, 16), [model.bn_shared])
    result = eg.recalibrate(model, x, batch_size=16, shuffle=False, progress=False)
    shared = [layer for layer in result.layers if layer.shared]
    assert len(shared) == 1 and shared[0].calls_per_batch == 2
    assert_close_to_reference(model.bn_shared, ref[id(model.bn_shared)])


def test_frozen_layers_left_alone_unless_included():
    x, _ = far_data()
    model = functional_model()
    frozen = model.get_layer("frozen_bn")
    before = np.array(frozen.moving_variance.numpy())
    r = eg.recalibrate(model, x, batch_size=32, progress=False)
    np.testing.assert_array_equal(frozen.moving_variance.numpy(), before)
    assert r["frozen_bn"].status == "frozen" and r["frozen_bn"].var_after is not None
    assert any("include_frozen=True" in n for n in r.notes)

    # included: it normalizes by batch statistics for the pass, and stays frozen after
    bns = [bn for _, bn in eg.find_batchnorms(model)]
    for bn in bns:
        bn.trainable = True
    ref = reference_stats(model, batches_of(x, 32), bns)
    frozen.trainable = False
    eg.recalibrate(model, x, batch_size=32, include_frozen=True, shuffle=False, progress=False)
    assert_close_to_reference(frozen, ref[id(frozen)])
    assert frozen.trainable is False


def test_data_sources_give_the_same_statistics():
    x, y = far_data(64)
    model = functional_model()
    model(x[:2])
    sources = {
        "arrays": ((x, y), {"batch_size": 16, "shuffle": False}),  # the given order, as the other sources
        "list of batches": ([(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)], {}),
        "generator": ((xb for xb in batches_of(x, 16)), {}),
    }

    class Seq(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]

    sources["PyDataset"] = (Seq(), {})
    try:
        import tensorflow as tf

        sources["tf.data"] = (tf.data.Dataset.from_tensor_slices((x, y)).batch(16), {})
    except ImportError:  # pragma: no cover
        pass
    if BACKEND == "torch":
        import torch

        sources["torch DataLoader"] = (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=16), {})
    results = {}
    for name, (data, kwargs) in sources.items():
        r = eg.recalibrate(model, data, progress=False, **kwargs)
        assert r.batches == 4 and r.batch_size == 16, name
        results[name] = np.concatenate([layer.var_after for layer in r.recalibrated])
    first = results.pop("arrays")
    for name, value in results.items():
        np.testing.assert_allclose(value, first, rtol=1e-6, err_msg=name)


def test_default_batch_size_is_said_and_ragged_batches_left_out():
    x, _ = far_data(70)
    model = functional_model()
    r = eg.recalibrate(model, x, progress=False)
    assert r.batch_size == 32 and any("Keras's default" in n for n in r.notes)
    assert (r.batches, r.skipped_batches, r.skipped_samples) == (2, 1, 6)


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at", [0, 2, 5])
def test_failure_midway_leaves_the_model_as_it_was(exc, at):
    x, _ = far_data()
    model = functional_model()
    model(x[:2])
    before, before_layers = snapshot(model), layer_state(model)

    def gen():
        for i in range(6):
            if i == at:
                raise exc("stop")
            yield x[16 * i : 16 * (i + 1)]

    expected = KeyboardInterrupt if exc is KeyboardInterrupt else RecalibrationError
    with pytest.raises(expected):
        eg.recalibrate(model, gen(), progress=False)
    assert snapshot(model) == before and layer_state(model) == before_layers
    with pytest.raises(expected):  # diagnose reads the data with targets: same guarantee
        eg.diagnose(model, ((xb, np.zeros(len(xb), "int64")) for xb in gen()), progress=False)
    assert snapshot(model) == before and layer_state(model) == before_layers
    bn = eg.find_batchnorms(model)[0][1]
    assert "call" not in bn.__dict__ and "_moments" not in bn.__dict__  # patches removed


def test_clear_errors():
    x, _ = far_data(8)
    plain = keras.Sequential([keras.Input((8, 8, 3)), layers.Flatten(), layers.LayerNormalization(), layers.Dense(2)])
    with pytest.raises(ModelError, match="no BatchNormalization"):
        eg.recalibrate(plain, x, progress=False)
    with pytest.raises(DataError, match="no batch"):
        eg.recalibrate(functional_model(), iter([]), progress=False)
    model = functional_model()
    model(x[:2])
    before = snapshot(model)
    with pytest.raises(DataError, match=r"takes inputs of shape \(None, 8, 8, 3\).*\(4, 5, 5, 1\), which fit and evaluate refuse"):
        eg.recalibrate(model, [np.zeros((4, 5, 5, 1), "float32")], progress=False)  # refused before any pass
    assert snapshot(model) == before

    class Subclassed(keras.Model):  # no declared input shape: the pass itself fails, named by its batch
        def __init__(self):
            super().__init__()
            self.conv, self.bn = layers.Conv2D(4, 3), layers.BatchNormalization()

        def call(self, inputs, training=None):
            return self.bn(self.conv(inputs), training=training)

    sub = Subclassed()
    sub(x[:2])
    before = snapshot(sub)
    with pytest.raises(RecalibrationError, match="batch 0"):
        eg.recalibrate(sub, [np.zeros((4, 5, 5, 1), "float32")], progress=False)
    assert snapshot(sub) == before


@pytest.mark.skipif(BACKEND != "tensorflow", reason="synchronized=True is TensorFlow-only")
def test_synchronized_batchnorm():
    x, _ = far_data(64)
    inp = keras.Input((8, 8, 3))
    h = layers.BatchNormalization(synchronized=True)(layers.Conv2D(4, 3)(inp))
    model = keras.Model(inp, layers.Flatten()(h))
    bn = eg.find_batchnorms(model)[0][1]
    ref = reference_stats(model, batches_of(x, 16), [bn])
    r = eg.recalibrate(model, x, batch_size=16, shuffle=False, progress=False)
    assert_close_to_reference(bn, ref[id(bn)])
    assert "synchronized" in r.layers[0].kind


def test_non_finite_inputs_and_batches_of_one():
    x, _ = far_data(64)
    model = functional_model()
    model(x[:2])
    before = snapshot(model)
    bad = x.copy()
    bad[20, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match="batch_normalization received NaN or Inf.*the inputs"):
        eg.recalibrate(model, bad, batch_size=16, progress=False)
    dense_only = keras.Sequential([keras.Input((4,)), layers.Dense(3), layers.BatchNormalization()])
    with pytest.raises(DataError, match="batch of 1"):
        eg.recalibrate(dense_only, np.ones((4, 4), "float32"), batch_size=1, progress=False)
    assert snapshot(model) == before


def test_keras_applications_resnet50_inside_a_sequential_after_rescaling():
    x, _ = far_data(16, size=64)
    backbone = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3), pooling="avg")
    model = keras.Sequential([keras.Input((64, 64, 3)), layers.Rescaling(1 / 127.5, offset=-1.0), backbone, layers.Dense(3)])
    bns = [bn for _, bn in eg.find_batchnorms(model)]
    assert len(bns) == 53
    ref = reference_stats(model, batches_of(x, 8), bns)
    before = snapshot(model)
    result = eg.recalibrate(model, x, batch_size=8, shuffle=False, progress=False)
    assert len(result.recalibrated) == 53 and result.layers[0].name.startswith("resnet50/")
    for bn in bns:
        mean, var = ref[id(bn)]
        got = bn.moving_variance.numpy().astype(np.float64)
        # the exactness of the merge is checked at 1e-5 above; here the compiled pass and the eager
        # reference differ by float32 rounding through up to 52 layers, and conv5 normalizes 32 values a
        # channel (2x2 maps, batch 8), which amplifies it: 1e-3
        np.testing.assert_allclose(got, var, rtol=1e-3, atol=1e-6 * var.max(), err_msg=bn.name)
    after = snapshot(model)
    assert {k for k in before if before[k] != after[k]} == {v.path for bn in bns for v in (bn.moving_mean, bn.moving_variance)}


def test_fewer_samples_than_one_batch_is_one_batch_of_all_of_them():
    # fit(x, batch_size=32) on 10 samples trains on batches of 10: the statistics are those of that batch
    x, _ = far_data(10)
    model = functional_model()
    targets = [bn for _, bn in eg.find_batchnorms(model) if bn.trainable]
    ref = reference_stats(model, [x], targets)
    result = eg.recalibrate(model, x, batch_size=32, shuffle=False, progress=False)
    assert result.batches == 1 and result.samples == 10 and result.batch_size == 10
    assert any("batch_size=32 is more than the 10 samples" in n for n in result.notes)
    for bn in targets:
        assert_close_to_reference(bn, ref[id(bn)])


def test_batch_renormalization_gets_its_moving_stddev_and_a_failed_call_leaves_it():
    """renorm=True: Keras recomputes moving_variance from moving_stddev at every training step, so the stddev must
    hold sqrt(var + eps) of the exact statistics (it kept its old value: one step undid the recalibration)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(96, 10)) * 2 + 3).astype("float32")
    keras.utils.set_random_seed(0)
    bn = layers.BatchNormalization(renorm=True, momentum=0.9)
    model = keras.Sequential([keras.Input((10,)), layers.Dense(8), bn, layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, rng.integers(0, 3, 96), batch_size=16, epochs=1, verbose=0)
    before = snapshot(model)

    def failing():  # the data fail after the last batch: nothing written, the stddev as it was
        yield from batches_of(x, 16)
        raise Boom("stop")

    with pytest.raises(RecalibrationError):
        eg.recalibrate(model, failing(), progress=False)
    assert snapshot(model) == before
    ref = reference_stats(model, batches_of(x, 16), [bn])[id(bn)]
    eg.recalibrate(model, batches_of(x, 16), progress=False)
    assert_close_to_reference(bn, ref)
    stddev = np.asarray(keras.ops.convert_to_numpy(bn.moving_stddev), np.float64)
    np.testing.assert_allclose(stddev, np.sqrt(ref[1] + bn.epsilon), rtol=1e-6)


def test_statistics_beyond_a_float16_layer_are_refused_and_nothing_is_written():
    """A BatchNormalization in float16 (the 'float16' policy, or dtype='float16') cannot hold a variance above 65504:
    written, it would be inf. Refused with the fix, the variables bitwise unchanged; float32 takes the same data."""
    x = np.random.default_rng(0).normal(0, 400, (128, 4)).astype("float32")  # variance about 1.6e5 per feature
    reference = np.var(x.astype(np.float64), axis=0)
    assert reference.min() > 65504

    def make(dtype):
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,))
        return keras.Model(inp, layers.Dense(2)(layers.BatchNormalization(dtype=dtype)(inp)))

    model = make("float16")
    before = [np.array(v) for v in model.get_weights()]
    with pytest.raises(DataError, match="float16") as caught:
        eg.recalibrate(model, x, batch_size=16, shuffle=False, progress=False)
    assert "nothing was written" in str(caught.value)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    wide = make("float32")
    eg.recalibrate(wide, x, batch_size=16, shuffle=False, progress=False)
    np.testing.assert_allclose(np.asarray(wide.layers[1].moving_variance), reference, rtol=1e-5)
