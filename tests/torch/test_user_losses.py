"""diagnose measures what the user's own evaluation loop measures: loss_fn(model(x), y), averaged per sample.

Each test compares E (evaluation mode) with a plain loop written here: model.eval(), the user's
callable on the model's output as returned, per-sample totals in float64 over the same batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import evalgap.torch as eg
from evalgap import DataError

F = nn.functional


def data(n=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


class Net(nn.Module):
    """Linear + BN + a head; ``out`` picks what forward returns: a tensor, a tuple or a dict."""

    def __init__(self, out="tensor", dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.out = out
        self.to(dtype)
        with torch.no_grad():  # moving statistics that differ from the data's
            self.body[1].running_mean.fill_(0.3)
            self.body[1].running_var.fill_(2.0)

    def forward(self, x):
        h = self.body(x)
        logits = self.head(h)
        aux = h.pow(2).mean(1)
        if self.out == "tuple":
            return logits, aux
        if self.out == "dict":
            return {"scores": logits, "aux": aux}
        return logits


def E(report, name: str) -> float:
    return report.decompositions[name].values["E"]


def own_eval_loop(model, batches, fn) -> float:
    """Per-sample mean of fn over the batches, model in eval mode, values in float64."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            x, t = b[0], b[1]
            v = fn(model(x), t).double()
            total += float(v.sum()) if v.numel() > 1 else float(v) * len(x)
            count += len(x)
    return total / count


def loader_batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_int32_and_int16_labels_get_the_default_loss_as_int64_labels_do():
    x, y = data()
    model = Net()
    ref = eg.diagnose(model, loader_batches(x, y, 16), progress=False)
    for dtype in (torch.int32, torch.int16):
        got = eg.diagnose(model, loader_batches(x, y.to(dtype), 16), progress=False)
        assert [E(got, m) for m in ("loss", "accuracy")] == pytest.approx([E(ref, m) for m in ("loss", "accuracy")], rel=1e-12)
    arrays = eg.diagnose(model, (x.numpy(), y.numpy().astype(np.int32)), batch_size=16, shuffle=False, progress=False)
    assert E(arrays, "loss") == pytest.approx(E(ref, "loss"), rel=1e-12)
    expected = own_eval_loop(model, loader_batches(x, y, 16), F.cross_entropy)  # the ragged last 6 included, as evaluate does
    assert ref.probe["samples"] == 70 and E(ref, "loss") == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("out", ["tuple", "dict"])
def test_loss_fn_and_metrics_get_the_output_as_the_model_returns_it(out):
    x, y = data()
    model = Net(out)
    pick = (lambda o: o[0]) if out == "tuple" else (lambda o: o["scores"])
    aux = (lambda o: o[1]) if out == "tuple" else (lambda o: o["aux"])
    loss_fn = lambda o, t: F.cross_entropy(pick(o), t) + 0.1 * aux(o).mean()  # noqa: E731
    metrics = {"acc": lambda o, t: (pick(o).argmax(1) == t).float().mean()}
    batches = loader_batches(x, y, 16)

    report = eg.diagnose(model, batches, loss_fn=loss_fn, metrics=metrics, progress=False)

    assert E(report, "loss") == pytest.approx(own_eval_loop(model, batches, loss_fn), rel=1e-6)
    assert E(report, "acc") == pytest.approx(own_eval_loop(model, batches, metrics["acc"]), rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_reductions_give_the_per_sample_mean(reduction):
    x, y = data(70)
    model = Net()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 4 batches of 16 and a ragged one of 6
    batches = list(loader)
    expected = own_eval_loop(model, batches, lambda o, t: F.cross_entropy(o, t, reduction="none"))

    report = eg.diagnose(model, loader, loss_fn=nn.CrossEntropyLoss(reduction=reduction), progress=False)

    samples = report.probe["samples"]
    if samples != 70:  # the ragged batch left out: the reference over the same 64 samples
        expected = own_eval_loop(model, batches[:4], lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert E(report, "loss") == pytest.approx(expected, rel=1e-6)
    assert any("reduction='sum'" in n for n in report.notes) == (reduction == "sum")


def test_sample_weights_travel_with_the_targets():
    x, y = data(64)
    w = torch.linspace(0.1, 2.0, 64)
    model = Net()

    def weighted(o, t):
        labels, weights = t
        return (F.cross_entropy(o, labels, reduction="none") * weights).sum() / weights.sum()

    batches = [(x[i : i + 16], (y[i : i + 16], w[i : i + 16])) for i in range(0, 64, 16)]
    model.eval()
    with torch.no_grad():  # the reference: each batch's weighted mean, averaged per sample (all batches are 16)
        expected = float(np.mean([float(weighted(model(b[0]), b[1])) for b in batches]))

    streamed = eg.diagnose(model, batches, loss_fn=weighted, metrics={}, progress=False)
    arrays = eg.diagnose(model, (x, (y, w)), batch_size=16, shuffle=False, loss_fn=weighted, metrics={}, progress=False)

    assert E(streamed, "loss") == pytest.approx(expected, rel=1e-6)
    assert E(arrays, "loss") == pytest.approx(expected, rel=1e-6)
    unweighted = own_eval_loop(model, loader_batches(x, y, 16), F.cross_entropy)
    assert abs(expected - unweighted) > 1e-3  # the weights matter here


def test_a_third_element_in_each_batch_is_named_as_unused_and_a_weight_array_is_refused_with_the_way_to_pass_it():
    x, y = data(64)
    w = torch.rand(64)
    model = Net()
    report = eg.diagnose(model, DataLoader(TensorDataset(x, y, w), batch_size=16), progress=False)
    assert any("hold 3 elements" in n and "(x, (y, w))" in n for n in report.notes)
    assert E(report, "loss") == pytest.approx(own_eval_loop(model, loader_batches(x, y, 16), F.cross_entropy), rel=1e-6)
    with pytest.raises(DataError, match=r"\(x, \(y, w\)\)"):
        eg.diagnose(model, (x, y, w), batch_size=16, progress=False)


def test_float64_model_measured_in_float64():
    x, y = data(64)
    model = Net(dtype=torch.float64)
    x = x.double()
    batches = loader_batches(x, y, 16)
    report = eg.diagnose(model, batches, progress=False)
    assert E(report, "loss") == pytest.approx(own_eval_loop(model, batches, F.cross_entropy), rel=1e-12)
    mine = eg.diagnose(model, batches, loss_fn=nn.CrossEntropyLoss(), metrics={}, progress=False)
    assert E(mine, "loss") == pytest.approx(own_eval_loop(model, batches, F.cross_entropy), rel=1e-12)


def test_batch_size_above_the_number_of_samples_is_one_batch_of_all_of_them():
    x, y = data(40)
    model = Net()
    expected = own_eval_loop(model, [(x, y)], F.cross_entropy)
    for given in [(x, y), TensorDataset(x, y)]:
        report = eg.diagnose(model, given, batch_size=128, shuffle=False, progress=False)
        assert report.probe["samples"] == 40
        assert E(report, "loss") == pytest.approx(expected, rel=1e-6)
        assert any("batch_size=128 is more than the 40 samples" in n for n in report.notes)
    result = eg.recalibrate(model, (x, y), batch_size=128, progress=False)
    assert result.batches == 1 and result.samples == 40
    h = model.body[0](x).double()
    np.testing.assert_allclose(model.body[1].running_var.double().numpy(), h.var(0, unbiased=False).detach().numpy(), rtol=1e-5)


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: drops whole samples of a residual branch in training."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape[0], 1) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class StochasticDepth(DropPath):
    pass


@pytest.mark.parametrize("layer", [DropPath, StochasticDepth])
def test_drop_path_and_stochastic_depth_are_training_only_layers(layer):
    x, y = data(64)

    class Residual(Net):
        def __init__(self):
            super().__init__()
            self.drop = layer(0.5)

        def forward(self, x):
            h = self.body(x)
            return self.head(h + self.drop(h))

    model = Residual()
    report = eg.diagnose(model, loader_batches(x, y, 16), progress=False)
    d = report.decompositions["loss"]
    assert d.values["T"] != d.values["Td"]  # measured with the branch dropped, not copied from Td
    assert d.terms["training_only_layers"] == pytest.approx(d.values["T"] - d.values["Td"])


def test_a_model_with_auxiliary_outputs_in_training_mode_gives_the_user_loss_its_logits():
    # InceptionV3 / GoogLeNet style: a namedtuple (logits, aux_logits) in training mode, a tensor in evaluation mode
    from collections import namedtuple

    Outputs = namedtuple("Outputs", ["logits", "aux_logits"])

    class Inception(Net):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.0)  # a training-only layer, so T is measured; p = 0 keeps T equal to Td
            self.aux = nn.Linear(8, 4)

        def forward(self, x):
            h = self.drop(self.body(x))
            return Outputs(self.head(h), self.aux(h)) if self.training else self.head(h)

    x, y = data(64)
    model = Inception()
    batches = loader_batches(x, y, 16)
    report = eg.diagnose(model, batches, loss_fn=nn.CrossEntropyLoss(), metrics={}, progress=False)
    d = report.decompositions["loss"]
    assert d.values["T"] == pytest.approx(d.values["Td"], rel=1e-6)
    assert E(report, "loss") == pytest.approx(own_eval_loop(model, batches, F.cross_entropy), rel=1e-6)
    assert any("auxiliary outputs" in n for n in report.notes)
