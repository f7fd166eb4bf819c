"""``evalgap.torch.recalibrate(..., training_metrics=True)``: the pass's own outputs scored with the user's
loss and metrics (or the defaults the shapes imply). Reference: the same network in float64 NumPy, each
batch normalized by its own biased statistics as in training, dropout off, every sample counted once
(the ragged last batch too)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap import DataError  # noqa: E402

from ._reference import state_snapshot  # noqa: E402

SIZES = (32, 32, 32, 4)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, eps=1e-3), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    with torch.no_grad():  # BN weights away from 1 and 0, so the reference must apply them
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.train()


def _batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in SIZES:
        x = torch.randn(n, 5, generator=g) * torch.tensor([1.0, 2, 3, 4, 5]) + 10
        out.append((x, torch.randint(0, 3, (n,), generator=g)))
    return out


def _reference_logits(net: nn.Module, batches) -> list[np.ndarray]:
    w1, b1 = (p.detach().double().numpy() for p in (net[0].weight, net[0].bias))
    gamma, beta = (p.detach().double().numpy() for p in (net[1].weight, net[1].bias))
    w2, b2 = (p.detach().double().numpy() for p in (net[4].weight, net[4].bias))
    out = []
    for x, _ in batches:
        h = x.double().numpy() @ w1.T + b1
        h = gamma * (h - h.mean(0)) / np.sqrt(h.var(0) + net[1].eps) + beta
        out.append(np.maximum(h, 0) @ w2.T + b2)  # dropout off
    return out


def test_default_loss_and_accuracy_of_the_pass_outputs():
    net, batches = _net(), _batches()
    logits = _reference_logits(net, batches)
    y = np.concatenate([t.numpy() for _, t in batches])
    z = np.concatenate(logits)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    result = eg.recalibrate(net, batches, training_metrics=True, progress=False)
    assert set(result.training_metrics) == {"loss", "accuracy"}
    assert result.training_metrics["loss"] == pytest.approx(-log_p[np.arange(len(y)), y].mean(), rel=1e-5)
    assert result.training_metrics["accuracy"] == pytest.approx((z.argmax(1) == y).mean(), abs=1e-9)
    assert result.to_dict()["training_metrics"] == result.training_metrics
    assert result.samples == 96 and result.skipped_samples == 4  # the statistics: whole batches only


def test_the_users_loss_and_metrics():
    net, batches = _net(), _batches()
    z = np.concatenate(_reference_logits(net, batches))
    y = np.concatenate([t.numpy() for _, t in batches])
    top = z.max(1)
    result = eg.recalibrate(
        net, batches, training_metrics=True, progress=False,
        loss_fn=lambda out, t: out.max(1).values.mean(),  # a batch mean: weighted by batch size over the data
        metrics={"hits": lambda out, t: (out.argmax(1) == t).float()},  # per sample
    )
    assert set(result.training_metrics) == {"loss", "hits"}
    assert result.training_metrics["loss"] == pytest.approx(top.mean(), rel=1e-5)
    assert result.training_metrics["hits"] == pytest.approx((z.argmax(1) == y).mean(), abs=1e-9)


def test_options_without_training_metrics_or_data_without_targets_are_clear_errors_that_change_nothing():
    net, batches = _net(), _batches()
    before = state_snapshot(net)
    with pytest.raises(DataError, match="training_metrics=True"):
        eg.recalibrate(net, batches, loss_fn=nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(DataError, match=r"\(x, y\)"):
        eg.recalibrate(net, [x for x, _ in batches], training_metrics=True, progress=False)
    assert state_snapshot(net) == before
    assert eg.recalibrate(net, batches, progress=False).training_metrics is None


def test_a_last_batch_of_one_sample_is_left_out_of_the_scores_and_said():
    """Arrays of 17 samples in batches of 8: the last batch holds one sample, which training-mode BatchNorm
    refuses; the scores are those of the 16 others (float64 reference) and a note says so."""
    net = _net()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(17, 5, generator=g) * 3 + 10
    y = torch.randint(0, 3, (17,), generator=g)
    result = eg.recalibrate(net, (x, y), batch_size=8, shuffle=False, training_metrics=True, progress=False)
    z = np.concatenate(_reference_logits(net, [(x[:8], y[:8]), (x[8:16], y[8:16])]))
    assert result.training_metrics["accuracy"] == pytest.approx((z.argmax(1) == y[:16].numpy()).mean(), abs=1e-9)
    assert any("one sample" in note for note in result.notes)
    assert result.samples == 16 and result.skipped_samples == 1


def test_a_last_batch_of_one_image_is_scored_where_batchnorm2d_takes_it():
    """BatchNorm2d normalizes one image by its H x W values per channel: the one-sample last batch is
    scored with the others (float64 reference of every sample), and no note says otherwise."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).train()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 2, 4, 4, generator=g) * 2 + 1, torch.randint(0, 2, (9,), generator=g)
    result = eg.recalibrate(net, (x, y), batch_size=4, shuffle=False, training_metrics=True, progress=False)
    with torch.no_grad():  # training mode on a copy, batch by batch: an independent reference
        side = copy.deepcopy(net).train()
        z = torch.cat([side(x[i:i + 4]) for i in range(0, 9, 4)]).double().numpy()
    assert result.training_metrics["accuracy"] == pytest.approx((z.argmax(1) == y.numpy()).mean(), abs=1e-9)
    assert not any("one sample" in note for note in result.notes)
