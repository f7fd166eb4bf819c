"""evalgap.lightning in the fit loop's corners: gradient accumulation, validate after fit, persistent workers, bf16.

References are independent: float64 statistics of the BN inputs hooked in a forward pass of our own,
our own evaluation loop, and the same run without the callbacks.
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")
from torch import nn  # noqa: E402

import evalgap.lightning as egl  # noqa: E402

from .conftest import C, D  # noqa: E402 (the data of the ds fixture)


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8, momentum=0.01), nn.ReLU(), nn.Linear(8, 8),
                                 nn.BatchNorm1d(8, momentum=0.01), nn.ReLU(), nn.Linear(8, C))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), on_epoch=True)

    def bns(self):
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm1d)]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)


def trainer(callbacks=(), **kw):
    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                   enable_checkpointing=False, num_sanity_val_steps=0)
    options.update(kw)
    return L.Trainer(callbacks=list(callbacks), **options)


@torch.no_grad()
def population(module, loader, autocast=False):
    """float64 mean and biased variance of every BN layer's input over the loader, on a side copy (BN on batch statistics)."""
    side = copy.deepcopy(module).eval()
    seen: dict[int, list] = {}
    for k, bn in enumerate(side.bns()):
        bn.train()
        bn.register_forward_pre_hook(lambda m, a, k=k: seen.setdefault(k, []).append(a[0].detach().double()))
    for x, _ in loader:
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                side(x)
        else:
            side(x)
    return [(torch.cat(v).mean(0), torch.cat(v).var(0, unbiased=False)) for _, v in sorted(seen.items())]


@torch.no_grad()
def my_val_loss(module, loader):
    side = copy.deepcopy(module).eval()
    total = n = 0
    for x, y in loader:
        total += float(nn.functional.cross_entropy(side(x), y, reduction="sum"))
        n += len(y)
    return total / n


class StatisticsAtValidation(L.Callback):
    """After PreciseBN (later in the callback list): how far the BN statistics are from the exact ones at each validation."""

    def __init__(self, loader, autocast=False):
        self.loader, self.autocast, self.errors = loader, autocast, []

    def on_validation_start(self, trainer, module):
        if trainer.sanity_checking:
            return
        ref = population(module, self.loader, self.autocast)
        self.errors.append(max(
            max(float((bn.running_mean.double() - m).abs().max()), float(((bn.running_var.double() - v) / v).abs().max()))
            for bn, (m, v) in zip(module.bns(), ref)
        ))


def test_precise_bn_recalibrates_at_every_validation_inside_a_gradient_accumulation_window(ds):
    # 12 batches, an optimizer step every 4, a validation every 2: every training forward moves the BN
    # statistics, so each of the 6 validations needs its own pass, not only those after an optimizer step.
    train = torch.utils.data.DataLoader(ds, batch_size=8)
    val = torch.utils.data.DataLoader(ds, batch_size=32)
    check = StatisticsAtValidation(train)
    torch.manual_seed(0)
    trainer([egl.PreciseBN(), check], max_epochs=1, accumulate_grad_batches=4, val_check_interval=2).fit(Tiny(), train, val)
    assert len(check.errors) == 6
    assert max(check.errors) < 1e-5, check.errors


@pytest.mark.parametrize("schedule", [dict(max_epochs=3, check_val_every_n_epoch=2), dict(max_steps=5)], ids=["last-epoch-unvalidated", "max-steps"])
def test_validate_after_fit_sees_the_exact_statistics_of_the_training_data_fit_read(ds, schedule):
    # fit does not end with a validation: PreciseBN recalibrates when fit ends (on the loader fit read), so
    # trainer.validate runs on exact statistics, with no pass of its own.
    train = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(ds, batch_size=32)
    torch.manual_seed(0)
    module, precise = Tiny(), egl.PreciseBN()
    t = trainer([precise], **schedule)
    t.fit(module, train, val)
    result = t.validate(module, val, verbose=False)
    for bn, (m, v) in zip(module.bns(), population(module, train)):
        assert float((bn.running_mean.double() - m).abs().max()) < 1e-5
        assert float(((bn.running_var.double() - v) / v).abs().max()) < 1e-5
    assert result[0]["val_loss"] == pytest.approx(my_val_loss(module, val), rel=1e-5)
    # no training since that pass: validating again keeps the statistics, without another pass
    first, stats = precise.last, [bn.running_var.clone() for bn in module.bns()]
    t.validate(module, val, verbose=False)
    assert precise.last is first and all(torch.equal(a, bn.running_var) for a, bn in zip(stats, module.bns()))


def test_gap_monitor_measures_in_validate_after_a_fit_without_validation(ds):
    train = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(ds, batch_size=32)
    torch.manual_seed(0)
    module, gap = Tiny(), egl.GapMonitor(verbose=0)
    t = trainer([gap], max_steps=5)  # 12 batches an epoch: fit ends before its first validation
    t.fit(module, train, val)
    assert gap.logged == {}
    result = t.validate(module, val, verbose=False)
    assert {"gap_bn_stale", "gap_batch_stats"} <= set(gap.logged) and "gap_bn_stale" in result[0]


def _count_and_weights(ds, callbacks):
    class Count(L.Callback):
        n = 0

        def on_train_batch_end(self, *args):
            self.n += 1

    count = Count()
    train = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=1, persistent_workers=True,
                                        generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(ds, batch_size=32)
    torch.manual_seed(0)
    module = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([count, *callbacks], max_epochs=1, val_check_interval=4).fit(module, train, val)
    return count.n, [p.detach().clone() for p in module.parameters()]


def test_persistent_workers_and_mid_epoch_validation_train_exactly_as_without_the_callbacks(ds):
    # iter() on a persistent-workers loader resets the iterator the fit loop is consuming: the pass reads a loader of its own
    n, weights = _count_and_weights(ds, [])
    assert n == 12
    for callbacks in ([egl.PreciseBN()], [egl.GapMonitor(verbose=0, max_samples=32)]):
        n_with, weights_with = _count_and_weights(ds, callbacks)
        assert n_with == n
        assert all(torch.equal(a, b) for a, b in zip(weights, weights_with))


def test_bf16_mixed_recalibrates_on_the_bn_inputs_autocast_gives(ds):
    train = torch.utils.data.DataLoader(ds, batch_size=8)
    val = torch.utils.data.DataLoader(ds, batch_size=32)
    check = StatisticsAtValidation(train, autocast=True)
    torch.manual_seed(0)
    trainer([egl.PreciseBN(), check], max_epochs=1, precision="bf16-mixed").fit(Tiny(), train, val)
    assert len(check.errors) == 1 and check.errors[0] < 1e-5, check.errors
