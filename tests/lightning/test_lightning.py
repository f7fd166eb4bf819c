"""evalgap.lightning with a real lightning.Trainer on CPU: the seed in miniature, DDP, SWA, the logs."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")
pytest.importorskip("sklearn")
from torch import nn  # noqa: E402

import evalgap.lightning as egl  # noqa: E402
from evalgap import DataError  # noqa: E402
import evalgap.torch as eg  # noqa: E402
from evalgap.data import load_digits_rgb  # noqa: E402
from evalgap.seed.torch_demo import small_resnet  # noqa: E402

BATCH = 120


class Seed(L.LightningModule):
    """The seed in miniature: class logits, BN momentum 0.01 (Keras's 0.99), raw 0..255 pixels."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.net = small_resnet(10, momentum=momentum, width=4)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(1) == y).float().mean(), on_epoch=True, reduce_fx="mean")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-2)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_rgb(16)
    keep = np.random.default_rng(0).permutation(len(x))[:1680]
    x = torch.from_numpy(x[keep].transpose(0, 3, 1, 2).copy()).float()
    return torch.utils.data.TensorDataset(x, torch.from_numpy(y[keep]).long())


def loaders(ds, shuffle=True):
    train = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(ds, batch_size=BATCH)  # the same data, as the seed validated
    return train, val


def trainer(callbacks=(), epochs=4, **kw):
    return L.Trainer(
        max_epochs=epochs, callbacks=list(callbacks), accelerator="cpu", devices=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, **kw,
    )


@torch.no_grad()
def training_mode_accuracy(module, loader):
    """Accuracy with BN on batch statistics (dropout-free model), on a copy: an independent reference."""
    side = copy.deepcopy(module).train()
    correct = n = 0
    for x, y in loader:
        correct += int((side(x).argmax(1) == y).sum())
        n += len(y)
    return correct / n


def test_seed_in_miniature_without_and_with_precise_bn(digits):
    accuracies = {}
    for name, callbacks in (("plain", []), ("precise", [egl.PreciseBN()])):
        L.seed_everything(0, verbose=False)
        module = Seed()
        train, val = loaders(digits)
        t = trainer(callbacks, logger=False)
        t.fit(module, train, val)
        accuracies[name] = (float(t.callback_metrics["val_accuracy"]), training_mode_accuracy(module, val))
    val_plain, train_plain = accuracies["plain"]
    val_precise, train_precise = accuracies["precise"]
    assert train_plain - val_plain > 0.3, accuracies  # the symptom: eval far below train on the same data
    assert abs(train_precise - val_precise) < 0.02, accuracies  # closed by exact statistics
    assert train_plain == pytest.approx(train_precise, abs=1e-6)  # moving statistics never feed the gradient


def test_precise_bn_logs_the_training_mode_metrics_of_the_weights_validation_sees(digits, tmp_path):
    """``train_mode_accuracy`` is the accuracy of the recalibration pass's outputs: at the last validation
    (after which nothing trains) it equals an independent training-mode loop over the same batches."""
    L.seed_everything(0, verbose=False)
    module = Seed()
    train, val = loaders(digits)
    callback = egl.PreciseBN(val, training_metrics=True)
    t = trainer([callback], epochs=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"))
    t.fit(module, train, val)
    rows = [r for r in csv.DictReader(open(os.path.join(t.logger.log_dir, "metrics.csv"))) if r.get("train_mode_accuracy")]
    assert len(rows) == 2
    assert float(rows[-1]["train_mode_accuracy"]) == pytest.approx(training_mode_accuracy(module, val), abs=1e-6)
    with torch.no_grad():  # the same independent loop's cross-entropy, per sample
        side = copy.deepcopy(module).train()
        loss = sum(float(nn.functional.cross_entropy(side(x), y, reduction="sum")) for x, y in val) / len(val.dataset)
    assert float(rows[-1]["train_mode_loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(rows[-1]["train_mode_accuracy"]) == pytest.approx(callback.last.training_metrics["accuracy"], abs=1e-6)
    with pytest.raises(DataError, match="training_metrics=True"):
        egl.PreciseBN(val, metrics={"accuracy": lambda out, y: (out.argmax(1) == y).float()})


def test_gap_monitor_logs_reach_the_logger(digits, tmp_path):
    L.seed_everything(0, verbose=False)
    module = Seed()
    train, val = loaders(digits)
    monitor = egl.GapMonitor(max_samples=240, verbose=0)
    t = trainer([monitor], epochs=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"))
    t.fit(module, train, val)
    rows = list(csv.DictReader(open(os.path.join(t.logger.log_dir, "metrics.csv"))))
    logged = [r for r in rows if r.get("gap_bn_stale")]
    assert len(logged) == 2 and {"gap_batch_stats", "precise_val_accuracy", "precise_val_loss"} <= set(logged[-1])
    assert float(logged[-1]["gap_bn_stale"]) == pytest.approx(monitor.logged["gap_bn_stale"], rel=1e-6)
    assert float(logged[-1]["gap_bn_stale"]) > 0.2  # stale statistics cost validation 20+ points here
    report = monitor.last
    assert report.probe["samples"] == 240 and report.finding("stale_moving_statistics").numbers["updates"] == 28


def test_gap_monitor_on_a_resumed_fit_counts_the_batches_of_the_earlier_epochs(digits, tmp_path):
    """A fresh GapMonitor on a fit resumed from a checkpoint of epoch 1: 2 epochs x 14 batches = 28 BN updates, as
    the uninterrupted run of the test above counts them (0.99 ** 28 of the initial statistics left, not 0.99 ** 14)."""
    L.seed_everything(0, verbose=False)
    module = Seed()
    train, val = loaders(digits)
    first = trainer(epochs=1, logger=False)
    first.fit(module, train, val)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    monitor = egl.GapMonitor(max_samples=240, verbose=0)
    trainer([monitor], epochs=2, logger=False).fit(module, train, val, ckpt_path=tmp_path / "epoch1.ckpt")
    numbers = monitor.last.finding("stale_moving_statistics").numbers
    assert len(train) == 14 and numbers["updates"] == 28
    assert numbers["initial_weight"] == pytest.approx(0.99 ** 28)


def test_fit_ends_with_the_statistics_of_its_last_weights_when_the_last_epoch_did_not_validate(digits):
    """check_val_every_n_epoch=2 over 3 epochs: epoch 3 trains after the last validation. The module leaves fit with
    the exact statistics of its last weights (the first BN layer against a float64 reference), so whatever runs next
    sees them: a ddp_spawn strategy hands the module back to the main process without the fit loop's progress, and
    its trainer.validate() used to run on the stale statistics."""
    L.seed_everything(0, verbose=False)
    module = Seed()
    train, val = loaders(digits, shuffle=False)
    trainer([egl.PreciseBN()], epochs=3, logger=False, check_val_every_n_epoch=2).fit(module, train, val)
    x = torch.cat([b[0] for b in train]).double()
    with torch.no_grad():
        first = nn.functional.conv2d(x, module.net[0].weight.double(), padding=1)
    reference = first.transpose(0, 1).reshape(first.shape[1], -1).var(1, unbiased=False).numpy()
    error = np.max(np.abs(module.net[1].running_var.double().numpy() / reference - 1))
    assert error < 1e-5, error


def test_precise_bn_keeps_the_spread_of_batch_means_that_swa_drops(digits):
    """Lightning's StochasticWeightAveraging averages batch variances: the first BN layer (whose input
    does not depend on batching) shows the difference against an independent float64 reference."""
    L.seed_everything(0, verbose=False)
    module = Seed()
    ordered = sorted(range(len(digits)), key=lambda i: int(digits[i][1]))  # class order: batches differ a lot
    ds = torch.utils.data.Subset(digits, ordered)
    train, _ = loaders(ds, shuffle=False)
    swa = L.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    trainer([swa], epochs=2, logger=False).fit(module, train)
    bn = module.net[1]
    x = torch.cat([b[0] for b in train]).double()
    with torch.no_grad():
        first = nn.functional.conv2d(x, module.net[0].weight.double(), padding=1)
    reference = first.transpose(0, 1).reshape(first.shape[1], -1).var(1, unbiased=False).numpy()
    swa_error = np.max(np.abs(bn.running_var.double().numpy() / reference - 1))
    eg.recalibrate(module, train, progress=False)
    ours_error = np.max(np.abs(bn.running_var.double().numpy() / reference - 1))
    assert ours_error < 1e-5 and swa_error > 0.05, (ours_error, swa_error)


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, numpy as np, lightning as L
    sys.path.insert(0, sys.argv[2])
    from test_lightning_ddp_module import Seed, dataset
    import evalgap.lightning as egl

    class Save(L.Callback):
        def on_validation_end(self, trainer, module):
            if trainer.is_global_zero:
                torch.save({"state": module.state_dict()}, os.path.join(sys.argv[1], "after.pt"))

    L.seed_everything(0, verbose=False)
    ds = dataset()
    train = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[egl.PreciseBN(), Save()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, logger=False,
                        num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(Seed(), train, torch.utils.data.DataLoader(ds, batch_size=8))
    """
)

DDP_MODULE = textwrap.dedent(
    """
    import torch, lightning as L
    from torch import nn

    class Seed(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=0.01), nn.ReLU(), nn.Linear(8, 3))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])
        def validation_step(self, batch, i):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.05)

    def dataset():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(72, 6, generator=g) * 3 + 40  # far from 0: stale statistics matter
        return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (72,), generator=g))
    """
)


def test_ddp_two_processes_give_the_statistics_of_one_process_over_the_union(tmp_path):
    (tmp_path / "test_lightning_ddp_module.py").write_text(DDP_MODULE)
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    from test_lightning_ddp_module import Seed as DdpSeed, dataset  # noqa: E402

    saved = torch.load(tmp_path / "after.pt")["state"]
    single = DdpSeed()
    single.load_state_dict(saved)
    ds = dataset()
    # Lightning gives each rank of the training loader a DistributedSampler (shuffled, seed 0, epoch 0);
    # each rank cuts its shard into batches of 8
    samplers = [torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0) for r in (0, 1)]
    shards = [[ds[i] for i in sampler] for sampler in samplers]
    batches = [torch.stack([s[0] for s in shard[i : i + 8]]) for shard in shards for i in range(0, len(shard), 8)]
    eg.recalibrate(single, batches, progress=False)
    bn_ddp, bn_one = saved["net.1.running_var"].double().numpy(), single.net[1].running_var.double().numpy()
    np.testing.assert_allclose(bn_ddp, bn_one, rtol=1e-5)
    np.testing.assert_allclose(saved["net.1.running_mean"].double().numpy(), single.net[1].running_mean.double().numpy(), rtol=1e-5, atol=1e-6)
