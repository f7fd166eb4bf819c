"""evalgap.flax.diagnose: every mode against evaluation loops written here, defaults by shape, the model untouched.

The loops use Flax's own modes (``model.eval()`` on an ``nnx.clone``, ``module.apply(..., train=False)``),
optax's losses and the accuracy by hand, averaged per sample over the same batches.
"""

from __future__ import annotations

import numpy as np
import pytest

from ._reference import changed, far_batches, forward, linen_model, nnx_model, nnx_snapshot, nnx_weights, snapshot

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import evalgap  # noqa: E402
import evalgap.flax as eg  # noqa: E402

RTOL = 1e-5


def per_sample(pairs, fn) -> float:
    """Per-sample mean of fn's batch means, in float64."""
    total = sum(float(fn(out, y)) * len(y) for out, y in pairs)
    return total / sum(len(y) for _, y in pairs)


def ce(out, y):
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def acc(out, y):
    return (np.argmax(np.asarray(out), -1) == np.asarray(y)).mean()


_apply = nnx.jit(lambda m, x: m(x))


def nnx_eval_outputs(model, data):
    """Flax's evaluation mode (``model.eval()``) on a clone."""
    m = nnx.clone(model)
    m.eval()
    return [(_apply(m, x), y) for x, y in data]


def reference_td_outputs(model, data):
    """Td from the float64 NumPy reference: BN on exact batch statistics (the frozen layer on its moving ones), no dropout."""
    w = nnx_weights(model)
    return [(forward(w, x, batch={"bn1", "bn3"}), y) for x, y in data]


def check(report, name, mode, pairs, fn):
    got = report.decompositions[name].values[mode]
    assert got == pytest.approx(per_sample(pairs, fn), rel=RTOL), (name, mode, report.decompositions[name].values)


def test_nnx_modes_equal_evaluation_loops_and_the_model_is_untouched():
    model, data = nnx_model(), far_batches()
    before = nnx_snapshot(model)
    report = eg.diagnose(model, data, progress=False)
    assert changed(before, nnx_snapshot(model)) == set()
    assert report.primary == "accuracy" and set(report.decompositions) == {"loss", "accuracy"}
    fixed = nnx.clone(model)
    eg.recalibrate(fixed, data, progress=False)
    for name, fn in (("loss", ce), ("accuracy", acc)):
        check(report, name, "E", nnx_eval_outputs(model, data), fn)
        check(report, name, "P", nnx_eval_outputs(fixed, data), fn)
        check(report, name, "Td", reference_td_outputs(model, data), fn)
    values = report.decompositions["loss"].values
    assert abs(values["E"] - values["P"]) > 1e-3  # the set-up is meaningful: stale statistics
    assert values["T"] != values["Td"]  # dropout on in T
    again = eg.diagnose(model, data, progress=False)
    assert again.decompositions["loss"].values["T"] == values["T"]  # T draws from a fixed key
    assert report.decompositions["loss"].terms["training_only_layers"] == pytest.approx(values["T"] - values["Td"])


def test_linen_modes_equal_evaluation_loops_and_the_variables_are_untouched():
    (module, variables), data = linen_model(), far_batches()
    before = snapshot(variables)
    report = eg.diagnose((module, variables), data, progress=False)
    assert snapshot(variables) == before
    _, fixed = eg.recalibrate((module, variables), data, progress=False)
    apply = jax.jit(module.apply, static_argnames="train")
    e_pairs = [(apply(variables, x, train=False), y) for x, y in data]
    p_pairs = [(apply(fixed, x, train=False), y) for x, y in data]
    for name, fn in (("loss", ce), ("accuracy", acc)):
        check(report, name, "E", e_pairs, fn)
        check(report, name, "P", p_pairs, fn)
    assert report.framework == "flax/linen"


def mlp(out: int, seed: int = 0):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.l2 = nnx.Linear(8, out, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.bn(self.l1(x))))

    return MLP(nnx.Rngs(seed))


def tabular(targets, n=64, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, (n, 4)).astype(np.float32)
    y = targets(x, rng)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


@pytest.mark.parametrize("shape", ["(N,)", "(N, 1)"])
def test_default_single_logit_sigmoid_cross_entropy_and_binary_accuracy(shape):
    data = tabular(lambda x, r: (x[:, 0] > 3).astype(np.float32) if shape == "(N,)" else (x[:, :1] > 3).astype(np.float32))
    model = mlp(1)
    if shape == "(N,)":
        inner = model

        class Squeeze(nnx.Module):
            def __init__(self):
                self.inner = inner

            def __call__(self, x):
                return self.inner(x)[:, 0]

        model = Squeeze()
    report = eg.diagnose(model, data, progress=False)
    pairs = nnx_eval_outputs(model, data)
    bce = lambda o, y: optax.sigmoid_binary_cross_entropy(o, y.reshape(o.shape)).mean()  # noqa: E731
    bacc = lambda o, y: ((np.asarray(o) > 0) == (np.asarray(y).reshape(o.shape) > 0.5)).mean()  # noqa: E731
    assert set(report.decompositions) == {"loss", "accuracy"}
    check(report, "loss", "E", pairs, bce)
    check(report, "accuracy", "E", pairs, bacc)


def test_default_regression_is_mse_without_accuracy():
    data = tabular(lambda x, r: (5.0 + 3.0 * r.normal(size=(len(x), 3))).astype(np.float32))
    model = mlp(3)
    report = eg.diagnose(model, data, progress=False)
    assert set(report.decompositions) == {"loss"}
    check(report, "loss", "E", nnx_eval_outputs(model, data), lambda o, y: np.mean((np.asarray(o, np.float64) - y) ** 2))


def test_default_segmentation_channels_last():
    class Seg(nnx.Module):
        def __init__(self, rngs):
            self.c = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = nnx.Conv(4, 3, (1, 1), rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.bn(self.c(x))))

    data = [(x, (x[..., 0] > 100).astype(np.int32) + (x[..., 1] > 100)) for x, _ in far_batches(3)]
    model = Seg(nnx.Rngs(0))
    report = eg.diagnose(model, data, progress=False)
    pairs = nnx_eval_outputs(model, data)
    check(report, "loss", "E", pairs, ce)
    check(report, "accuracy", "E", pairs, acc)


def test_unguessable_shapes_ask_for_loss_fn_and_metrics():
    data = tabular(lambda x, r: r.normal(size=(len(x), 3)).astype(np.float32))  # float (N, 3) targets, (N, 5) outputs
    with pytest.raises(evalgap.DataError) as info:
        eg.diagnose(mlp(5), data, progress=False)
    assert "loss_fn" in str(info.value) and "metrics" in str(info.value)


def test_soft_labels_ask_for_a_loss_and_say_why():
    """Rows of class probabilities (label smoothing) take cross-entropy as well as MSE: no default, a clear error."""
    def smoothed(x, r):
        return (np.eye(3)[r.integers(0, 3, len(x))] * 0.9 + 0.1 / 3).astype(np.float32)

    with pytest.raises(evalgap.DataError, match="class probabilities.*softmax_cross_entropy"):
        eg.diagnose(mlp(3), tabular(smoothed), progress=False)


def test_user_loss_and_a_metric_that_cannot_be_compiled():
    data = far_batches()
    model = nnx_model()

    def top2(out, y):  # NumPy inside: runs as it is, not under jit
        out = np.asarray(out)
        return np.mean([t in np.argsort(o)[-2:] for o, t in zip(out, np.asarray(y))])

    def loss(out, y):
        return optax.softmax_cross_entropy(out, jax.nn.one_hot(y, 5)).mean()

    report = eg.diagnose(model, data, loss_fn=loss, metrics={"top2": top2}, progress=False)
    assert report.primary == "top2" and set(report.decompositions) == {"loss", "top2"}
    pairs = nnx_eval_outputs(model, data)
    check(report, "loss", "E", pairs, loss)
    check(report, "top2", "E", pairs, top2)
    assert "fix: evalgap.flax.recalibrate" in str(report) or "evalgap.flax.recalibrate" in str(report)


def test_val_data_gives_the_data_term():
    model, data = nnx_model(), far_batches()
    val = far_batches(seed=9)
    report = eg.diagnose(model, data, val_data=val, progress=False)
    check(report, "loss", "E_val", nnx_eval_outputs(model, val), ce)


def test_precise_bn_and_gap_monitor_in_a_loop_trace_once(monkeypatch):
    from evalgap.flax import forward as compiled

    traces = []
    trace = compiled._nnx_forward
    monkeypatch.setattr(compiled, "_CACHE", type(compiled._CACHE)())  # start without compiled functions
    monkeypatch.setattr(compiled, "_nnx_forward", lambda *a: traces.append(a[1]) or trace(*a))
    model, data = nnx_model(), far_batches()
    precise = eg.PreciseBN(data, every=2, verbose=0)
    monitor = eg.GapMonitor(data, max_samples=48, verbose=0)
    for epoch in range(4):
        model.bn1.mean[...] = model.bn1.mean[...] + 1.0  # "training" moves the statistics
        monitor.step(3)
        logs = monitor(model, epoch)
        assert set(logs) >= {"gap_bn_stale", "gap_batch_stats", "precise_val_accuracy"}
        out = precise(model, epoch)
        assert (out is None) == (epoch % 2 == 0)
    assert monitor.updates == 12 and monitor.last is not None
    assert traces and len(traces) == len(set(traces))  # one trace per plan, none again in later epochs
    module, variables = linen_model()
    precise = eg.PreciseBN(data, verbose=0)
    result, new = precise((module, variables), 0)
    assert result.recalibrated and new is not variables
    assert eg.PreciseBN(data, every=2, verbose=0)((module, variables), 0) == (None, variables)


def test_user_callables_get_the_output_as_returned_and_may_give_one_value_per_sample():
    class TwoOutputs(nnx.Module):
        def __init__(self):
            self.net = mlp(3)

        def __call__(self, x):
            logits = self.net(x)
            return logits, (logits**2).mean(-1)

    data = tabular(lambda x, rng: rng.integers(0, 3, len(x)))
    model = TwoOutputs()

    def loss(out, y):  # one value per sample, as optax gives before .mean()
        logits, aux = out
        return optax.softmax_cross_entropy_with_integer_labels(logits, y) + 0.1 * aux

    report = eg.diagnose(model, data, loss_fn=loss, metrics={"acc": lambda out, y: acc(out[0], y)}, progress=False)

    pairs = nnx_eval_outputs(model, data)
    check(report, "loss", "E", pairs, lambda out, y: np.mean(np.asarray(loss(out, y), np.float64)))
    check(report, "acc", "E", pairs, lambda out, y: acc(out[0], y))


def test_nnx_layer_frozen_at_the_call_site_stays_frozen_in_every_mode():
    """T equals a model(x, train=True) loop, Td the float64 reference with bn2 on its moving statistics, P and the
    frozen effect evaluation loops of the model recalibrated without and with include_frozen."""
    from ._reference import CallArgs

    net, data = nnx_model(frozen=False), far_batches()
    model = CallArgs(net)
    before = nnx_snapshot(model)
    report = eg.diagnose(model, data, progress=False)
    assert changed(before, nnx_snapshot(model)) == set()
    assert report.recalibration["net/bn2"].status == "frozen"
    train = nnx.jit(lambda m, x: m(x, train=True))
    t_pairs = [(train(nnx.clone(model), x), y) for x, y in data]
    evaluate = nnx.jit(lambda m, x: m(x, train=False))
    fixed, all_fixed = nnx.clone(model), nnx.clone(model)
    eg.recalibrate(fixed, data, progress=False)
    eg.recalibrate(all_fixed, data, include_frozen=True, progress=False)
    w = nnx_weights(net)
    for name, fn in (("loss", ce), ("accuracy", acc)):
        check(report, name, "T", t_pairs, fn)
        check(report, name, "Td", [(forward(w, x, batch={"bn1", "bn3"}), y) for x, y in data], fn)
        check(report, name, "E", [(evaluate(model, x), y) for x, y in data], fn)
        check(report, name, "P", [(evaluate(fixed, x), y) for x, y in data], fn)
    p_all = per_sample([(evaluate(all_fixed, x), y) for x, y in data], acc)
    frozen = report.finding("frozen")
    assert frozen.numbers["layers"] == ["net/bn2"]
    assert frozen.numbers["effect"] == pytest.approx(p_all - report.decompositions["accuracy"].values["P"], abs=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_default_loss_takes_n_by_1_integer_labels_as_class_indices(dtype):
    """Keras's (N, 1) labels (keras.datasets.cifar10) with (N, C) class scores: optax's cross-entropy and the accuracy
    of the (N,) labels, as Keras's sparse categorical cross-entropy takes them."""
    data = tabular(lambda x, r: r.integers(0, 3, len(x)))
    model = mlp(3)
    report = eg.diagnose(model, [(x, y.reshape(-1, 1).astype(dtype)) for x, y in data], progress=False)
    assert set(report.decompositions) == {"loss", "accuracy"}
    pairs = nnx_eval_outputs(model, data)
    check(report, "loss", "E", pairs, ce)
    check(report, "accuracy", "E", pairs, acc)
    fixed = nnx.clone(model)
    eg.recalibrate(fixed, data, progress=False)
    check(report, "loss", "P", nnx_eval_outputs(fixed, data), ce)
    with pytest.raises(evalgap.DataError, match=r"labels must be class indices in \[0, 3\)"):
        eg.diagnose(model, [(x, (y + 3).reshape(-1, 1).astype(dtype)) for x, y in data], progress=False)
