"""evalgap.torch.diagnose: loss and metrics by output shape, torchmetrics objects, primary, T's modes.

Every E (and P) is checked against an evaluation loop written here, independently of the
library: ``model.eval()``, ``torch.no_grad()``, the same batches, torch's functional loss and
the metric by hand, averaged per sample (P: the same loop on a recalibrated deep copy).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import evalgap  # noqa: E402
import evalgap.torch as eg  # noqa: E402

from ._reference import modes, state_snapshot  # noqa: E402

N, BATCH, FEATURES, C = 128, 32, 8, 4
RTOL = 1e-5


# ---- data, models, training ------------------------------------------------------------
def split(x, y, size=BATCH):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def mlp(out, *, track=True, frozen_block=False):
    """Linear + BN + head; inputs far from standard so that stale running statistics matter."""
    layers = [nn.Linear(FEATURES, 16), nn.BatchNorm1d(16, track_running_stats=track), nn.ReLU()]
    if frozen_block:
        layers += [nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.0)]
    layers.append(nn.Linear(16, out))
    return nn.Sequential(*layers)


def fit(model, data, loss, steps=5, lr=1e-2, seed=0):
    """A few training steps: the running statistics still lag the population's."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for i in range(steps):
        xb, yb = data[i % len(data)]
        opt.zero_grad()
        loss(model(xb), yb).backward()
        opt.step()
    return model


def features(seed):
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(N, FEATURES, generator=g) + 2.0, g


def classification(seed=0, **kw):
    x, g = features(seed)
    w = torch.randn(FEATURES, C, generator=g)
    y = ((x - 2.0) @ w).argmax(1)
    data = split(x, y)
    torch.manual_seed(seed)
    return fit(mlp(C, **kw), data, F.cross_entropy), data


# ---- the independent evaluation loop --------------------------------------------------
def outputs(model, data):
    """Evaluation mode, no gradients, on a deep copy (the model itself stays untouched)."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        return [(m(x), y) for x, y in data]


def recalibrated_outputs(model, data):
    m = copy.deepcopy(model)
    eg.recalibrate(m, data, progress=False)
    return outputs(m, data)


def per_sample(pairs, fn):
    """Per-sample mean: fn returns the batch's sum over samples (or pixels) and their count."""
    total, count = 0.0, 0
    for out, y in pairs:
        s, n = fn(out, y)
        total += float(s)
        count += n
    return total / count


def ce(out, y):
    return F.cross_entropy(out.double(), y, reduction="sum"), y.numel()


def argmax_accuracy(out, y):
    return (out.argmax(1) == y).sum(), y.numel()


def bce(out, y):
    return F.binary_cross_entropy_with_logits(out.double(), y.double(), reduction="sum"), y.numel()


def binary_accuracy(out, y):
    return ((out > 0).float() == y).sum(), y.numel()


def mse(out, y):
    # F.mse_loss per batch is a mean over the batch's elements; per sample with equal batches:
    return F.mse_loss(out.double(), y.double(), reduction="sum"), y.numel()


def assert_unchanged(model, before, before_modes):
    assert state_snapshot(model) == before, "diagnose changed the model's parameters or buffers"
    assert modes(model) == before_modes, "diagnose changed the model's train/eval modes"


def check_against_loops(report, model, data, expected):
    """E from the plain loop, P from the loop on a recalibrated copy, for every metric in ``expected``."""
    e_pairs, p_pairs = outputs(model, data), recalibrated_outputs(model, data)
    for name, fn in expected.items():
        values = report.decompositions[name].values
        e, p = per_sample(e_pairs, fn), per_sample(p_pairs, fn)
        assert values["E"] == pytest.approx(e, rel=RTOL), (name, values, e)
        assert values["P"] == pytest.approx(p, rel=RTOL), (name, values, p)
    # the set-up is meaningful: the running statistics are not the population's
    loss = expected["loss"]
    assert abs(per_sample(e_pairs, loss) - per_sample(p_pairs, loss)) > 1e-3


# ---- defaults by shape -----------------------------------------------------------------
def test_default_class_scores_cross_entropy_and_accuracy():
    model, data = classification()
    before, before_modes = state_snapshot(model), modes(model)
    report = eg.diagnose(model, data, progress=False)
    assert_unchanged(model, before, before_modes)
    assert set(report.decompositions) == {"loss", "accuracy"}
    assert report.primary == "accuracy"
    check_against_loops(report, model, data, {"loss": ce, "accuracy": argmax_accuracy})


def test_default_class_scores_take_labels_of_shape_n_1():
    """(N, 1) integer labels, as keras.datasets.cifar10 gives them: the same loss and accuracy as (N,)."""
    model, data = classification()
    column = [(x, y[:, None]) for x, y in data]
    report = eg.diagnose(model, column, progress=False)
    check_against_loops(report, model, data, {"loss": ce, "accuracy": argmax_accuracy})


def test_default_segmentation_per_pixel_cross_entropy_and_pixel_accuracy():
    g = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(64, 3, 6, 6, generator=g) + 1.0
    y = (x[:, 0] > 1.0).long() + (x[:, 1] > 1.0).long()  # (N, H, W) in {0, 1, 2}
    data = split(x, y, 16)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 1))
    fit(model, data, F.cross_entropy)
    assert outputs(model, data)[0][0].shape == (16, 3, 6, 6)
    before, before_modes = state_snapshot(model), modes(model)
    report = eg.diagnose(model, data, progress=False)
    assert_unchanged(model, before, before_modes)
    assert set(report.decompositions) == {"loss", "accuracy"}
    check_against_loops(report, model, data, {"loss": ce, "accuracy": argmax_accuracy})


@pytest.mark.parametrize("shape", ["(N,)", "(N, 1)"])
def test_default_single_logit_bce_and_binary_accuracy(shape):
    x, g = features(2)
    y = ((x - 2.0) @ torch.randn(FEATURES, generator=g) > 0).float()
    layers = [mlp(1)]
    if shape == "(N,)":
        layers.append(nn.Flatten(0))
    else:
        y = y[:, None]
    data = split(x, y)
    torch.manual_seed(2)
    model = fit(nn.Sequential(*layers), data, F.binary_cross_entropy_with_logits)
    assert outputs(model, data)[0][0].shape == y[:BATCH].shape
    before, before_modes = state_snapshot(model), modes(model)
    report = eg.diagnose(model, data, progress=False)
    assert_unchanged(model, before, before_modes)
    assert set(report.decompositions) == {"loss", "accuracy"}
    check_against_loops(report, model, data, {"loss": bce, "accuracy": binary_accuracy})


@pytest.mark.parametrize("width", [3, 1])
def test_default_regression_is_mse_without_accuracy(width):
    """Regression bug: float targets of the output's shape were taken as class probabilities."""
    x, g = features(3)
    y = 5.0 + 3.0 * torch.randn(N, width, generator=g)
    data = split(x, y)
    torch.manual_seed(3)
    model = fit(mlp(width), data, F.mse_loss)
    before, before_modes = state_snapshot(model), modes(model)
    report = eg.diagnose(model, data, progress=False)
    assert_unchanged(model, before, before_modes)
    check_against_loops(report, model, data, {"loss": mse})
    assert set(report.decompositions) == {"loss"}, "no accuracy for a regression model"


def test_unguessable_shapes_ask_for_loss_fn_and_metrics():
    x, g = features(4)
    data = split(x, torch.randn(N, 3, generator=g))  # float (N, 3) targets for an (N, 5) output
    torch.manual_seed(4)
    model = mlp(5)
    with pytest.raises(evalgap.DataError) as info:
        eg.diagnose(model, data, progress=False)
    assert "loss_fn" in str(info.value) and "metrics" in str(info.value), str(info.value)



class _Tagger(nn.Module):
    """Per-token scores (N, L, C) on the last axis for (N, L) integer tags, as a tagger returns them."""

    def __init__(self, tags):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.bn, self.head = nn.Embedding(tags, 8), nn.BatchNorm1d(8), nn.Linear(8, tags)

    def forward(self, ids):
        return self.head(self.bn(self.embed(ids).transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("length", [6, 5])
def test_per_token_scores_are_never_read_as_segmentation(length):
    """(N, L, C) scores with (N, L) tags: with L == C the shapes fit segmentation (classes on axis 1) and per-token
    scores (classes last) alike, so no default is guessed (as for L != C): a DataError names both readings and asks
    for loss_fn; the user's per-token loss then gives the evaluation loop's values."""
    tags = 6
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, tags, (64, length), generator=g)
    data = split(ids, ids, 16)  # the tag is the token: a tagger learns it
    model = fit(_Tagger(tags), data, lambda o, t: F.cross_entropy(o.flatten(0, -2), t.flatten()), steps=12, lr=0.05)
    with pytest.raises(evalgap.DataError) as info:
        eg.diagnose(model, data, progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot choose a loss for outputs of shape (16, {length}, {tags})") and "loss_fn" in message
    if length == tags:
        assert "axis 1" in message and "last axis" in message, message

    def per_token(o, t):
        return F.cross_entropy(o.flatten(0, -2), t.flatten())

    report = eg.diagnose(model, data, loss_fn=per_token, metrics={"accuracy": lambda o, t: (o.argmax(-1) == t).float().mean()},
                         progress=False)
    pairs = outputs(model, data)
    e_loss = per_sample(pairs, lambda o, t: (F.cross_entropy(o.double().flatten(0, -2), t.flatten(), reduction="sum") / t.shape[1], len(t)))
    e_acc = per_sample(pairs, lambda o, t: ((o.argmax(-1) == t).double().mean(1).sum(), len(t)))
    assert report.decompositions["loss"].values["E"] == pytest.approx(e_loss, rel=RTOL)
    assert report.decompositions["accuracy"].values["E"] == pytest.approx(e_acc, rel=RTOL)
    assert e_acc > 0.9  # the per-token reading is the right one (the segmentation one scored positions as classes)


def _float64_data(kind):
    """float64 NumPy features and targets: 0/1 floats (binary) or 5 classes, 90 samples, batches of 30."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 4.0, (90, 7))
    y = rng.integers(0, 2, 90).astype(np.float64) if kind == "binary" else rng.integers(0, 5, 90)
    return x, y


@pytest.mark.parametrize("kind", ["binary", "classes"])
def test_a_float64_models_default_loss_and_accuracy_stay_float64(kind):
    """A float64 model's default loss and accuracy are computed in float64 (BCE targets, accuracy's mean), as a float64
    NumPy loop gives them to 1e-12; a float32 output's defaults stay float32."""
    from evalgap.torch.metrics import DEFAULTS

    x, y = _float64_data(kind)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1 if kind == "binary" else 5)).double().eval()
    report = eg.diagnose(net, (x, y), batch_size=30, shuffle=False, progress=False)
    with torch.no_grad():
        o = net(torch.from_numpy(x)).numpy()
    if kind == "binary":
        o = o[:, 0]
        loss = np.mean(np.logaddexp(0.0, o) - y * o)  # BCE with logits
        accuracy = np.mean((o > 0) == (y == 1))
    else:
        shifted = o - o.max(1, keepdims=True)
        loss = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(y)), y])
        accuracy = np.mean(o.argmax(1) == y)
    assert report.decompositions["loss"].values["E"] == pytest.approx(loss, rel=1e-12, abs=1e-15)
    assert report.decompositions["accuracy"].values["E"] == pytest.approx(accuracy, rel=1e-12, abs=1e-15)

    task = "binary" if kind == "binary" else "classification"
    default_loss, default_metrics = DEFAULTS[task]
    target = torch.from_numpy(y[:30])
    for dtype in (torch.float32, torch.float64):
        out = torch.from_numpy(o[:30]).to(dtype)
        assert {default_loss(out, target).dtype, default_metrics["accuracy"](out, target).dtype} == {dtype}

# ---- user-given loss and metrics -----------------------------------------------------
def test_module_loss_and_callable_metric():
    x, g = features(5)
    y = 5.0 + 3.0 * torch.randn(N, 3, generator=g)
    data = split(x, y)
    torch.manual_seed(5)
    model = fit(mlp(3), data, F.mse_loss)
    report = eg.diagnose(
        model, data, loss_fn=nn.MSELoss(), metrics={"mae": lambda o, t: (o - t).abs().mean()}, progress=False
    )
    assert set(report.decompositions) == {"loss", "mae"}
    check_against_loops(
        report, model, data, {"loss": mse, "mae": lambda o, t: ((o.double() - t.double()).abs().sum(), t.numel())}
    )


def test_torchmetrics_objects_are_computed_over_all_batches_and_left_untouched():
    tm = pytest.importorskip("torchmetrics")
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    model, data = classification(6)

    def fresh():
        return {"acc": MulticlassAccuracy(num_classes=C, average="micro"), "f1": MulticlassF1Score(num_classes=C)}

    given = fresh()
    g = torch.Generator().manual_seed(60)
    seen = (torch.randn(10, C, generator=g), torch.randint(0, C, (10,), generator=g))
    for m in given.values():
        m.update(*seen)
    computed = {k: m.compute().clone() for k, m in given.items()}
    states = {k: {s: v.clone() for s, v in m.metric_state.items()} for k, m in given.items()}

    class CrossEntropy(tm.MeanMetric):  # a torchmetrics object as loss_fn: computed over all batches, left untouched
        def update(self, out, y):
            super().update(F.cross_entropy(out, y, reduction="none"))

    loss = CrossEntropy()
    report = eg.diagnose(model, data, loss_fn=loss, metrics=given, progress=False)
    assert loss.update_count == 0 and float(loss.weight) == 0.0
    assert report.decompositions["loss"].values["E"] == pytest.approx(per_sample(outputs(model, data), ce), rel=RTOL)

    for k, m in given.items():
        assert isinstance(m, tm.Metric)
        for s, v in states[k].items():
            assert torch.equal(m.metric_state[s], v), f"diagnose changed {k}.{s}"
        assert torch.equal(m.compute(), computed[k]), k

    def run(pairs):
        ms = fresh()
        for out, y in pairs:
            for m in ms.values():
                m.update(out, y)
        return {k: float(m.compute()) for k, m in ms.items()}

    expected = {"E": run(outputs(model, data)), "P": run(recalibrated_outputs(model, data))}
    assert set(report.decompositions) == {"loss", "acc", "f1"}
    for mode, values in expected.items():
        for k, v in values.items():
            assert report.decompositions[k].values[mode] == pytest.approx(v, rel=RTOL), (mode, k)
    # batch-averaged macro F1 is not the F1 of all samples: the check can tell them apart
    batch_f1 = sum(float(MulticlassF1Score(num_classes=C)(o, y)) for o, y in outputs(model, data)) / len(data)
    assert abs(batch_f1 - expected["E"]["f1"]) > 1e-4


# ---- primary ---------------------------------------------------------------------------
def test_primary_default_rule():
    pytest.importorskip("torchmetrics")
    from torchmetrics.classification import MulticlassAUROC

    model, data = classification(7)
    report = eg.diagnose(model, data, metrics={"auroc": MulticlassAUROC(num_classes=C)}, progress=False)
    assert report.primary == "auroc"
    report = eg.diagnose(model, data, loss_fn=lambda o, t: F.cross_entropy(o, t), metrics={}, progress=False)
    assert report.primary == "loss" and set(report.decompositions) == {"loss"}
    top1 = lambda o, t: (o.argmax(1) == t).float().mean()  # noqa: E731
    top2 = lambda o, t: (o.topk(2, 1).indices == t[:, None]).any(1).float().mean()  # noqa: E731
    report = eg.diagnose(model, data, metrics={"top2": top2, "accuracy": top1}, progress=False)
    assert report.primary == "accuracy"
    report = eg.diagnose(model, data, metrics={"zeta": top2, "alpha": top1}, progress=False)
    assert report.primary == "zeta", "the first given metric, not the alphabetical first"


def test_primary_override():
    model, data = classification(8)
    report = eg.diagnose(model, data, primary="loss", progress=False)
    assert report.primary == "loss" and set(report.decompositions) == {"loss", "accuracy"}
    assert report.main is report.decompositions["loss"]


def test_unknown_primary_lists_the_names():
    model, data = classification(9)
    with pytest.raises(evalgap.DataError) as info:
        eg.diagnose(model, data, primary="nope", progress=False)
    assert "nope" in str(info.value) and "loss" in str(info.value) and "accuracy" in str(info.value), str(info.value)


def test_a_direction_torchmetrics_states_wins_over_the_name():
    """MeanAbsoluteError states higher_is_better=False: under the key "l1" (which names no direction) the report
    takes it, so worse_by is E - T (a higher error in evaluation mode is worse); R2Score states True."""
    tm = pytest.importorskip("torchmetrics")
    x, g = features(10)
    y = 5.0 + 3.0 * torch.randn(N, 1, generator=g)
    data = split(x, y)
    torch.manual_seed(10)
    model = fit(mlp(1), data, F.mse_loss)
    metrics = {"l1": tm.MeanAbsoluteError(), "fit": tm.R2Score()}
    assert [m.higher_is_better for m in metrics.values()] == [False, True]
    report = eg.diagnose(model, data, loss_fn=nn.MSELoss(), metrics=metrics, primary="l1", progress=False)
    assert {k: d.higher_is_better for k, d in report.decompositions.items()} == {"loss": False, "l1": False, "fit": True}
    d = report.decompositions["l1"]
    assert abs(d.values["T"] - d.values["E"]) > 1e-3  # stale running statistics: the sign matters
    assert report.worse_by() == pytest.approx(d.values["E"] - d.values["T"], abs=1e-12)
    check_against_loops(report, model, data, {"loss": mse, "l1": lambda o, t: ((o.double() - t.double()).abs().sum(), t.numel())})


# ---- which computation each mode is --------------------------------------------------
def test_frozen_batchnorm_stays_frozen_in_training_mode():
    """T runs the model as its training loop does: a frozen BN layer keeps its running statistics."""
    model, data = classification(10, frozen_block=True)
    frozen = model[4]
    with torch.no_grad():
        frozen.running_mean += 2.0 * frozen.running_var.sqrt()  # recalibrating it would matter
    model.train()
    frozen.eval()

    def train_mode_loss(freeze):
        m = copy.deepcopy(model)
        m.train()
        if freeze:
            m[4].eval()
        with torch.no_grad():
            return per_sample([(m(x), y) for x, y in data], ce)

    expected_t, wrong_t = train_mode_loss(True), train_mode_loss(False)
    assert abs(expected_t - wrong_t) > 0.05, "set-up: switching the frozen layer to training mode must matter"

    before, before_modes = state_snapshot(model), modes(model)
    rng = torch.random.get_rng_state()
    report = eg.diagnose(model, data, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng), "diagnose changed torch's global RNG state"
    assert_unchanged(model, before, before_modes)

    loss = report.decompositions["loss"]
    assert loss.values["T"] == pytest.approx(expected_t, rel=RTOL), (loss.values, expected_t, wrong_t)
    for name, d in report.decompositions.items():  # p=0 dropout: training-only layers change nothing
        assert d.values["T"] == pytest.approx(d.values["Td"], rel=0, abs=1e-12), (name, d.values)
        assert d.terms["training_only_layers"] == pytest.approx(0.0, abs=1e-12), (name, d.terms)
    assert loss.values["E"] == pytest.approx(per_sample(outputs(model, data), ce), rel=RTOL)


def test_batchnorm_without_running_statistics_is_a_note_not_an_error():
    torch.manual_seed(11)
    model, data = classification(11, track=False)
    before, before_modes = state_snapshot(model), modes(model)
    report = eg.diagnose(model, data, progress=False)
    assert isinstance(report, evalgap.Report)
    assert_unchanged(model, before, before_modes)
    texts = [str(n) for n in report.notes] + [f"{f.message} {f.remedy or ''}" for f in report.findings]
    assert any("batch statistics" in t.lower() and "both modes" in t.lower() for t in texts), texts
    v = report.decompositions["loss"].values
    for mode in ("T", "Td", "P"):
        assert v[mode] == pytest.approx(v["E"], rel=0, abs=1e-6), v
    assert v["E"] == pytest.approx(per_sample(outputs(model, data), ce), rel=RTOL)


# ---- PreciseBN -------------------------------------------------------------------------
def test_precise_bn_fires_only_after_training_steps():
    x, _ = features(12)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(12))
    data = split(x, y)
    torch.manual_seed(12)
    model = mlp(C)  # freshly built: in training mode, no training step yet
    bn = model[1]
    precise_bn = eg.PreciseBN(data, verbose=0).attach(model)
    try:
        stats = (bn.running_mean.clone(), bn.running_var.clone())
        model.eval()
        assert precise_bn.last is None, "recalibrated a model that never trained"
        assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])

        model.train()
        opt = torch.optim.SGD(model.parameters(), 0.1)
        opt.zero_grad()
        F.cross_entropy(model(data[0][0]), data[0][1]).backward()
        opt.step()
        model.eval()
        first = precise_bn.last
        assert first is not None, "did not recalibrate after a training step"

        model.eval()
        assert precise_bn.last is first, "recalibrated again without training steps in between"
        model.train()
        model.eval()
        assert precise_bn.last is first, "recalibrated again without training steps in between"
    finally:
        precise_bn.detach()


def test_precise_bn_attached_twice_is_an_evalgap_error():
    model, data = classification(13)
    precise_bn = eg.PreciseBN(data, verbose=0).attach(model)
    try:
        with pytest.raises(evalgap.EvalgapError):
            precise_bn.attach(model)
    finally:
        precise_bn.detach()
