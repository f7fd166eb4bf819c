"""Lightning callbacks on top of the PyTorch adapter: exact BatchNorm statistics before validation, the gap in the logs.

``Trainer(callbacks=[evalgap.lightning.PreciseBN()])``: before each validation run the
LightningModule's BatchNorm layers get the exact population statistics of the training data
(default: the trainer's train dataloader), so the ``val_*`` that ``validation_step`` logs are
computed with them. Lightning's ``StochasticWeightAveraging`` re-estimates BN statistics by
averaging batch variances, which drops the spread of the batch means; this one keeps it
(``docs/lightning.md``).

Under DDP every rank passes its own shard (its DistributedSampler) and every rank gets the
statistics of the union, through ``torch.distributed``'s default process group.

Frozen layers: Lightning switches the whole module to eval mode before validation, so the
callbacks remember which BN layers were in eval mode during the epoch's first training step
and reproduce those modes for the pass: layers frozen in training stay frozen.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from . import engine
from ._random import is_torch_loader, iterate_keeping_random_states
from .errors import DataError
from .torch.adapter import TorchAdapter
from .torch.api import recalibrate
from .torch.layers import find_batchnorms, modes_kept


class _TrainingModes:
    """The BN layers in eval mode during a training step, to put the module back in that state."""

    def __init__(self) -> None:
        self.frozen: set[int] = set()
        self.seen = False

    def record(self, module: nn.Module) -> None:
        if not self.seen and module.training:
            self.frozen = {id(bn) for _, bn in find_batchnorms(module) if not bn.training}
            self.seen = True

    @contextmanager
    def restored(self, module: nn.Module) -> Iterator[None]:
        with modes_kept(module, True, except_eval=self.frozen):
            yield


def _trained_batches(trainer) -> int:
    """The training batches this trainer's fit loop has run: every training forward moves the BN
    statistics, not only the ones that end in an optimizer step (gradient accumulation)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)


def _fitting(trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING


def _training_data(trainer, own: Any, seen: Any) -> Any:
    """The data to read: the callback's own, the trainer's train dataloader in fit, else the one fit read last."""
    if own is not None:
        return own
    if trainer.train_dataloader is not None:
        return trainer.train_dataloader
    return seen


class _PreparedBatches:
    """The batches of ``data`` as the fit loop hands them to ``training_step``: through the precision plugin's
    ``convert_input`` (``"bf16-true"``, ``"64-true"``), the ``on_before_batch_transfer``,
    ``transfer_batch_to_device`` and ``on_after_batch_transfer`` hooks (the module's or the datamodule's)
    and onto the strategy's device. A DataLoader is read keeping its random states (the hooks' draws too)."""

    def __init__(self, data: Any, trainer, module) -> None:
        self.data, self.trainer, self.module = data, trainer, module

    def __iter__(self) -> Iterator[Any]:
        source = iterate_keeping_random_states(self.data) if is_torch_loader(self.data) else iter(self.data)
        try:
            for batch in source:
                batch = self.trainer.precision_plugin.convert_input(batch)
                batch = self.module._on_before_batch_transfer(batch, dataloader_idx=0)
                yield self.trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # put the random states back now, not when the generator is collected

    def __len__(self) -> int:
        return len(self.data)


def _check_one_train_loader(trainer, own: Any, who: str) -> None:
    """Refuse, at the start of fit, several training dataloaders (a dict or list: Lightning combines their
    batches into one dict or list per step) when the callback has no ``dataloader=`` of its own."""
    loaders = trainer.train_dataloader
    if own is None and isinstance(loaders, (Mapping, list, tuple)):
        raise DataError(
            f"evalgap.lightning.{who}: fit got {len(loaders)} training dataloaders (a {type(loaders).__name__}), which "
            f"Lightning combines into one batch per step; {who} reads one: pass {who}(dataloader=...) with the batches "
            "the BatchNorm layers are trained on (e.g. the loader those layers see)."
        )


def _batch_limit(trainer, own: Any, max_batches: int | None, who: str) -> int | None:
    """The batches a pass reads: ``max_batches``, and on the trainer's own train dataloader no more than an epoch of
    fit reads (``limit_train_batches``). A train dataloader without a length that nothing bounds is refused."""
    if own is not None:
        return max_batches
    per_epoch = trainer.num_training_batches
    if isinstance(per_epoch, int):
        return per_epoch if max_batches is None else min(max_batches, per_epoch)
    if max_batches is None:
        raise DataError(
            f"evalgap.lightning.{who}: the train dataloader has no length (a stream) and limit_train_batches does not "
            f"bound it, so a pass over it might never end: pass {who}(max_batches=N), or limit_train_batches=N to the Trainer."
        )
    return max_batches


@contextmanager
def _precision(trainer) -> Iterator[None]:
    """The trainer's forward context (autocast under ``precision="bf16-mixed"`` / ``"16-mixed"``), so the
    BN layers see the inputs training and validation give them."""
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        yield
        return
    with plugin.forward_context():
        yield


class PreciseBN(pl.Callback):
    """Recalibrate BatchNorm before each validation run (every ``every_n_epochs`` epochs).

    Args:
        dataloader: the data to recalibrate on (default: the trainer's train dataloader).
        max_batches: stop after this many batches.
        every_n_epochs: recalibrate before the validation of every n-th epoch.
        forward: ``forward(module, batch)`` to call the module yourself (default: ``module(batch[0])``).
        verbose: 1 prints one line per run.
        training_metrics: also log ``train_mode_<metric>``: the recalibration pass's own outputs
            (BN on batch statistics, dropout off, the weights validation sees) scored with
            ``loss_fn`` and ``metrics`` as :func:`evalgap.torch.diagnose` takes them (default:
            cross-entropy and accuracy for class scores), at no extra pass: the training-mode
            numbers to read ``val_*`` against.

    Logs ``precise_bn_seconds`` (not in predict, which has no logging). Recalibrates before a validation
    only when training batches ran since the last pass (every training forward moves the statistics,
    with gradient accumulation too); at the start of ``trainer.validate``, ``trainer.test`` and
    ``trainer.predict`` after ``fit`` likewise, whatever ``every_n_epochs`` says, on the train
    dataloader fit read. Batches reach the module as the fit loop gives them to ``training_step``:
    the precision plugin's ``convert_input`` (``"bf16-true"``, ``"64-true"``), the batch hooks
    (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``) and
    the strategy's device. On the trainer's train dataloader a pass reads at most an epoch of fit
    (``limit_train_batches``); a stream without a length that nothing bounds, and several training
    dataloaders (a dict or list) without ``dataloader=``, are refused when fit starts. The pass runs
    in the trainer's forward context (autocast under mixed precision). Without a validation loop it
    recalibrates at the end of each due training epoch. When fit ends with training batches after the
    last pass (``check_val_every_n_epoch`` that skips the last epoch, ``max_steps``), it recalibrates
    once more: the module leaves fit with the statistics of its last weights (under ``ddp_spawn`` the
    main process gets the module back without the fit loop's progress and cannot tell). Side effects: the module's BatchNorm running
    statistics, which is the point; training continues from them.
    """

    def __init__(self, dataloader: Any = None, max_batches: int | None = None, every_n_epochs: int = 1, forward=None, verbose: int = 0,
                 *, training_metrics: bool = False, loss_fn=None, metrics=None):
        engine.check_schedule(every_n_epochs, None, max_batches=max_batches)
        if dataloader is not None:
            engine.check_reiterable(dataloader, "evalgap.lightning.PreciseBN")
        if (loss_fn is not None or metrics is not None) and not training_metrics:
            raise DataError("loss_fn and metrics score the recalibration pass's outputs: pass training_metrics=True as well.")
        self.dataloader, self.max_batches, self.every, self.forward, self.verbose = dataloader, max_batches, every_n_epochs, forward, verbose
        self.scoring = {"training_metrics": training_metrics, "loss_fn": loss_fn, "metrics": metrics}
        self.last = None
        self._modes = _TrainingModes()
        self._batches_done = -1
        self._fit_data = None

    def on_train_start(self, trainer, pl_module) -> None:
        _check_one_train_loader(trainer, self.dataloader, "PreciseBN")
        _batch_limit(trainer, self.dataloader, self.max_batches, "PreciseBN")  # refuses an unbounded stream now, not mid-fit

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._modes.seen = False
        self._fit_data = trainer.train_dataloader

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._modes.record(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and not trainer.testing:
            self._run(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.enable_validation or not trainer.val_dataloaders:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, last=True)  # epochs trained after the last validation: fit ends exact anyway

    def _run(self, trainer, pl_module, last: bool = False) -> None:
        done = _trained_batches(trainer)
        if done == 0 or done == self._batches_done:  # no training yet, or none since the last pass
            return
        if _fitting(trainer) and not last and (trainer.current_epoch + 1) % self.every:
            return  # outside fit (trainer.validate) the statistics are stale whatever the epoch: recalibrate
        data = _training_data(trainer, self.dataloader, self._fit_data)
        if data is None:
            rank_zero_warn("evalgap.lightning.PreciseBN: no training data to recalibrate on outside fit; pass dataloader= to "
                           "PreciseBN. This validation runs with the BatchNorm statistics as they are.")
            return
        limit = _batch_limit(trainer, self.dataloader, self.max_batches, "PreciseBN")
        t = time.perf_counter()
        with self._modes.restored(pl_module), _precision(trainer):
            self.last = recalibrate(pl_module, _PreparedBatches(data, trainer, pl_module), max_batches=limit, forward=self.forward,
                                    progress=False, **self.scoring)
        self._batches_done = done
        if not trainer.predicting and not last:  # predict and on_train_end have no logging
            pl_module.log("precise_bn_seconds", time.perf_counter() - t, on_step=False, on_epoch=True)
            for name, value in (self.last.training_metrics or {}).items():  # reduced over the ranks already: no sync_dist
                pl_module.log(f"train_mode_{name}", value, on_step=False, on_epoch=True)
        if self.verbose and trainer.is_global_zero:
            print(f"PreciseBN (epoch {trainer.current_epoch + 1}): {self.last.summary()}")


class GapMonitor(pl.Callback):
    """The gap's terms and ``precise_val_<metric>`` in the logs, after every validation run.

    Measures the module on a fixed probe of the training data (``max_samples``, the first
    batches of the dataloader) in every mode and logs, with ``pl_module.log`` (so they reach
    TensorBoard, CSV or any logger the trainer has): ``gap_bn_stale`` (P - E of the primary
    metric on the training probe: what stale moving statistics cost an evaluation of it), ``gap_batch_stats`` (Td - P) and
    ``precise_val_<metric>`` (P). The EMA arithmetic counts every training batch the fit loop has run, those of
    the epochs a resumed fit restored from its checkpoint included; prints one
    sentence when validation is distorted by BatchNorm statistics (``verbose=1``). The module
    is never changed. The probe's batches reach the module as the fit loop gives them (see
    :class:`PreciseBN`); several training dataloaders without ``dataloader=`` are refused when fit
    starts. ``loss_fn``, ``metrics``, ``primary`` and ``forward`` are as in
    :func:`evalgap.torch.diagnose` (default: cross-entropy and accuracy for class scores).
    """

    def __init__(
        self, dataloader: Any = None, *, max_samples: int = 256, every_n_epochs: int = 1, primary: str | None = None,
        loss_fn=None, metrics=None, forward=None, verbose: int = 1,
    ):
        if dataloader is not None:
            engine.check_reiterable(dataloader, "evalgap.lightning.GapMonitor")
        self.dataloader, self.forward = dataloader, forward
        self.metric_options = {"loss_fn": loss_fn, "metrics": metrics}
        fix = "add evalgap.lightning.PreciseBN() to the Trainer's callbacks"
        self.core = engine.GapProbe(max_samples=max_samples, every=every_n_epochs, verbose=verbose, primary=primary, fix=fix)
        self._modes = _TrainingModes()
        self.logged: dict[str, float] = {}
        self._fit_data = None

    @property
    def last(self):
        return self.core.last

    def on_train_start(self, trainer, pl_module) -> None:
        _check_one_train_loader(trainer, self.dataloader, "GapMonitor")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._modes.seen = False
        self._fit_data = trainer.train_dataloader

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._modes.record(pl_module)
        self.core.step()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or _trained_batches(trainer) == 0 or not self.core.due(trainer.current_epoch):
            return
        data = _training_data(trainer, self.dataloader, self._fit_data)
        if data is None:
            rank_zero_warn("evalgap.lightning.GapMonitor: no training data to measure outside fit; pass dataloader= to GapMonitor.")
            return
        adapter = TorchAdapter(forward=self.forward)
        steps = trainer.num_training_batches if isinstance(trainer.num_training_batches, int) else None
        with self._modes.restored(pl_module), _precision(trainer):
            prepared = _PreparedBatches(data, trainer, pl_module)
            logs = self.core.measure(adapter, pl_module, lambda: adapter.batches(prepared, targets=True), trainer.current_epoch,
                                     steps_per_epoch=steps, metric_options=self.metric_options, updates=_trained_batches(trainer))
        self.logged = logs
        for name, value in logs.items():
            pl_module.log(name, value, on_step=False, on_epoch=True)
