"""BatchNorm layers inside lifted transforms (remat, scan, vmap; Linen and NNX) and over several feature axes,
against a float64 NumPy forward written here from the model's weights (each BatchNorm on the batch's
statistics, as in the moments pass) and the user's own evaluation loop."""

from __future__ import annotations

import numpy as np
import pytest

from ._reference import assert_stats_close, changed, nnx_snapshot, snapshot

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import evalgap.flax as eg  # noqa: E402
from evalgap.engine import Batch  # noqa: E402
from evalgap.errors import ModelError  # noqa: E402
from evalgap.flax.adapter import FlaxAdapter  # noqa: E402

EPS = 1e-5


def data(n: int = 4, size: int = 16, features: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(2.0, 3.0, (size, features)).astype(np.float32), rng.integers(0, 3, size)) for _ in range(n)]


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def bn_batch(h: np.ndarray, scale, bias) -> np.ndarray:
    """BatchNorm on the batch's own statistics, in float64."""
    return (h - h.mean(0)) / np.sqrt(h.var(0) + EPS) * f64(scale) + f64(bias)


def block(x: np.ndarray, p: dict, record: list) -> np.ndarray:
    """``x + relu(BN(Dense(x)))``; the BatchNorm's input is appended to ``record``."""
    h = x @ f64(p["kernel"]) + f64(p["bias"])
    record.append(h)
    return x + np.maximum(bn_batch(h, p["scale"], p["beta"]), 0)


def moments(xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(xs)
    return x.mean(0), x.var(0)


def stale(tree):
    """Moving statistics far from the data's (mean + 0.5, variance x 2), as after a distribution shift."""
    return jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.5 if "mean" in jax.tree_util.keystr(p) else a * 2.0 if "var" in jax.tree_util.keystr(p) else a, tree)


# ---- Linen -------------------------------------------------------------------------------
class LBlock(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, name="bn")(nn.Dense(6, name="lin")(x))
        return x + nn.relu(h), None


class LRemat(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x, _ = nn.remat(LBlock)(train=train, name="block")(nn.Dense(6, name="inp")(x), None)
        return nn.Dense(3, name="head")(x)


class LScan(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        blocks = nn.scan(LBlock, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}, length=3)
        x, _ = blocks(train=train, name="block")(nn.Dense(6, name="inp")(x), None)
        return nn.Dense(3, name="head")(x)


class LVmap(nn.Module):
    """An ensemble of two members over the same input, each with its own BatchNorm."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        members = nn.vmap(LBlock, in_axes=(None, None), out_axes=0, variable_axes={"params": 0, "batch_stats": 0},
                          split_rngs={"params": True}, axis_size=2)
        y, _ = members(train=train, name="block")(nn.Dense(6, name="inp")(x), None)
        return nn.Dense(3, name="head")(y.mean(0))


LINEN = {"remat": LRemat, "scan": LScan, "vmap": LVmap}


def linen_reference(kind: str, variables, batches) -> tuple[np.ndarray, np.ndarray]:
    """Per stacked layer (stacked axis first; remat: none), the moments of the block BatchNorm's input."""
    p = variables["params"]
    b = {"kernel": p["block"]["lin"]["kernel"], "bias": p["block"]["lin"]["bias"], "scale": p["block"]["bn"]["scale"],
         "beta": p["block"]["bn"]["bias"]}
    layers = 1 if kind == "remat" else int(np.shape(b["kernel"])[0])
    take = (lambda i: b) if kind == "remat" else (lambda i: {k: np.asarray(v)[i] for k, v in b.items()})
    records: list[list] = [[] for _ in range(layers)]
    for x, _ in batches:
        h = f64(x) @ f64(p["inp"]["kernel"]) + f64(p["inp"]["bias"])
        for i in range(layers):
            out = block(h, take(i), records[i])
            if kind == "scan":
                h = out
    stats = [moments(r) for r in records]
    if kind == "remat":
        return stats[0]
    return np.stack([m for m, _ in stats]), np.stack([v for _, v in stats])


@pytest.mark.parametrize("kind", ["remat", "scan", "vmap"])
def test_linen_batchnorm_inside_a_lifted_transform_gets_its_own_exact_statistics(kind):
    module, batches = LINEN[kind](), data()
    variables = module.init(jax.random.key(0), batches[0][0])
    variables = {"params": variables["params"], "batch_stats": stale(variables["batch_stats"])}
    before = snapshot(variables)
    ref_mean, ref_var = linen_reference(kind, variables, batches)

    result, new = eg.recalibrate((module, variables), batches, progress=False)

    assert snapshot(variables) == before, "the given variables were modified"
    stats = new["batch_stats"]["block"]["bn"]
    assert np.shape(stats["mean"]) == np.shape(variables["batch_stats"]["block"]["bn"]["mean"])  # (3, 6), (2, 6), (6,)
    assert_stats_close(np.ravel(stats["mean"]), np.ravel(stats["var"]), (ref_mean.ravel(), ref_var.ravel()), name=kind)
    assert changed(before, snapshot(new)) == {f"['batch_stats']['block']['bn']['{s}']" for s in ("mean", "var")}
    layer = result["block/bn"]
    assert layer.status == "recalibrated" and layer.channels == ref_mean.size and layer.samples == 64
    np.testing.assert_allclose(np.asarray(module.apply(new, batches[0][0])).shape, (16, 3))


class LBroadcast(nn.Module):
    """A frozen BatchNorm shared by every step of a scan (its statistics broadcast): nothing can carry its moments out."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        class Frozen(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return x + nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Dense(6, name="lin")(x))), None

        steps = nn.scan(Frozen, variable_axes={"params": 0}, variable_broadcast="batch_stats", split_rngs={"params": True}, length=2)
        x, _ = steps(name="block")(nn.Dense(6, name="inp")(x), None)
        return nn.Dense(3, name="head")(x)


def test_linen_transform_that_cannot_carry_the_moments_out_is_a_model_error_naming_the_layer():
    module, batches = LBroadcast(), data(2)
    variables = module.init(jax.random.key(0), batches[0][0])
    before = snapshot(variables)
    for run in (eg.recalibrate, eg.diagnose):
        with pytest.raises(ModelError, match=r"block/bn is called inside a lifted transform.*batch_stats"):
            run((module, variables), batches, progress=False)
    assert snapshot(variables) == before


# ---- NNX ---------------------------------------------------------------------------------
class NBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(6, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)

    def __call__(self, x):
        return x + nnx.relu(self.bn(self.lin(x)))


class NRemat(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.inp, self.block, self.head = nnx.Linear(5, 6, rngs=rngs), NBlock(rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.remat(lambda b, x: b(x))(self.block, self.inp(x)))


class NScan(nnx.Module):
    """Three blocks created stacked by ``nnx.vmap`` and applied in turn by ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NBlock(rngs)

        self.inp, self.block, self.head = nnx.Linear(5, 6, rngs=rngs), make(rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, x):
            return block(x)

        return self.head(body(self.block, self.inp(x)))


class NScanStateAxes(NScan):
    """As :class:`NScan`, with the state axes written out as Flax's scan-over-layers guide does."""

    axes = staticmethod(lambda: nnx.StateAxes({(nnx.Param, nnx.BatchStat): 0, ...: None}))

    def __call__(self, x):
        @nnx.scan(in_axes=(self.axes(), nnx.Carry), out_axes=nnx.Carry)
        def body(block, x):
            return block(x)

        return self.head(body(self.block, self.inp(x)))


class NScanStateAxesOnly(NScanStateAxes):
    """State axes naming only the parameters and batch statistics (no ``...`` entry)."""

    axes = staticmethod(lambda: nnx.StateAxes({(nnx.Param, nnx.BatchStat): 0}))


class NTwice(nnx.Module):
    """One BatchNorm called twice inside ``nnx.remat``: both calls pooled, as a shared layer's."""

    def __init__(self, rngs: nnx.Rngs):
        self.inp, self.block, self.head = nnx.Linear(5, 6, rngs=rngs), NBlock(rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        def body(b, x):
            return b.bn(b.bn(b.lin(x)) * 2.0 + 300.0)

        return self.head(nnx.remat(body)(self.block, self.inp(x)))


class NCarry(nnx.Module):
    """One block carried by ``nnx.scan`` and applied three times: its BatchNorm's three calls pooled."""

    def __init__(self, rngs: nnx.Rngs):
        self.inp, self.block, self.head = nnx.Linear(5, 6, rngs=rngs), NBlock(rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def body(carry, step):
            b, h = carry
            return (b, b(h)), step

        (_, h), _ = body((self.block, self.inp(x)), jnp.arange(3))
        return self.head(h)


def nnx_reference(model, batches) -> tuple[np.ndarray, np.ndarray]:
    b = model.block
    p = {"kernel": b.lin.kernel[...], "bias": b.lin.bias[...], "scale": b.bn.scale[...], "beta": b.bn.bias[...]}
    stacked = np.ndim(p["scale"]) == 2
    layers = np.shape(p["scale"])[0] if stacked else 1
    records: list[list] = [[] for _ in range(layers)]
    for x, _ in batches:
        h = f64(x) @ f64(model.inp.kernel[...]) + f64(model.inp.bias[...])
        if isinstance(model, NTwice):
            first = h @ f64(p["kernel"]) + f64(p["bias"])
            second = bn_batch(first, p["scale"], p["beta"]) * 2.0 + 300.0
            records[0] += [first, second]
            continue
        if isinstance(model, NCarry):
            for _ in range(3):
                h = block(h, p, records[0])
            continue
        for i in range(layers):
            h = block(h, {k: np.asarray(v)[i] for k, v in p.items()} if stacked else p, records[i])
    stats = [moments(r) for r in records]
    return (np.stack([m for m, _ in stats]), np.stack([v for _, v in stats])) if stacked else stats[0]


def nnx_stale(model) -> None:
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            m.mean[...] = m.mean[...] + 0.5
            m.var[...] = m.var[...] * 2.0


@pytest.mark.parametrize("cls", [NRemat, NScan, NScanStateAxes, NScanStateAxesOnly, NTwice, NCarry],
                         ids=["remat", "scan", "scan-stateaxes", "scan-stateaxes-only", "twice-in-remat", "carried-by-scan"])
def test_nnx_batchnorm_inside_a_lifted_transform_gets_its_own_exact_statistics(cls):
    model, batches = cls(nnx.Rngs(0)), data()
    nnx_stale(model)
    ref_mean, ref_var = nnx_reference(model, batches)
    before = nnx_snapshot(model)

    result = eg.recalibrate(model, batches, progress=False)

    bn = model.block.bn
    assert np.shape(bn.mean[...]) == ref_mean.shape  # stacked (3, 6) stays stacked
    assert_stats_close(np.ravel(bn.mean[...]), np.ravel(bn.var[...]), (ref_mean.ravel(), ref_var.ravel()), name=cls.__name__)
    assert changed(before, nnx_snapshot(model)) == {f"['block']['bn']['{s}'].value" for s in ("mean", "var")}
    assert result["block/bn"].status == "recalibrated" and result["block/bn"].channels == ref_mean.size
    assert result["block/bn"].count == 64 * {NTwice: 2, NCarry: 3}.get(cls, 1)  # values per channel, every call


# ---- a masked call that normalizes nothing; a transform that drops the layer's state --------------
class NMasked(nnx.Module):
    """``bn`` masked so that no value of these batches reaches it (``x[:, 0] > 1e6``), called as it is or in ``nnx.remat``."""

    def __init__(self, rngs: nnx.Rngs, remat: bool):
        self.remat = remat
        self.inp, self.block, self.head = nnx.Linear(5, 6, rngs=rngs), NBlock(rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        mask = x[:, :1] > 1e6

        def body(b, h):
            return b.bn(b.lin(h), mask=mask)

        h = self.inp(x)
        return self.head(nnx.remat(body)(self.block, h) if self.remat else body(self.block, h))


class LMaskedBlock(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, x, mask):
        return nn.BatchNorm(use_running_average=not self.train, name="bn")(nn.Dense(6, name="lin")(x), mask=mask)


class LMasked(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x, train: bool = False):
        block = (nn.remat(LMaskedBlock) if self.remat else LMaskedBlock)(train=train, name="block")
        return nn.Dense(3, name="head")(block(nn.Dense(6, name="inp")(x), x[:, :1] > 1e6))


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_masked_call_that_normalizes_nothing_inside_remat_leaves_the_layer_unreached_as_at_the_top_level(api):
    """Reference: the same model without the transform (the layer unreached, 0 values) and the data (no value passes the
    mask); the layer's statistics stay as they were."""
    batches = data(2)
    assert not any((x[:, 0] > 1e6).any() for x, _ in batches)
    out = {}
    for remat in (False, True):
        if api == "nnx":
            model = NMasked(nnx.Rngs(0), remat)
            nnx_stale(model)
            before = nnx_snapshot(model)
            result = eg.recalibrate(model, batches, progress=False)
            assert changed(before, nnx_snapshot(model)) == set(), remat
        else:
            module = LMasked(remat)
            variables = module.init(jax.random.key(0), batches[0][0])
            variables = {"params": variables["params"], "batch_stats": stale(variables["batch_stats"])}
            result, new = eg.recalibrate((module, variables), batches, progress=False)
            assert snapshot(new) == snapshot(variables), remat
        out[remat] = [(layer.name, layer.status, layer.count) for layer in result.layers]
    assert out[False] == [("block/bn", "unreached", 0)]
    assert out[True] == out[False]


class NDropped(nnx.Module):
    """The block run functionally inside ``jax.checkpoint`` and its updated state dropped: its BatchNorm's statistics never
    leave the transform (in training they never move either)."""

    def __init__(self, rngs: nnx.Rngs):
        self.inp, self.block, self.head = nnx.Linear(5, 6, rngs=rngs), NBlock(rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        graphdef, state = nnx.split(self.block)
        return self.head(jax.checkpoint(lambda s, h: nnx.merge(graphdef, s)(h))(state, self.inp(x)))


def test_nnx_transform_that_drops_the_layers_state_is_a_model_error_naming_the_layer():
    model, batches = NDropped(nnx.Rngs(0)), data(2)
    before = nnx_snapshot(model)
    for run in (eg.recalibrate, eg.diagnose):
        with pytest.raises(ModelError, match=r"block/bn: no moments came out of the lifted transform"):
            run(model, batches, progress=False)
    assert nnx_snapshot(model) == before


def ce(out, y):
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def eval_loss(apply, batches) -> float:
    return sum(float(ce(apply(x), y)) * len(y) for x, y in batches) / sum(len(y) for _, y in batches)


@pytest.mark.parametrize("kind", ["nnx-remat", "linen-scan"])
def test_diagnose_inside_a_lifted_transform_equals_the_users_evaluation_loop(kind):
    """E: the model as it is; P: the model with the reference population statistics, both in the user's own eval loop."""
    batches = data()
    if kind == "nnx-remat":
        model = NRemat(nnx.Rngs(0))
        nnx_stale(model)
        target = model
        evaluate = nnx.clone(model)
        evaluate.eval()
        e_ref = eval_loss(evaluate, batches)
        mean, var = nnx_reference(model, batches)
        evaluate.block.bn.mean[...], evaluate.block.bn.var[...] = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
        p_ref = eval_loss(evaluate, batches)
        before = nnx_snapshot(model)
    else:
        module = LScan()
        variables = module.init(jax.random.key(0), batches[0][0])
        variables = {"params": variables["params"], "batch_stats": stale(variables["batch_stats"])}
        target = (module, variables)
        e_ref = eval_loss(lambda x: module.apply(variables, x), batches)
        mean, var = linen_reference("scan", variables, batches)
        population = {"params": variables["params"],
                      "batch_stats": {"block": {"bn": {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}}}}
        p_ref = eval_loss(lambda x: module.apply(population, x), batches)
        before = snapshot(variables)

    report = eg.diagnose(target, batches, loss_fn=ce, metrics={}, shuffle=False, progress=False)

    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(e_ref, rel=1e-5) and values["P"] == pytest.approx(p_ref, rel=1e-5)
    assert abs(values["E"] - values["P"]) > 1e-3  # the stale statistics matter
    assert (nnx_snapshot(model) if kind == "nnx-remat" else snapshot(variables)) == before


# ---- several feature axes ----------------------------------------------------------------
class MultiAxis(nn.Module):
    """BatchNorm over two feature axes: statistics per (position, channel), shape (5, 4)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4, name="lin")(x)  # (N, 5, 4)
        x = nn.BatchNorm(use_running_average=not train, axis=(1, 2), name="bn")(x)
        return nn.Dense(3, name="head")(x.mean(1))


def test_linen_batchnorm_over_two_feature_axes_keeps_its_shape_and_compares_like_with_like():
    rng = np.random.default_rng(0)
    batches = [(rng.normal(2.0, 3.0, (16, 5, 7)).astype(np.float32), rng.integers(0, 3, 16)) for _ in range(4)]
    module = MultiAxis()
    variables = module.init(jax.random.key(0), batches[0][0])
    variables = {"params": variables["params"], "batch_stats": stale(variables["batch_stats"])}
    p = variables["params"]["lin"]
    h = np.concatenate([f64(x) @ f64(p["kernel"]) + f64(p["bias"]) for x, _ in batches])  # (64, 5, 4)
    ref_mean, ref_var = h.mean(0), h.var(0)

    result, new = eg.recalibrate((module, variables), batches, progress=False)

    stats = new["batch_stats"]["bn"]
    assert np.shape(stats["mean"]) == np.shape(stats["var"]) == (5, 4)
    assert_stats_close(np.ravel(stats["mean"]), np.ravel(stats["var"]), (ref_mean.ravel(), ref_var.ravel()), name="bn")
    layer = result["bn"]
    assert layer.channels == 20 and np.shape(layer.mean_before) == (20,)
    np.testing.assert_array_equal(layer.mean_before, f64(variables["batch_stats"]["bn"]["mean"]).ravel())  # the drift compares like with like
    assert module.apply(new, batches[0][0]).shape == (16, 3)
    adapter = FlaxAdapter()
    adapter.prepare((module, variables), Batch(batches[0][0], raw=batches[0]))
    read = adapter.read(adapter.layers(adapter.target))
    assert read[0][0].shape == (20,)
    # P of diagnose: the model evaluated with the reference statistics
    population = {"params": variables["params"], "batch_stats": {"bn": {"mean": jnp.asarray(ref_mean, jnp.float32),
                                                                          "var": jnp.asarray(ref_var, jnp.float32)}}}
    report = eg.diagnose((module, variables), batches, loss_fn=ce, metrics={}, shuffle=False, progress=False)
    assert report.decompositions["loss"].values["P"] == pytest.approx(eval_loss(lambda x: module.apply(population, x), batches), rel=1e-5)
