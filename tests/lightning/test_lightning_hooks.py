"""evalgap.lightning reads batches as the fit loop gives them: batch hooks, true precision, limit_train_batches,
test/predict after fit, several train dataloaders.

References are independent: float64 statistics of the BN inputs hooked in a forward pass of our own over the
batches training_step sees, our own evaluation loop after a standalone ``evalgap.torch.recalibrate``.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")
from torch import nn  # noqa: E402

import evalgap.lightning as egl  # noqa: E402
import evalgap.torch as eg  # noqa: E402
from evalgap import DataError  # noqa: E402

from .conftest import N  # noqa: E402
from .test_lightning_loops import Tiny, my_val_loss, population, trainer  # noqa: E402


class Normalizing(Tiny):
    """Prepares batches in the batch hooks (a documented Lightning pattern): training sees tanh((x - 2) / 3) + 1,
    not an affine map of x, which a Linear then BatchNorm would normalize away."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x - 2.0, y

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return torch.tanh(x / 3.0) + 1.0, y

    def test_step(self, batch, i):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, i):
        return self(batch[0])


def prepared(loader):
    return [(torch.tanh((x - 2.0) / 3.0) + 1.0, y) for x, y in loader]


def assert_exact(module, batches, rtol):
    for bn, (m, v) in zip(module.bns(), population(module, batches)):
        assert float((bn.running_mean.double() - m).abs().max() / m.abs().max()) < rtol
        assert float(((bn.running_var.double() - v) / v).abs().max()) < rtol


def loaders(ds):
    """The training loader (batches of 8) and the validation one (32), with torch's RNG seeded for the module."""
    torch.manual_seed(0)
    return torch.utils.data.DataLoader(ds, batch_size=8), torch.utils.data.DataLoader(ds, batch_size=32)


def recalibrated_copy(module, train):
    """The reference: a copy of the module recalibrated on the batches training_step sees."""
    own = copy.deepcopy(module)
    eg.recalibrate(own, prepared(train), progress=False)
    return own


@pytest.mark.parametrize("callback", ["PreciseBN", "GapMonitor"])
def test_the_pass_reads_batches_through_the_modules_batch_hooks(ds, callback):
    """The statistics are those of the batches training_step sees (after on_before/on_after_batch_transfer)."""
    train, val = loaders(ds)
    module = Normalizing()
    if callback == "PreciseBN":
        t = trainer([egl.PreciseBN()], max_epochs=1)
        t.fit(module, train, val)
        assert_exact(module, prepared(train), 1e-5)
        own = recalibrated_copy(module, train)
        assert float(t.callback_metrics["val_loss"]) == pytest.approx(my_val_loss(own, prepared(val)), rel=1e-5)
    else:  # the probe's precise metric: the loss with the statistics of the prepared batches
        gap = egl.GapMonitor(verbose=0, max_samples=N, loss_fn=nn.functional.cross_entropy)
        trainer([gap], max_epochs=1).fit(module, train, val)
        own = recalibrated_copy(module, train)
        assert gap.logged["precise_val_loss"] == pytest.approx(my_val_loss(own, prepared(train)), rel=1e-4)


@pytest.mark.parametrize("precision,rtol", [("64-true", 1e-9), ("bf16-true", 3e-2)])
def test_true_precision_fits_and_recalibrates_on_the_converted_batches(ds, precision, rtol):
    """Lightning converts each batch to the module's dtype; the pass does too (it crashed on float32 batches)."""
    train, val = loaders(ds)
    module, gap = Tiny(), egl.GapMonitor(verbose=0)
    trainer([egl.PreciseBN(), gap], max_epochs=1, precision=precision).fit(module, train, val)
    dtype = next(module.parameters()).dtype
    assert_exact(module, [(x.to(dtype), y) for x, y in train], rtol)
    assert "gap_bn_stale" in gap.logged


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_test_and_predict_after_fit_recalibrate_as_validate_does(ds, stage):
    """trainer.test() / predict() after a fit whose last epoch was not validated run on recalibrated statistics."""
    train, val = loaders(ds)
    module = Normalizing()
    t = trainer([egl.PreciseBN()], max_epochs=3, check_val_every_n_epoch=2)
    t.fit(module, train, val)
    own = recalibrated_copy(module, train)
    if stage == "test":
        result = t.test(module, val, verbose=False)
        assert result[0]["test_loss"] == pytest.approx(my_val_loss(own, prepared(val)), rel=1e-5)
    else:
        outputs = torch.cat(t.predict(module, val))
        with torch.no_grad():
            expected = torch.cat([own.eval()(x) for x, _ in prepared(val)])
        torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)


class _Stream(torch.utils.data.IterableDataset):
    """An endless stream of samples (it raises after 20 rounds, where a pass would read on without end)."""

    def __init__(self, ds):
        self.ds, self.read = ds, 0

    def __iter__(self):
        while True:
            for item in self.ds:
                self.read += 1
                if self.read > 20 * len(self.ds):
                    raise RuntimeError(f"read {self.read} samples of an endless stream: the pass does not stop")
                yield item


def test_an_endless_train_stream_is_read_for_limit_train_batches_batches_and_refused_without_a_bound(ds):
    stream = _Stream(ds)
    train = torch.utils.data.DataLoader(stream, batch_size=8)
    val = torch.utils.data.DataLoader(ds, batch_size=32)
    torch.manual_seed(0)
    module, precise = Tiny(), egl.PreciseBN()
    trainer([precise], max_epochs=1, limit_train_batches=4).fit(module, train, val)  # it never returned
    assert precise.last.batches == 4
    first_four = [(ds.tensors[0][i:i + 8], ds.tensors[1][i:i + 8]) for i in range(0, 32, 8)]
    assert_exact(module, first_four, 1e-5)
    with pytest.raises(DataError, match=r"no length.*max_batches=N"):
        trainer([egl.PreciseBN()], max_steps=2).fit(Tiny(), train, val)


class _TwoLoaders(Tiny):
    def training_step(self, batch, i):
        x, y = torch.cat([batch["a"][0], batch["b"][0]]), torch.cat([batch["a"][1], batch["b"][1]])
        return nn.functional.cross_entropy(self(x), y)


@pytest.mark.parametrize("callback", [egl.PreciseBN, egl.GapMonitor])
def test_several_train_dataloaders_are_refused_at_fit_start_with_what_to_pass(ds, callback):
    loaders = {k: torch.utils.data.DataLoader(ds, batch_size=8) for k in "ab"}
    val = torch.utils.data.DataLoader(ds, batch_size=32)
    with pytest.raises(DataError, match=r"2 training dataloaders.*dataloader="):
        trainer([callback()], max_epochs=1).fit(_TwoLoaders(), loaders, val)
    module, precise = _TwoLoaders(), egl.PreciseBN(loaders["a"])  # its own dataloader: fit runs
    trainer([precise], max_epochs=1).fit(module, loaders, val)
    assert precise.last is not None
