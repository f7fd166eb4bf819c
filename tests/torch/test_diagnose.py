"""evalgap.torch.diagnose: one planted cause at a time must come out on top, with its sign."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
from torch import nn  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap.data import load_digits_rgb  # noqa: E402

from ._reference import modes, state_snapshot  # noqa: E402

BATCH = 120


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_rgb(16)
    order = np.random.default_rng(0).permutation(len(x))[:1680]
    x = torch.from_numpy(x[order].transpose(0, 3, 1, 2).copy()).float()
    return x, torch.from_numpy(y[order]).long()


def net(momentum=0.1, dropout=0.0, width=6):
    layers = []
    cin = 3
    for f in (width, 2 * width):
        layers += [nn.Conv2d(cin, f, 3, 2, 1, bias=False), nn.BatchNorm2d(f, momentum=momentum), nn.ReLU()]
        cin = f
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(cin, 10))
    return nn.Sequential(*layers)


def batches(x, y, size=BATCH):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x) - len(x) % size, size)]


def train(model, x, y, epochs=4, size=BATCH, lr=1e-2, seed=0):
    """Returns the last epoch's running-average accuracy, as a training loop would log it."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        correct = 0
        for i in range(0, len(x), size):
            idx = perm[i : i + size]
            out = model(x[idx])
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((out.argmax(1) == y[idx]).sum())
    return correct / len(x)


def healthy(x, y, **kw):
    """A model trained on x and recalibrated: its moving statistics are the population's."""
    torch.manual_seed(0)
    model = net(**kw)
    train(model, x, y)
    eg.recalibrate(model, batches(x, y), progress=False)
    return model


def top(report):
    assert report.causes, str(report)
    return report.causes[0]


def test_stale_running_statistics_and_raw_inputs(digits):
    x, y = digits
    torch.manual_seed(0)
    model = net(momentum=0.001)
    fit_acc = train(model, x, y)
    before, before_modes = state_snapshot(model), modes(model)
    report = eg.diagnose(model, batches(x, y), fit_metric=fit_acc, steps_per_epoch=14, epochs=4, progress=False)
    assert state_snapshot(model) == before and modes(model) == before_modes
    name, value = top(report)
    assert name == "stale_moving_statistics" and value > 0.15, str(report)
    d = report.decompositions["accuracy"]
    assert sum(d.terms.values()) == pytest.approx(d.values["F"] - d.values["E"], abs=1e-12)
    stale = report.finding("stale_moving_statistics")
    assert stale.numbers["initial_weight"] == pytest.approx(0.999**56)
    assert "m.momentum = 0.1429" in stale.remedy  # 2 / 14 in PyTorch's convention
    pasted = copy.deepcopy(model)
    exec(stale.remedy[stale.remedy.index("for m in"):], {"model": pasted, "torch": torch})  # the momentum lines, as pasted
    assert [m.momentum for m in pasted.modules() if isinstance(m, nn.BatchNorm2d)] == [0.1429, 0.1429]
    scale = report.finding("input_scale")
    assert "raw [0, 255]" in scale.message
    x_in = x[:4].clone()
    exec(scale.remedy, {"x": x_in, "torch": torch}, space := {"x": x_in})  # the normalization, as pasted
    assert space["x"].shape == x_in.shape and abs(float(space["x"].mean())) < 1.0
    eg.recalibrate(model, batches(x, y), progress=False)
    healthy = eg.diagnose(model, batches(x, y), progress=False)
    assert abs(healthy.gap_points) < 1.0 and not healthy.causes, str(healthy)


def test_heavy_dropout(digits):
    x, y = digits
    xn = x / 255.0
    model = healthy(xn, y, dropout=0.7)
    rng = torch.random.get_rng_state()
    report = eg.diagnose(model, batches(xn, y), progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)  # dropout's draws leave no trace
    name, value = top(report)
    assert name == "training_only_layers" and value < -0.01, str(report)
    assert [k for k, _ in report.causes] == ["training_only_layers"]


class Head(nn.Module):
    """Dropout written in forward, as timm's classifier heads write it: no class name says so."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return nn.functional.dropout(x, self.p, training=self.training)


def test_functional_dropout_is_measured_in_training_mode(digits):
    x, y = digits
    xn = x[:480] / 255.0
    torch.manual_seed(0)
    model = net()
    train(model, xn, y[:480], epochs=1)
    model = nn.Sequential(*model[:-1], Head(0.5), model[-1])
    data = batches(xn, y[:480])
    torch.manual_seed(7)
    report = eg.diagnose(model, data, progress=False)
    torch.manual_seed(7)  # the same draws in the user's own training-mode loop
    side = copy.deepcopy(model).train()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(side(a), b, reduction="sum").item() for a, b in data]
    values = report.decompositions["loss"].values
    assert values["T"] == pytest.approx(sum(losses) / len(xn), rel=1e-5)
    assert values["T"] != pytest.approx(values["Td"], rel=1e-3), str(report)  # half of the features dropped
    assert any("training mode changes the outputs beyond BatchNorm" in n for n in report.notes)
    from evalgap.torch.layers import mode_dependent

    assert mode_dependent(model) == [str(len(model) - 2)] and mode_dependent(net()) == []  # read from the code
    plain = eg.diagnose(model[:-2] + model[-1:], data, progress=False)  # the same weights without it: T = Td
    assert plain.decompositions["loss"].values["T"] == plain.decompositions["loss"].values["Td"]
    assert not any("beyond BatchNorm" in n for n in plain.notes)


def test_small_batches_in_class_order(digits):
    x, y = digits
    xn = x / 255.0
    model = healthy(xn, y)
    order = torch.argsort(y, stable=True)
    report = eg.diagnose(model, batches(xn[order], y[order], size=8), progress=False)
    name, value = top(report)
    assert name == "batch_statistics" and value < -0.05, str(report)
    assert [k for k, _ in report.causes] == ["batch_statistics"]


def test_frozen_batchnorm_with_wrong_statistics(digits):
    x, y = digits
    xn = x / 255.0
    model = healthy(xn, y)
    bn = model[4]
    with torch.no_grad():
        bn.running_mean += 2.0 * bn.running_var.sqrt()
    model.train()
    bn.eval()  # frozen: eval mode while the model trains
    report = eg.diagnose(model, batches(xn, y), progress=False)
    assert not report.causes, str(report)
    first = report.findings[0]
    assert first.kind == "frozen" and first.severity == "warning" and first.numbers["effect"] > 0.05, str(report)


def test_epoch_averaged_fit_metric(digits):
    x, y = digits
    xn = (x / 255.0 - 0.3) / 0.4
    torch.manual_seed(0)
    model = net()
    fit_acc = train(model, xn, y, epochs=1, size=40)
    eg.recalibrate(model, batches(xn, y, 40), progress=False)
    report = eg.diagnose(model, batches(xn, y, 40), fit_metric={"accuracy": fit_acc}, progress=False)
    name, value = top(report)
    assert name == "epoch_average" and value < -0.05, str(report)
    assert [k for k, _ in report.causes] == ["epoch_average"]


def test_custom_loss_metrics_and_validation_term(digits):
    x, y = digits
    xn = x / 255.0
    model = healthy(xn[:840], y[:840])
    top2 = {"top2": lambda o, t: (o.topk(2, 1).indices == t[:, None]).any(1).float().mean()}
    report = eg.diagnose(
        model, batches(xn[:840], y[:840]), loss_fn=lambda o, t: nn.functional.cross_entropy(o, t), metrics=top2,
        val_data=batches(xn[840:], y[840:]), progress=False,
    )
    d = report.decompositions["top2"]
    assert report.primary == "top2" and "E_val" in d.values and set(report.decompositions) == {"loss", "top2"}
    assert d.terms["data"] == pytest.approx(d.values["E"] - d.values["E_val"])


def test_model_without_batchnorm_is_a_message_not_an_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    data = [(torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))) for _ in range(3)]
    report = eg.diagnose(model, data, progress=False)
    assert report.finding("no_batchnorm") is not None and report.finding("other_normalization") is not None
    assert not report.causes


def test_gap_monitor_in_a_hand_written_loop(digits, capsys):
    x, y = digits
    torch.manual_seed(0)
    model = net(momentum=0.001)
    data = batches(x, y)
    monitor = eg.GapMonitor(data, max_samples=256)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    history = []
    for epoch in range(2):
        model.train()
        for xb, yb in data:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()
        before = state_snapshot(model)
        history.append(monitor(model, epoch))
        assert state_snapshot(model) == before
    assert monitor.updates == 28 and monitor.last.samples == 240
    assert monitor.last.finding("stale_moving_statistics").numbers["updates"] == 28
    assert history[-1]["gap_bn_stale"] > 0.1 and "precise_val_accuracy" in history[-1]
    assert "distorted by stale BatchNorm statistics" in capsys.readouterr().out


def test_labels_out_of_range_are_named():
    from evalgap import DataError

    model = net()
    data = [(torch.randn(8, 3, 16, 16), torch.full((8,), 12)) for _ in range(2)]  # 10 classes
    with pytest.raises(DataError, match=r"\[0, 10\).*\[12, 12\]"):
        eg.diagnose(model, data, progress=False)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_diagnose_interrupted_leaves_the_model_as_it_was(digits, exc):
    x, y = digits
    torch.manual_seed(0)
    model = net(dropout=0.5)
    model.train()
    model[1].eval()  # a frozen layer too
    before, before_modes = state_snapshot(model), modes(model)
    calls = {"n": 0}

    def forward(m, batch):  # fails on the 5th model call: inside the side copy's statistics pass
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc("stop")
        return m(batch[0])

    with pytest.raises(Exception if exc is RuntimeError else KeyboardInterrupt):
        eg.diagnose(model, batches(x[:480], y[:480]), forward=forward, progress=False)
    assert state_snapshot(model) == before and modes(model) == before_modes
