"""evalgap.tf_keras.recalibrate against an eager float64 reference, and Keras 2's BatchNormalization specifics."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

import evalgap.tf_keras as eg
from evalgap import DataError, ModelError, RecalibrationError

from ._reference import assert_close_to_reference, changed, layer_state, reference_stats, snapshot


def far_data(n=96, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(100.0, 30.0, size=(n, size, size, 3)).astype("float32")
    y = rng.integers(0, 4, size=n)
    return x, y


def functional_model():
    """Fused (the 4D default), dense-path, ghost-batch, frozen and renorm layers."""
    inp = keras.Input((8, 8, 3))
    h = layers.Conv2D(6, 3, padding="same")(inp)
    h = layers.BatchNormalization(name="fused_bn")(h)
    h = layers.ReLU()(h)
    h = layers.Dropout(0.5)(h)
    h = layers.Conv2D(6, 3, padding="same")(h)
    h = layers.BatchNormalization(fused=False, name="dense_path_bn")(h)
    h = layers.Conv2D(6, 1)(h)
    h = layers.BatchNormalization(virtual_batch_size=4, name="ghost_bn")(h)
    frozen = layers.BatchNormalization(name="frozen_bn")
    h = frozen(layers.Conv2D(6, 3, padding="same")(h))
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(5)(h)
    h = layers.BatchNormalization(momentum=0.9, renorm=True, name="renorm_bn")(h)
    model = keras.Model(inp, layers.Dense(4)(h))
    frozen.trainable = False
    return model


def sequential_nested_model():
    inner_in = keras.Input((8, 8, 3))
    z = layers.Conv2D(4, 3, padding="same")(inner_in)
    z = layers.BatchNormalization()(z)
    z = layers.Activation("relu")(z)
    z = layers.Conv2D(4, 3, strides=2)(z)
    z = layers.BatchNormalization(axis=-1, fused=False)(z)
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


def transfer_model():
    """The Keras 2 transfer-learning recipe: a backbone called with training=False runs in inference mode in fit."""
    base_in = keras.Input((8, 8, 3))
    b = layers.BatchNormalization(name="base_bn")(layers.Conv2D(4, 3, padding="same")(base_in))
    base = keras.Model(base_in, layers.ReLU()(b), name="base")
    inp = keras.Input((8, 8, 3))
    h = base(inp, training=False)
    h = layers.Dense(5)(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inp, layers.Dense(4)(layers.BatchNormalization(name="head_bn")(h)))


def batches_of(x, size):
    return [x[i : i + size] for i in range(0, len(x) - len(x) % size, size)]


def _stat_names(bns) -> set[str]:
    names = set()
    for bn in bns:
        names |= {bn.moving_mean.name, bn.moving_variance.name}
        if bn.renorm:
            names.add(bn.moving_stddev.name)
    return names


MODELS = {"functional": functional_model, "sequential-nested": sequential_nested_model, "subclassed": Subclassed, "transfer": transfer_model}


@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_exact_statistics_and_nothing_else_changes(make):
    x, y = far_data()
    model = make()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # moving stats, optimizer state exist
    bns = [bn for _, bn in eg.find_batchnorms(model)]
    inference_only = {"base_bn"} if make is transfer_model else set()
    targets = [bn for bn in bns if bn.trainable and bn.name not in inference_only]
    ref = reference_stats(model, batches_of(x, 16), targets)
    before, before_layers = snapshot(model), layer_state(model)

    result = eg.recalibrate(model, (x, y), batch_size=16, shuffle=False, progress=False)  # the reference's batches

    for bn in targets:
        assert_close_to_reference(bn, ref[id(bn)])
    assert changed(before, snapshot(model)) == _stat_names(targets)
    assert layer_state(model) == before_layers
    assert result.batches == 6 and result.samples == 96 and result.batch_size == 16
    assert len(result.recalibrated) == len(targets)
    assert {layer.name.split("/")[-1] for layer in result.frozen} == {bn.name for bn in bns if bn not in targets}


def test_biased_variance_for_fused_and_dense_path_where_keras_stores_bessel_for_fused():
    """Keras 2's fused kernel feeds its moving average the Bessel-corrected batch variance; the
    dense path the biased one. The population statistics written are the biased variance for both."""
    x, _ = far_data(16)
    inp = keras.Input((8, 8, 3))
    fused, dense = layers.BatchNormalization(momentum=0.0), layers.BatchNormalization(momentum=0.0, fused=False)
    model = keras.Model(inp, [fused(inp), dense(inp)])
    assert fused.fused and not dense.fused
    n = 16 * 8 * 8
    biased = x.reshape(-1, 3).astype(np.float64).var(axis=0)
    model(x, training=True)  # momentum 0: the moving statistics become this batch's, as Keras 2 computes them
    np.testing.assert_allclose(fused.moving_variance.numpy(), biased * n / (n - 1), rtol=1e-5)
    np.testing.assert_allclose(dense.moving_variance.numpy(), biased, rtol=1e-5)
    eg.recalibrate(model, x, batch_size=16, progress=False)
    for bn in (fused, dense):
        np.testing.assert_allclose(bn.moving_variance.numpy(), biased, rtol=1e-5)
        np.testing.assert_allclose(bn.moving_mean.numpy(), x.reshape(-1, 3).mean(0), rtol=1e-5)


def test_virtual_batches_normalize_per_ghost_batch_and_write_the_population_variance():
    x, _ = far_data(64)
    inp = keras.Input((8, 8, 3))
    ghost = layers.BatchNormalization(virtual_batch_size=4, momentum=0.0, name="ghost")
    after = layers.BatchNormalization(name="after")
    model = keras.Model(inp, after(layers.Conv2D(3, 1)(ghost(inp))))
    ref = reference_stats(model, batches_of(x, 16), [ghost, after])
    model(x[:16], training=True)  # Keras 2's own update: the mean of the 4 ghost batches' variances
    ghosts = x[:16].reshape(4, 4, -1, 3).astype(np.float64)  # (virtual batch, ghost, ...): ghost g = samples g, g+4, ...
    np.testing.assert_allclose(ghost.moving_variance.numpy().reshape(-1), ghosts.var(axis=(0, 2)).mean(0), rtol=1e-5)
    eg.recalibrate(model, x, batch_size=16, shuffle=False, progress=False)
    for bn in (ghost, after):
        assert_close_to_reference(bn, ref[id(bn)])
    assert ghost.moving_variance.shape == (1, 1, 1, 1, 3)
    # the variance written is the population's: above what Keras 2's moving average tends to, the mean over
    # all ghost batches of their variances (it drops the spread of the ghost batches' means)
    within = x.reshape(4, 4, 4, -1, 3).astype(np.float64).var(axis=(1, 3)).mean(axis=(0, 1))
    assert np.all(ghost.moving_variance.numpy().reshape(-1) > within * (1 + 1e-3))


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
    frozen.trainable = True
    ref = reference_stats(model, batches_of(x, 32), bns)
    frozen.trainable = False
    eg.recalibrate(model, x, batch_size=32, include_frozen=True, shuffle=False, progress=False)
    for bn in bns:
        assert_close_to_reference(bn, ref[id(bn)])
    assert frozen.trainable is False


def test_data_sources_give_the_same_statistics():
    x, y = far_data(64)
    model = functional_model()
    model(x[:4])

    class Seq(keras.utils.Sequence):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]

    sources = {
        "arrays": ((x, y), {"batch_size": 16, "shuffle": False}),
        "list of batches": ([(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)], {}),
        "generator": ((xb for xb in batches_of(x, 16)), {}),
        "Sequence": (Seq(), {}),
        "tf.data": (tf.data.Dataset.from_tensor_slices((x, y)).batch(16), {}),
    }
    results = {}
    for name, (data, kwargs) in sources.items():
        r = eg.recalibrate(model, data, progress=False, **kwargs)
        assert r.batches == 4 and r.batch_size == 16, name
        results[name] = np.concatenate([layer.var_after for layer in r.recalibrated])
    first = results.pop("arrays")
    for name, value in results.items():
        np.testing.assert_allclose(value, first, rtol=1e-6, err_msg=name)


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at", [0, 3])
def test_failure_midway_leaves_the_model_as_it_was(exc, at):
    x, _ = far_data()
    model = functional_model()
    model(x[:4])
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


@pytest.mark.parametrize("fails_again", [False, True])
def test_a_failing_write_is_rolled_back_bitwise(monkeypatch, fails_again):
    """A write that fails half way is put back bitwise; where the variable that failed fails again in the rollback
    (tried first), every other variable is still put back."""
    x, _ = far_data(32)
    model = functional_model()
    model(x[:4])
    before = snapshot(model)
    renorm = model.get_layer("renorm_bn")
    failed: list[int] = []
    original = type(renorm.moving_stddev).assign

    def failing_assign(self, value, *args, **kwargs):
        if self is renorm.moving_stddev and (fails_again or not failed):
            failed.append(1)
            raise Boom("disk full")
        return original(self, value, *args, **kwargs)

    monkeypatch.setattr(type(renorm.moving_stddev), "assign", failing_assign)
    with pytest.raises(Boom):
        eg.recalibrate(model, x, batch_size=16, progress=False)
    assert snapshot(model) == before
    if fails_again:
        from evalgap.tf_keras.adapter import ADAPTER  # the adapter's own rollback, without the engine's second write

        layers_ = ADAPTER.layers(model)
        with pytest.raises(Boom):
            ADAPTER.write(layers_, [(mean + 1.0, var + 1.0) for mean, var in ADAPTER.read(layers_)])
        assert snapshot(model) == before
    monkeypatch.undo()
    assert snapshot(model) == before


def test_clear_errors():
    x, _ = far_data(8)
    plain = keras.Sequential([keras.Input((8, 8, 3)), layers.Flatten(), layers.LayerNormalization(), layers.Dense(2)])
    with pytest.raises(ModelError, match="no BatchNormalization"):
        eg.recalibrate(plain, x, progress=False)
    with pytest.raises(DataError, match="no batch"):
        eg.recalibrate(functional_model(), iter([]), progress=False)
    model = functional_model()
    model(x[:4])
    before = snapshot(model)
    with pytest.raises(DataError, match=r"takes inputs of shape \(None, 8, 8, 3\).*\(4, 5, 5, 1\), which fit and evaluate refuse"):
        eg.recalibrate(model, [np.zeros((4, 5, 5, 1), "float32")], progress=False)  # refused before any pass
    with pytest.raises(RecalibrationError, match="multiple of it"):  # ghost batches of 4 in a batch of 6
        eg.recalibrate(model, x[:6], batch_size=6, progress=False)
    assert snapshot(model) == before
    with pytest.raises(ModelError, match="Keras 2"):
        eg.recalibrate(object(), x, progress=False)


def test_keras3_and_keras2_models_are_told_apart():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3."):
        pytest.skip("Keras 3 is not installed")
    import evalgap.keras

    x, _ = far_data(16)
    k2 = functional_model()
    with pytest.raises(ModelError, match="evalgap.tf_keras"):
        evalgap.keras.recalibrate(k2, x, batch_size=8, progress=False)
    k3 = keras3.Sequential([keras3.Input((8, 8, 3)), keras3.layers.BatchNormalization()])
    with pytest.raises(ModelError, match="evalgap.keras"):
        eg.recalibrate(k3, x, batch_size=8, progress=False)


def test_the_pass_assigns_nothing_even_in_its_graph():
    """No assignment op to a model variable is traced: the updates never run, so nothing can change."""
    from evalgap.engine import Batch
    from evalgap.tf_keras.adapter import ADAPTER

    x, _ = far_data(16)
    model = functional_model()
    model(x[:4])
    norm = ADAPTER.layers(ADAPTER.prepare(model, Batch(x)))
    ops: set[str] = set()
    for flags in ([True] * len(norm), [False] * len(norm)):
        moments_pass = ADAPTER.moments_pass(model, norm, flags)
        with moments_pass as run:
            run(Batch(x, size=16))
            graph = moments_pass._step.get_concrete_function(x, moments_pass._stats).graph
        ops |= {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in ops  # the fused kernel ran, in training mode, without its moving-average assignment
    assert not ops & {"AssignVariableOp", "AssignSubVariableOp", "AssignAddVariableOp"}, ops


def test_a_model_that_needs_its_batch_size_keeps_its_inference_only_base_frozen():
    """``base(x, training=False)`` in a model whose call reads ``x.shape[0]``: the base stays frozen."""
    import tensorflow as tf

    from evalgap.tf_keras.layers import keras as k2

    base = k2.Sequential([k2.layers.Dense(16), k2.layers.BatchNormalization()], name="base")

    class Net(k2.Model):
        def __init__(self):
            super().__init__()
            self.base, self.head = base, k2.layers.Dense(3)

        def call(self, x, training=None):
            h = self.base(x, training=False)  # the transfer-learning recipe
            return self.head(tf.reshape(h, [x.shape[0], -1]))  # needs a static batch dimension

    model = Net()
    x = (np.random.default_rng(0).normal(size=(128, 8)) * 5 + 3).astype("float32")
    model(x[:32])
    before = base.layers[1].moving_variance.numpy().copy()
    r = eg.recalibrate(model, x, batch_size=32, include_frozen=False, progress=False)
    assert [layer.status for layer in r.layers] == ["frozen"]
    np.testing.assert_array_equal(base.layers[1].moving_variance.numpy(), before)
