"""Model and data forms: keys for every RNG collection, sample weights, the mode as a module field, a model
that normalizes its own input, inner FrozenDicts. References: float64 NumPy moments of the BatchNorm's
input from the model's weights, the user's own evaluation loop, NumPy weighted means, exact trees."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ._reference import assert_stats_close, snapshot

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from flax.core import FrozenDict, freeze  # noqa: E402
from flax.training import train_state  # noqa: E402

import evalgap.flax as eg  # noqa: E402
from evalgap.errors import DataError  # noqa: E402


def data(n: int = 4, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(2.0, 3.0, (size, 5)).astype(np.float32), rng.integers(0, 3, size)) for _ in range(n)]


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def dense_moments(p: dict, batches) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance of ``x @ kernel + bias`` over all batches, float64."""
    h = np.concatenate([f64(b[0]) @ f64(p["kernel"]) + f64(p["bias"]) for b in batches])
    return h.mean(0), h.var(0)


def stale(variables):
    return {"params": variables["params"], "batch_stats": jax.tree.map(lambda a: a + 0.5, variables["batch_stats"])}


def ce(out, y):
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def eval_loss(apply, batches) -> float:
    return sum(float(ce(apply(b[0]), b[1])) * len(b[1]) for b in batches) / sum(len(b[1]) for b in batches)


# ---- make_rng outside nn.Dropout ----------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth, as timm/big_vision write it: its own ``make_rng('dropout')``."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.rate, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * keep / (1 - self.rate)


class Stochastic(nn.Module):
    noise: bool = False  # Gaussian noise from make_rng('noise') in training, else DropPath

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.BatchNorm(name="bn")(nn.Dense(6, name="lin")(x), use_running_average=not train)
        if self.noise:
            h = h + 0.5 * jax.random.normal(self.make_rng("noise"), h.shape) if train else h
        else:
            h = DropPath(0.5)(h, deterministic=not train)
        return nn.Dense(3, name="head")(nn.relu(h))


@pytest.mark.parametrize("noise", [False, True], ids=["droppath", "noise"])
def test_linen_make_rng_outside_dropout_gets_a_key_in_every_training_mode_call(noise):
    module, batches = Stochastic(noise=noise), data()
    variables = stale(module.init(jax.random.key(0), batches[0][0]))
    ref = dense_moments(variables["params"]["lin"], batches)

    result, new = eg.recalibrate((module, variables), batches, progress=False)

    assert result["bn"].status == "recalibrated"
    assert_stats_close(new["batch_stats"]["bn"]["mean"], new["batch_stats"]["bn"]["var"], ref, name="bn")
    report = eg.diagnose((module, variables), batches, loss_fn=ce, metrics={}, shuffle=False, progress=False)
    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(eval_loss(lambda x: module.apply(variables, x), batches), rel=1e-5)
    assert np.isfinite(values["T"]) and abs(values["T"] - values["Td"]) > 1e-3  # the stochastic layer is on in T only


# ---- sample weights ----------------------------------------------------------------------
class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(8, name="lin")(x))
        return nn.Dense(4, name="head")(nn.relu(h))


def keras_weighted_reference(module, variables, batches) -> tuple[float, float, float]:
    """Keras 3's rule for ``evaluate(sample_weight=w)``, in float64 NumPy on the user's eval outputs: the loss
    (``reduction="sum_over_batch_size"``) ``sum(w * l) / N`` over all N samples, a ``weighted_metrics`` entry
    ``sum(w * a) / sum(w)`` (checked with Keras 3.15: loss 2.43390 = sum(w l)/N, weighted_accuracy 0.26081 =
    sum(w a)/sum(w) on a Dense model; sum(w l)/sum(w) was 1.56709). Also ``sum(w * l) / sum(w)``, the rule Keras's loss
    does not follow."""
    loss = acc = weight = samples = 0.0
    for x, y, w in batches:
        z = f64(module.apply(variables, x))
        logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        w = f64(w)
        loss += float((w * -logp[np.arange(len(y)), y]).sum())
        acc += float((w * (z.argmax(1) == y)).sum())
        weight += float(w.sum())
        samples += len(y)
    return loss / samples, acc / weight, loss / weight


def test_sample_weights_weight_the_loss_as_keras_loss_and_the_metrics_as_keras_weighted_metrics():
    rng = np.random.default_rng(0)
    x, y, w = rng.normal(1.0, 2.0, (60, 5)).astype(np.float32), rng.integers(0, 4, 60), rng.uniform(0, 3, 60).astype(np.float32)
    module = Plain()
    variables = stale(module.init(jax.random.key(0), x[:2]))
    batches = [(x[i : i + 20], y[i : i + 20], w[i : i + 20]) for i in range(0, 60, 20)]
    loss_ref, acc_ref, not_keras = keras_weighted_reference(module, variables, batches)
    assert abs(loss_ref - not_keras) > 1e-2  # the two rules differ on these weights
    unweighted = eval_loss(lambda a: module.apply(variables, a), batches)
    assert abs(loss_ref - unweighted) > 1e-3  # the weights matter

    per_sample = lambda o, t: optax.softmax_cross_entropy_with_integer_labels(o, t)  # noqa: E731
    runs = {
        "defaults": dict(data=batches),
        "per-sample loss_fn": dict(data=batches, loss_fn=per_sample),
        "dict batches": dict(data=[{"x": a, "label": b, "sample_weight": c} for a, b, c in batches]),
        "arrays": dict(data=(x, y, w), batch_size=20, shuffle=False),
    }
    for name, kw in runs.items():
        report = eg.diagnose((module, variables), progress=False, **kw)
        assert report.decompositions["loss"].values["E"] == pytest.approx(loss_ref, rel=1e-5), name
        if "accuracy" in report.decompositions:
            assert report.decompositions["accuracy"].values["E"] == pytest.approx(acc_ref, rel=1e-5), name
        assert any("the loss sum(w * loss) / N" in n and "sum(w * value) / sum(w)" in n for n in report.notes), name
    with pytest.raises(DataError, match=r"loss_fn gave one number .* sample weights.*one value per sample"):
        eg.diagnose((module, variables), batches, loss_fn=ce, progress=False)


# ---- the mode as a module field ----------------------------------------------------------
class FieldMode(nn.Module):
    """The mode as a field (``FieldMode(train=False)``); ``frozen`` is on its averages in every mode."""

    train: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=not self.train, name="bn")(nn.Dense(6, name="lin")(x))
        h = nn.Dropout(0.3, deterministic=not self.train)(nn.relu(h))
        h = nn.BatchNorm(use_running_average=True, name="frozen")(h)
        return nn.Dense(3, name="head")(h)


def test_linen_mode_held_as_a_field_is_not_a_frozen_layer():
    """``FieldMode(train=False)`` (the mode puts every layer on its averages) and ``FieldMode(train=True)`` alike."""
    batches = data()
    variables = stale(FieldMode().init(jax.random.key(0), batches[0][0]))
    ref = dense_moments(variables["params"]["lin"], batches)
    evaluate = FieldMode(train=False)
    population = {"params": variables["params"], "batch_stats": {**variables["batch_stats"],
                                                                  "bn": {"mean": jnp.asarray(ref[0], jnp.float32), "var": jnp.asarray(ref[1], jnp.float32)}}}
    e_ref = eval_loss(lambda x: evaluate.apply(variables, x), batches)
    p_ref = eval_loss(lambda x: evaluate.apply(population, x), batches)
    assert abs(e_ref - p_ref) > 1e-3
    for train in (False, True):
        result, new = eg.recalibrate((FieldMode(train=train), variables), batches, progress=False)

        assert result["bn"].status == "recalibrated" and result["frozen"].status == "frozen", train
        assert_stats_close(new["batch_stats"]["bn"]["mean"], new["batch_stats"]["bn"]["var"], ref, name=f"bn, train={train}")
        assert snapshot(new["batch_stats"]["frozen"]) == snapshot(variables["batch_stats"]["frozen"])
        report = eg.diagnose((FieldMode(train=train), variables), batches, loss_fn=ce, metrics={}, shuffle=False, progress=False)
        values = report.decompositions["loss"].values
        assert values["E"] == pytest.approx(e_ref, rel=1e-5) and values["P"] == pytest.approx(p_ref, rel=1e-5), train


# ---- a model that normalizes its own input -----------------------------------------------
class OwnScaling(nn.Module):
    scale: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = (x.astype(jnp.float32) / 255.0 - 0.5) / 0.25 if self.scale else jnp.transpose(x.astype(jnp.float32), (0, 2, 1, 3))
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3), name="conv")(x)))
        return nn.Dense(3)(x.mean((1, 2)))


class NnxOwnScaling(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.rescale = lambda x: x.astype(jnp.float32) / 255.0
        self.conv, self.bn, self.head = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(self.rescale(x)))).mean((1, 2)))


def test_input_scale_is_not_judged_when_the_model_scales_its_own_input():
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (16, 6, 6, 3)).astype(np.uint8), rng.integers(0, 3, 16)) for _ in range(2)]
    models = {
        "linen": (OwnScaling(), OwnScaling().init(jax.random.key(0), batches[0][0])),
        "linen, as given": (OwnScaling(scale=False), OwnScaling(scale=False).init(jax.random.key(0), batches[0][0])),
        "nnx": NnxOwnScaling(nnx.Rngs(0)),
    }
    found = {}
    for name, model in models.items():
        report = eg.diagnose(model, batches, progress=False)
        found[name] = ([f.kind for f in report.findings if f.kind == "input_scale"],
                       [n for n in report.notes if n.startswith("input scale not judged")])
    assert found["linen"] == ([], ["input scale not judged: the model transforms its inputs itself (OwnScaling.__call__, before conv)."])
    assert found["nnx"] == ([], ["input scale not judged: the model transforms its inputs itself (NnxOwnScaling.__call__, before conv)."])
    assert found["linen, as given"] == (["input_scale"], [])  # a dtype cast and a transpose pass the input on as it is


LAYOUT = {  # what a raw-pixel model may do before its first layer without changing the pixels' range
    "pad": lambda x: jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))),
    "gray to rgb, concatenate": lambda x: jnp.concatenate([x[..., :1]] * 3, -1),
    "gray to rgb, tile": lambda x: jnp.tile(x[..., :1], (1, 1, 1, 3)),
    "gather": lambda x: x[:, np.array([5, 4, 3, 2, 1, 0])],
    "nearest resize": lambda x: jax.image.resize(x, (x.shape[0], 12, 12, 3), "nearest"),  # a gather
    # computed values in the jaxpr (dots, a clamp) that keep the pixels' range: confirmed by value on the first batch
    "bilinear resize": lambda x: jax.image.resize(x, (x.shape[0], 12, 12, 3), "bilinear"),
    "clip": lambda x: jnp.clip(x, 0.0, 255.0),
}


class Layout(nn.Module):
    pre: str

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3), name="conv")(LAYOUT[self.pre](x))))
        return nn.Dense(3)(x.mean((1, 2)))


class NnxLayout(nnx.Module):
    def __init__(self, pre: str, rngs: nnx.Rngs):
        self.pre = pre
        self.conv, self.bn, self.head = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(LAYOUT[self.pre](x)))).mean((1, 2)))


@pytest.mark.parametrize("pre", list(LAYOUT))
def test_input_scale_is_judged_when_the_model_keeps_the_range_of_raw_pixels(pre):
    """Pixels in [0, 255] reach the first Conv with their range (NumPy reference: the layout function's output range
    equals the input's): the input-scale finding fires, as for a model given the pixels as they are."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 16, 3, 3, 3)).astype(np.float32).repeat(2, 2).repeat(2, 3)  # 2x2 blocks: smooth
    pixels[:, 0, :2, :2], pixels[:, 1, :2, :2] = 0.0, 255.0
    batches = [(x, rng.integers(0, 3, 16)) for x in pixels]
    seen = np.asarray(LAYOUT[pre](jnp.asarray(batches[0][0])), np.float64)
    assert np.allclose((seen.min(), seen.max()), (0.0, 255.0), atol=1e-3)
    models = {"linen": (Layout(pre), Layout(pre).init(jax.random.key(0), batches[0][0])), "nnx": NnxLayout(pre, nnx.Rngs(0))}
    for name, model in models.items():
        report = eg.diagnose(model, batches, progress=False)
        assert [n for n in report.notes if n.startswith("input scale")] == [], name
        assert [f.kind for f in report.findings if f.kind == "input_scale"] == ["input_scale"], name


# ---- inner FrozenDicts ---------------------------------------------------------------------
class TrainState(train_state.TrainState):
    batch_stats: Any


def test_inner_frozen_dict_batch_stats_come_back_frozen_and_the_train_state_keeps_its_treedef():
    module, batches = Plain(), data()
    variables = stale(module.init(jax.random.key(0), batches[0][0]))
    state = TrainState.create(apply_fn=module.apply, params=variables["params"], batch_stats=freeze(variables["batch_stats"]),
                              tx=optax.sgd(0.1))
    ref = dense_moments(variables["params"]["lin"], batches)

    _, new = eg.recalibrate((module, {"params": state.params, "batch_stats": state.batch_stats}), batches, progress=False)

    assert type(new) is dict and type(new["batch_stats"]) is FrozenDict and new["params"] is state.params
    updated = state.replace(batch_stats=new["batch_stats"])
    assert jax.tree.structure(updated) == jax.tree.structure(state)
    assert_stats_close(updated.batch_stats["bn"]["mean"], updated.batch_stats["bn"]["var"], ref, name="bn")
    _, plain = eg.recalibrate((module, variables), batches, progress=False)  # a dict stays a dict, at every depth
    assert type(plain["batch_stats"]) is dict and type(plain["batch_stats"]["bn"]) is dict
