"""BatchNorm layers the user writes or calls in their own way, NNX and Linen, against references written here.

- Subclasses of ``BatchNorm`` whose ``__call__`` changes the input before ``super().__call__`` (a channels-first
  port, a rescaling) or only passes it on, with the base signature or a narrower one (no ``mask``, ``(x, train)``):
  the statistics are those of the tensor the base BatchNorm normalizes (float64 NumPy, computed here from the data),
  one capture per normalization; the modes equal the model's own loops.
- A BatchNorm the model always runs on batch statistics (``use_running_average=False`` in evaluation mode too): as
  PyTorch's ``track_running_stats=False``, status ``no-running-stats``, never written, batch statistics in every mode;
  E equals the model's own evaluation loop (``train=False``), Td and T its training-mode loop at the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from ._reference import snapshot

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import evalgap.flax as eg  # noqa: E402

RTOL = 1e-5


def nchw_batches(n: int = 3, size: int = 32, seed: int = 0):
    """NCHW inputs with W == C == 8 (a wrong feature axis gives no shape error), channel c scaled by c + 1."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, 9, dtype=np.float32)[None, :, None, None]
    return [((rng.normal(3.0, 2.0, (size, 8, 8, 8)) * scale).astype(np.float32), rng.integers(0, 4, size)) for _ in range(n)]


def nhwc_batches(n: int = 4, size: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [(rng.normal(5.0, 3.0, (size, 6, 6, 3)).astype(np.float32), rng.integers(0, 4, size)) for _ in range(n)]


def reference(inputs) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean and biased variance per channel (last axis) over every batch's normalized tensor."""
    a = np.concatenate([np.asarray(i, np.float64) for i in inputs])
    axes = tuple(range(a.ndim - 1))
    return a.mean(axes), a.var(axes)


def to_nhwc(x):
    return np.transpose(np.asarray(x, np.float64), (0, 2, 3, 1))


def loss(pairs) -> float:
    """Per-sample cross-entropy over all batches, in float64."""
    total = sum(float(optax.softmax_cross_entropy_with_integer_labels(out, y).sum()) for out, y in pairs)
    return total / sum(len(y) for _, y in pairs)


def assert_close(got, want, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(got, np.float64).reshape(-1), want, rtol=rtol, atol=1e-6 * float(np.max(np.abs(want))))


# ---- NNX subclasses ------------------------------------------------------------------------
class BN2d(nnx.BatchNorm):
    """A channels-first port (PyTorch's BatchNorm2d): the base normalizes the NHWC transpose."""

    def __call__(self, x, use_running_average=None, *, mask=None):
        y = super().__call__(jnp.transpose(x, (0, 2, 3, 1)), use_running_average=use_running_average, mask=mask)
        return jnp.transpose(y, (0, 3, 1, 2))


class BNCast(nnx.BatchNorm):
    """A narrower signature: no ``mask``."""

    def __call__(self, x, use_running_average=None):
        return super().__call__(x.astype(jnp.float32), use_running_average=use_running_average)


class BNTrain(nnx.BatchNorm):
    """``(x, train)``, and the base normalizes ``2 x + 1``, not the subclass's input."""

    def __call__(self, x, train):
        return super().__call__(2.0 * x + 1.0, use_running_average=not train)


class NnxChannelsFirst(nnx.Module):
    def __init__(self, rngs):
        self.bn = BN2d(8, rngs=rngs)
        self.lin = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x, train: bool = False):
        return self.lin(self.bn(x, use_running_average=not train).mean((2, 3)))


class NnxNarrow(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.cast = BNCast(6, rngs=rngs)
        self.twice = BNTrain(6, rngs=rngs)
        self.lin = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x, train: bool = False):
        h = nnx.relu(self.cast(self.conv(x), use_running_average=not train))
        return self.lin(self.twice(h, train).mean((1, 2)))


def nnx_loop(model, batches, train: bool):
    """The model's own jitted loop on a clone at fixed weights (training mode: batch statistics, nothing kept)."""
    step = nnx.jit(lambda m, x: m(x, train=train))
    return [(step(nnx.clone(model), x), y) for x, y in batches]


def nnx_stale(model) -> None:
    """Moving statistics far from the data's, so that E and P differ."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            m.mean[...] = m.mean[...] + 0.7
            m.var[...] = m.var[...] * 3.0


def test_nnx_channels_first_subclass_gets_the_statistics_of_the_tensor_its_base_normalizes():
    batches = nchw_batches()
    model = NnxChannelsFirst(nnx.Rngs(0))
    nnx_stale(model)
    mean, var = reference([to_nhwc(x) for x, _ in batches])  # channel c: mean 3 (c + 1), var 4 (c + 1)^2

    report = eg.diagnose(model, batches, progress=False)
    layer = report.recalibration["bn"]
    assert layer.status == "measured" and layer.calls_per_batch == 1 and layer.count == 96 * 8 * 8
    assert_close(layer.mean_after, mean)
    assert_close(layer.var_after, var)
    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(loss(nnx_loop(model, batches, False)), rel=RTOL)
    assert values["Td"] == pytest.approx(loss(nnx_loop(model, batches, True)), rel=RTOL)
    assert values["T"] == values["Td"]

    result = eg.recalibrate(model, batches, progress=False)
    assert result["bn"].status == "recalibrated"
    assert_close(model.bn.mean[...], mean)
    assert_close(model.bn.var[...], var)
    assert values["P"] == pytest.approx(loss(nnx_loop(model, batches, False)), rel=RTOL)  # P: the user's loop, exact stats


def test_nnx_subclasses_with_narrower_signatures_run_their_own_call():
    batches = nhwc_batches()
    model = NnxNarrow(nnx.Rngs(0))
    nnx_stale(model)
    h = [np.asarray(model.conv(x), np.float64) for x, _ in batches]
    cast = reference(h)

    def block(x):  # the second layer's base input: 2 relu(BN_batch(conv(x))) + 1, by the model's own layers
        m = nnx.clone(model)
        m.train()
        return 2.0 * np.asarray(nnx.relu(m.cast(m.conv(x))), np.float64) + 1.0

    twice = reference([block(x) for x, _ in batches])

    report = eg.diagnose(model, batches, progress=False)
    assert {layer.name: layer.status for layer in report.recalibration.layers} == {"cast": "measured", "twice": "measured"}
    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(loss(nnx_loop(model, batches, False)), rel=RTOL)
    assert values["Td"] == pytest.approx(loss(nnx_loop(model, batches, True)), rel=RTOL)

    eg.recalibrate(model, batches, progress=False)
    for bn, (mean, var) in ((model.cast, cast), (model.twice, twice)):
        assert_close(bn.mean[...], mean, rtol=1e-4)
        assert_close(bn.var[...], var, rtol=1e-4)
    assert values["P"] == pytest.approx(loss(nnx_loop(model, batches, False)), rel=1e-4)


# ---- Linen subclasses ----------------------------------------------------------------------
class LBN2d(nn.BatchNorm):
    @nn.compact
    def __call__(self, x, use_running_average=None):
        y = super().__call__(jnp.transpose(x, (0, 2, 3, 1)), use_running_average=use_running_average)
        return jnp.transpose(y, (0, 3, 1, 2))


class LPass(nn.BatchNorm):
    @nn.compact
    def __call__(self, x, use_running_average=None):
        return super().__call__(x, use_running_average=use_running_average) * 1.0


class LTrain(nn.BatchNorm):
    """``(x, train)``: its second argument is the training flag, not ``use_running_average``."""

    @nn.compact
    def __call__(self, x, train):
        return super().__call__(2.0 * x + 1.0, use_running_average=not train)


class LinenChannelsFirst(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(4)(LBN2d(use_running_average=not train, name="bn")(x).mean((2, 3)))


class LinenSubclasses(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(6, (3, 3), name="conv")(x)
        self.sow("intermediates", "pass_in", h)
        h = nn.relu(LPass(use_running_average=not train, name="pass")(h))
        self.sow("intermediates", "twice_in", 2.0 * h + 1.0)
        return nn.Dense(4)(LTrain(name="twice")(h, train).mean((1, 2)))


def linen_loop(module, variables, batches, train: bool):
    step = jax.jit(lambda v, x: module.apply(v, x, train=train, mutable=["batch_stats"])[0])
    return [(step(variables, x), y) for x, y in batches]


def linen_stale(variables):
    stats = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.7 if "mean" in jax.tree_util.keystr(p) else a * 3.0, variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


def test_linen_channels_first_subclass_gets_the_statistics_of_the_tensor_its_base_normalizes():
    batches = nchw_batches()
    module = LinenChannelsFirst()
    variables = linen_stale(module.init(jax.random.key(0), batches[0][0]))
    mean, var = reference([to_nhwc(x) for x, _ in batches])

    report = eg.diagnose((module, variables), batches, progress=False)
    layer = report.recalibration["bn"]
    assert layer.status == "measured" and layer.calls_per_batch == 1 and layer.count == 96 * 8 * 8
    assert_close(layer.mean_after, mean)
    assert_close(layer.var_after, var)
    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(loss(linen_loop(module, variables, batches, False)), rel=RTOL)
    assert values["Td"] == pytest.approx(loss(linen_loop(module, variables, batches, True)), rel=RTOL)

    result, new = eg.recalibrate((module, variables), batches, progress=False)
    assert result["bn"].status == "recalibrated"
    assert_close(new["batch_stats"]["bn"]["mean"], mean)
    assert_close(new["batch_stats"]["bn"]["var"], var)
    assert values["P"] == pytest.approx(loss(linen_loop(module, new, batches, False)), rel=RTOL)


def test_linen_subclasses_count_each_normalization_once_and_read_their_own_signature():
    """A pass-through subclass is one call per batch, not two; ``LTrain(h, train)``'s ``train`` is no
    ``use_running_average`` (it is not frozen) and its base normalizes ``2 h + 1``."""
    batches = nhwc_batches()
    module = LinenSubclasses()
    variables = linen_stale(module.init(jax.random.key(0), batches[0][0]))
    seen = [module.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])[1]["intermediates"] for x, _ in batches]
    refs = {name: reference([s[f"{name}_in"][0] for s in seen]) for name in ("pass", "twice")}

    report = eg.diagnose((module, variables), batches, progress=False)
    layers = {layer.name: layer for layer in report.recalibration.layers}
    assert {name: layer.status for name, layer in layers.items()} == {"pass": "measured", "twice": "measured"}
    for name, (mean, var) in refs.items():
        assert layers[name].calls_per_batch == 1 and layers[name].count == 64 * 6 * 6
        assert_close(layers[name].mean_after, mean)
        assert_close(layers[name].var_after, var)
    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(loss(linen_loop(module, variables, batches, False)), rel=RTOL)
    assert values["Td"] == pytest.approx(loss(linen_loop(module, variables, batches, True)), rel=RTOL)


# ---- a BatchNorm always on batch statistics --------------------------------------------------
class NnxAlwaysBatch(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.bn_always = nnx.BatchNorm(8, rngs=rngs)  # test-time BN: batch statistics in every mode
        self.lin = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x, train: bool = False):
        h = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
        h = self.bn_always(h, use_running_average=False)
        return self.lin(h.mean((1, 2)))


class LinenAlwaysBatch(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(8, (3, 3), name="conv")(x)
        self.sow("intermediates", "bn_in", h)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(h))
        h = nn.BatchNorm(use_running_average=False, name="bn_always")(h)
        return nn.Dense(4)(h.mean((1, 2)))


def test_nnx_layer_always_on_batch_statistics_is_not_recalibrated_and_e_is_the_models_own_evaluation():
    batches = nhwc_batches()
    model = NnxAlwaysBatch(nnx.Rngs(0))
    nnx_stale(model)
    mean, var = reference([np.asarray(model.conv(x), np.float64) for x, _ in batches])
    always = snapshot({"mean": model.bn_always.mean[...], "var": model.bn_always.var[...]})

    report = eg.diagnose(model, batches, progress=False)
    assert {layer.name: layer.status for layer in report.recalibration.layers} == {"bn": "measured", "bn_always": "no-running-stats"}
    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(loss(nnx_loop(model, batches, False)), rel=RTOL)
    assert values["Td"] == pytest.approx(loss(nnx_loop(model, batches, True)), rel=RTOL)
    assert values["T"] == values["Td"]

    result = eg.recalibrate(model, batches, progress=False)
    assert result["bn"].status == "recalibrated" and result["bn_always"].status == "no-running-stats"
    assert snapshot({"mean": model.bn_always.mean[...], "var": model.bn_always.var[...]}) == always  # not written
    assert_close(model.bn.mean[...], mean)
    assert_close(model.bn.var[...], var)
    assert values["P"] == pytest.approx(loss(nnx_loop(model, batches, False)), rel=RTOL)


def test_linen_layer_always_on_batch_statistics_is_not_recalibrated_and_e_is_the_models_own_evaluation():
    batches = nhwc_batches()
    module = LinenAlwaysBatch()
    variables = linen_stale(module.init(jax.random.key(0), batches[0][0]))
    seen = [module.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])[1]["intermediates"] for x, _ in batches]
    mean, var = reference([s["bn_in"][0] for s in seen])

    report = eg.diagnose((module, variables), batches, progress=False)
    assert {layer.name: layer.status for layer in report.recalibration.layers} == {"bn": "measured", "bn_always": "no-running-stats"}
    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(loss(linen_loop(module, variables, batches, False)), rel=RTOL)
    assert values["Td"] == pytest.approx(loss(linen_loop(module, variables, batches, True)), rel=RTOL)

    result, new = eg.recalibrate((module, variables), batches, progress=False)
    assert result["bn"].status == "recalibrated" and result["bn_always"].status == "no-running-stats"
    assert snapshot(new["batch_stats"]["bn_always"]) == snapshot(variables["batch_stats"]["bn_always"])
    assert_close(new["batch_stats"]["bn"]["mean"], mean)
    assert_close(new["batch_stats"]["bn"]["var"], var)
    assert values["P"] == pytest.approx(loss(linen_loop(module, new, batches, False)), rel=RTOL)
