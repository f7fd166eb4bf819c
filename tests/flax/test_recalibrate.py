"""evalgap.flax.recalibrate against an independent float64 NumPy reference, NNX and Linen."""

from __future__ import annotations

import numpy as np
import pytest

from ._reference import (  # noqa: E402
    assert_stats_close, changed, far_batches, linen_model, linen_weights, nnx_model, nnx_snapshot, nnx_weights, population,
    snapshot,
)

import evalgap.flax as eg  # noqa: E402
from evalgap import Recalibration  # noqa: E402


def test_nnx_exact_population_statistics_and_nothing_else_changes():
    model = nnx_model()
    data = far_batches()
    ref = population(nnx_weights(model), data, batch={"bn1", "bn3"})
    before = nnx_snapshot(model)

    result = eg.recalibrate(model, data, progress=False)

    assert isinstance(result, Recalibration)
    for name in ("bn1", "bn3"):
        bn = getattr(model, name)
        assert_stats_close(bn.mean[...], bn.var[...], ref[name], name=name)
        assert result[name].status == "recalibrated" and result[name].samples == 80
    assert result["bn2"].status == "frozen"  # observed: its input's moments, nothing written
    assert_stats_close(result["bn2"].mean_after, result["bn2"].var_after, ref["bn2"], name="bn2 (measured)")
    # every other leaf (weights, the frozen layer, dropout's RNG key and count) and attribute bitwise the same
    assert changed(before, nnx_snapshot(model)) == {f"['{n}']['{s}'].value" for n in ("bn1", "bn3") for s in ("mean", "var")}
    assert [layer.name for layer in result.layers] == ["bn1", "bn2", "bn3"]  # forward order
    assert result.max_drift > 1.0 and "bn1" in str(result)


def test_linen_returns_new_variables_and_leaves_the_given_ones_alone():
    module, variables = linen_model()
    data = far_batches()
    ref = population(linen_weights(variables), data, batch={"bn1", "bn3"})
    before = snapshot(variables)

    result, new = eg.recalibrate((module, variables), data, progress=False)

    assert snapshot(variables) == before, "the given variables were modified"
    for name in ("bn1", "bn3"):
        assert_stats_close(new["batch_stats"][name]["mean"], new["batch_stats"][name]["var"], ref[name], name=name)
        assert result[name].status == "recalibrated"
    assert result["bn2"].status == "frozen"
    assert changed(before, snapshot(new)) == {f"['batch_stats']['{n}']['{s}']" for n in ("bn1", "bn3") for s in ("mean", "var")}
    assert [layer.name for layer in result.layers] == ["bn1", "bn2", "bn3"]
    # the new variables work with the module as they are
    out = module.apply(new, data[0][0])
    assert out.shape == (16, 5) and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_include_frozen_recalibrates_it_and_keeps_it_frozen(kind):
    data = far_batches()
    if kind == "nnx":
        model = nnx_model()
        ref = population(nnx_weights(model), data, batch={"bn1", "bn2", "bn3"})
        eg.recalibrate(model, data, include_frozen=True, progress=False)
        assert_stats_close(model.bn2.mean[...], model.bn2.var[...], ref["bn2"], name="bn2")
        assert model.bn2.use_running_average is True
    else:
        module, variables = linen_model()
        ref = population(linen_weights(variables), data, batch={"bn1", "bn2", "bn3"})
        result, new = eg.recalibrate((module, variables), data, include_frozen=True, progress=False)
        assert_stats_close(new["batch_stats"]["bn2"]["mean"], new["batch_stats"]["bn2"]["var"], ref["bn2"], name="bn2")
        assert result["bn2"].status == "recalibrated"


def test_arrays_with_batch_size_are_shuffled_like_an_epoch():
    model = nnx_model()
    x = np.concatenate([b[0] for b in far_batches(6)])
    y = np.concatenate([b[1] for b in far_batches(6)])
    perm = np.random.default_rng(3).permutation(len(x))
    ref = population(nnx_weights(model), [(x[perm[i : i + 24]],) for i in range(0, 96, 24)], batch={"bn1", "bn3"})
    result = eg.recalibrate(model, (x, y), batch_size=24, seed=3, progress=False)
    assert result.batches == 4 and "shuffled with seed 3" in result.batching
    assert_stats_close(model.bn1.mean[...], model.bn1.var[...], ref["bn1"], name="bn1")
    assert_stats_close(model.bn3.mean[...], model.bn3.var[...], ref["bn3"], name="bn3")


def test_max_batches_dict_batches_and_ragged_last_batch():
    model = nnx_model()
    data = far_batches(4)
    ref = population(nnx_weights(model), data[:3], batch={"bn1", "bn3"})
    dicts = [{"image": x, "label": y} for x, y in data]
    result = eg.recalibrate(model, dicts, max_batches=3, progress=False)
    assert result.batches == 3
    assert_stats_close(model.bn1.mean[...], model.bn1.var[...], ref["bn1"], name="bn1")
    ragged = data[:3] + [(data[3][0][:5], data[3][1][:5])]
    result = eg.recalibrate(nnx_model(), ragged, progress=False)
    assert result.batches == 3 and result.skipped_samples == 5


def test_population_variance_not_mean_of_batch_variances():
    """Batches with different means: the spread of the batch means belongs to the population variance."""
    from flax import nnx

    model = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = [(rng.normal(10.0 * k, 1.0, (4, 2)).astype(np.float32),) for k in range(5)]
    eg.recalibrate(model, data, progress=False)
    x = np.concatenate([d[0] for d in data]).astype(np.float64)
    np.testing.assert_allclose(np.asarray(model.var[...], np.float64), x.var(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.mean[...], np.float64), x.mean(0), rtol=1e-5)


def test_shared_layer_is_pooled_over_its_calls():
    from flax import nnx

    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.bn = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.bn(x) * 2.0 + 5.0)

    model = Twice(nnx.Rngs(0))
    data = [(b[0].reshape(16, -1, 3),) for b in far_batches(3)]
    result = eg.recalibrate(model, data, progress=False)
    first = [d[0].astype(np.float64).reshape(-1, 3) for d in data]
    second = [((f - f.mean(0)) / np.sqrt(f.var(0) + 1e-5)) * 2.0 + 5.0 for f in first]
    pooled = np.concatenate(first + second)
    assert result["bn"].calls_per_batch == 2
    np.testing.assert_allclose(np.asarray(model.bn.var[...], np.float64), pooled.var(0), rtol=1e-5)


def test_linen_frozen_dict_variables_come_back_frozen():
    from flax.core import freeze

    module, variables = linen_model()
    data = far_batches(2)
    _, plain = eg.recalibrate((module, variables), data, progress=False)
    result, frozen = eg.recalibrate((module, freeze(variables)), data, progress=False)
    assert type(frozen).__name__ == "FrozenDict" and result.recalibrated
    assert snapshot(dict(frozen)) == snapshot(plain)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_inputs_near_1e3_with_a_spread_of_1(kind):
    """Where E[x^2] - E[x]^2 in float32 loses every digit (Flax's own fast variance), the statistics stay exact."""
    import jax
    import flax.linen as nn
    from flax import nnx

    rng = np.random.default_rng(4)
    data = [(1e3 + rng.normal(0, 1, (16, 8, 8, 3))).astype(np.float32) for _ in range(3)]
    x = np.concatenate(data).astype(np.float64).reshape(-1, 3)
    if kind == "nnx":
        model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
        eg.recalibrate(model, data, progress=False)
        mean, var = model.mean[...], model.var[...]
        flax_own = nnx.BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))
        flax_own(data[0])  # training mode: its moving variance is this batch's fast variance
        fast = np.asarray(flax_own.var[...], np.float64)
    else:
        module = nn.BatchNorm(use_running_average=False)
        variables = module.init(jax.random.key(0), data[0])
        _, new = eg.recalibrate((module, variables), data, progress=False)
        mean, var = new["batch_stats"]["mean"], new["batch_stats"]["var"]
        _, updated = nn.BatchNorm(use_running_average=False, momentum=0.0).apply(variables, data[0], mutable=["batch_stats"])
        fast = np.asarray(updated["batch_stats"]["var"], np.float64)
    # the mean as close as a float32 near 1e3 gets (its spacing there is 6e-5 of the spread), the variance to 1e-5
    np.testing.assert_array_less(np.abs(np.asarray(mean, np.float64) - x.mean(0)), np.spacing(np.float32(1e3)))
    np.testing.assert_allclose(np.asarray(var, np.float64), x.var(0), rtol=1e-5)
    first = data[0].astype(np.float64).reshape(-1, 3).var(0)
    assert np.max(np.abs(fast / first - 1)) > 0.01  # the cancellation this test is about


@pytest.mark.parametrize("state", ["train", "eval"])
def test_nnx_layer_frozen_at_the_call_site_is_left_alone(state):
    """bn2(x, use_running_average=True) in __call__ is frozen whatever its attribute says (False here); the layers
    called with use_running_average=not train are on batch statistics in training, also after model.eval()."""
    from ._reference import CallArgs

    net, data = nnx_model(frozen=False), far_batches()
    model = CallArgs(net)
    if state == "eval":
        model.eval()  # every attribute True: the call arguments still decide
    ref = population(nnx_weights(net), data, batch={"bn1", "bn3"})
    before = nnx_snapshot(model)

    result = eg.recalibrate(model, data, progress=False)

    assert {layer.name: layer.status for layer in result.layers} == {"net/bn1": "recalibrated", "net/bn2": "frozen", "net/bn3": "recalibrated"}
    for name in ("bn1", "bn3"):
        bn = getattr(net, name)
        assert_stats_close(bn.mean[...], bn.var[...], ref[name], name=name)
    assert_stats_close(result["net/bn2"].mean_after, result["net/bn2"].var_after, ref["bn2"], name="bn2 (measured)")
    assert changed(before, nnx_snapshot(model)) == {f"['net']['{n}']['{s}'].value" for n in ("bn1", "bn3") for s in ("mean", "var")}

    all_layers = CallArgs(nnx_model(frozen=False))  # include_frozen=True recalibrates it, as for a layer frozen by its attribute
    ref = population(nnx_weights(all_layers.net), data, batch={"bn1", "bn2", "bn3"})
    result = eg.recalibrate(all_layers, data, include_frozen=True, progress=False)
    assert result["net/bn2"].status == "recalibrated"
    assert_stats_close(all_layers.net.bn2.mean[...], all_layers.net.bn2.var[...], ref["bn2"], name="bn2")
