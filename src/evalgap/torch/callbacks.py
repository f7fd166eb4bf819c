"""Helpers for PyTorch training loops: :class:`PreciseBN` before validation, :class:`GapMonitor` per epoch."""

from __future__ import annotations

import time
import types
from typing import Any, Iterable

import torch
from torch import nn

from .. import engine
from ..errors import EvalgapError
from ..recalibration import Recalibration
from .adapter import TorchAdapter
from .api import recalibrate
from .data import Forward


class PreciseBN:
    """Recalibrate BatchNorm before validating, every ``every``-th epoch.

    Call it where validation starts; it runs :func:`evalgap.torch.recalibrate` on ``data``
    when the epoch is due and returns the :class:`evalgap.Recalibration` (else ``None``)::

        precise_bn = evalgap.torch.PreciseBN(train_loader, max_batches=200)
        for epoch in range(epochs):
            train_one_epoch(model, train_loader)
            precise_bn(model, epoch)          # exact statistics for the current weights
            validate(model, val_loader)

    Or let it fire by itself when the model switches to evaluation mode (``model.eval()``)
    after training steps (forward passes in training mode with gradients on, or any that moved
    a BatchNorm layer's ``num_batches_tracked``, a training-mode forward under ``no_grad`` too, since it
    moves the statistics; a compiled graph may skip the forward hooks; ``load_state_dict`` is none):
    ``precise_bn.attach(model)`` (``detach()`` undoes it). Side effects: the model's
    BatchNorm running statistics, which is the point. Extra keyword arguments go to
    :func:`evalgap.torch.recalibrate` (``batch_size``, ``seed``, ``process_group``,
    ``training_metrics``, ``loss_fn``, ``metrics``, ...).
    """

    def __init__(
        self, data: Iterable[Any], *, every: int = 1, max_batches: int | None = None, forward: Forward | None = None,
        verbose: int = 1, **recalibrate_kwargs: Any,
    ):
        engine.check_schedule(every, None, max_batches=max_batches, batch_size=recalibrate_kwargs.get("batch_size"))
        engine.check_reiterable(data, "PreciseBN")
        self.data, self.every, self.max_batches, self.forward, self.verbose = data, every, max_batches, forward, verbose
        self.kwargs = recalibrate_kwargs
        self.last: Recalibration | None = None
        self.seconds = 0.0
        self._calls = 0
        self._model: nn.Module | None = None
        self._hook = self._load_hook = None
        self._trained = False
        self._tracked = 0
        self._busy = False

    def __call__(self, model: nn.Module, epoch: int | None = None) -> Recalibration | None:
        self._calls += 1
        index = epoch if epoch is not None else self._calls - 1
        if (index + 1) % self.every:
            return None
        t = time.perf_counter()
        self.last = recalibrate(model, self.data, max_batches=self.max_batches, forward=self.forward, progress=False, **self.kwargs)
        self.seconds = time.perf_counter() - t
        self._trained = False
        if model is self._model:
            self._tracked = _batches_tracked(model)
        if self.verbose:
            print(f"PreciseBN (epoch {index + 1}): {self.last.summary()}")
        return self.last

    # ---- automatic mode: recalibrate when the model goes from training to evaluation -----
    def attach(self, model: nn.Module) -> "PreciseBN":
        """Recalibrate each time ``model.eval()`` (or ``train(False)``) follows training steps.

        Sets ``model.train`` (the class's own ``train`` runs inside) and a forward pre-hook. A copy
        of the model (``copy.deepcopy``, as EMA helpers make; ``torch.save``/``pickle``) switches
        modes plainly and never fires: only ``model`` is attached. Under ``torch.distributed`` the
        recalibration is a collective (the statistics are combined over the ranks): every rank must
        switch to evaluation mode at the same point, e.g. validate on every rank, not on rank 0 alone.
        """
        if self._model is not None:
            raise EvalgapError("this PreciseBN is already attached to a model: detach() it first.")
        self._model, self._trained, self._tracked = model, False, _batches_tracked(model)
        self._hook = model.register_forward_pre_hook(_TrainingSteps(self))
        self._load_hook = model.register_load_state_dict_post_hook(_LoadedCounters(self))
        model.train = types.MethodType(_TrainSwitch(self), model)  # type: ignore[method-assign]
        return self

    def detach(self) -> None:
        if self._model is not None:
            self._model.__dict__.pop("train", None)
        for handle in (self._hook, self._load_hook):
            if handle is not None:
                handle.remove()
        self._model = self._hook = self._load_hook = None


class _TrainSwitch:
    """``model.train`` of an attached model: recalibrates on a switch to evaluation mode after training
    steps. Bound with ``types.MethodType``: a deepcopy binds it to the copy (which it leaves to its
    class's ``train``), and a pickle stores the plain ``train`` (a method pickles as its name)."""

    __name__ = "train"

    def __init__(self, precise_bn: PreciseBN):
        self.precise_bn = precise_bn

    def __call__(self, model: nn.Module, mode: bool = True) -> nn.Module:
        hook = self.precise_bn
        # (not ``model.training``: a ``torch.compile`` wrapper's ``eval()`` sets this module's flag before it calls
        # this; the submodules' modes, which say which BN layers are frozen, are still those of training)
        if model is hook._model and not mode and not hook._busy \
                and (hook._trained or _batches_tracked(model) != hook._tracked):  # the pre-hook, or what BN training calls count
            hook._busy = True  # recalibrate itself switches modes
            try:
                hook(model)  # the submodules still in training mode: frozen (eval-mode) BN layers are recognized
            finally:
                hook._busy = False
        return type(model).train(model, mode)


def _batches_tracked(model: nn.Module) -> int:
    """The sum of the BatchNorm layers' ``num_batches_tracked``: every call of a layer in training mode adds one,
    inside a compiled graph too, where a forward pre-hook added after compiling never runs. One transfer."""
    counts = [m.num_batches_tracked.detach().reshape(()) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._NormBase) and isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor)]
    return int(torch.stack([c.to(counts[0].device) for c in counts]).sum()) if counts else 0


class _LoadedCounters:
    """``load_state_dict`` post-hook of an attached model: loaded counters (a checkpoint, pretrained weights) are no
    training step. A copy of the model gets a hook that does nothing (:class:`_NoHook`)."""

    def __init__(self, precise_bn: PreciseBN):
        self.precise_bn = precise_bn

    def __call__(self, module: nn.Module, incompatible: Any) -> None:
        if module is self.precise_bn._model:
            self.precise_bn._tracked = _batches_tracked(module)

    def __reduce__(self):
        return (_NoHook, ())


class _TrainingSteps:
    """Forward pre-hook of an attached model: notes a training step (training mode, gradients on).
    A copy of the model gets a hook that does nothing (:class:`_NoHook`)."""

    def __init__(self, precise_bn: PreciseBN):
        self.precise_bn = precise_bn

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        hook = self.precise_bn
        if module is hook._model and module.training and torch.is_grad_enabled() and not hook._busy:
            hook._trained = True

    def __reduce__(self):
        return (_NoHook, ())


class _NoHook:
    def __call__(self, module: nn.Module, *args: Any) -> None:
        return None


class GapMonitor:
    """Measure the gap's terms on a fixed probe subset, once per epoch, from your own loop.

    ::

        monitor = evalgap.torch.GapMonitor(train_loader, max_samples=256)
        for epoch in range(epochs):
            for batch in train_loader:
                ...; optimizer.step(); monitor.step()
            logs = monitor(model, epoch)     # {'gap_bn_stale': ..., 'gap_batch_stats': ..., 'precise_val_accuracy': ...}

    ``step()`` counts BatchNorm updates (one per training step) for the EMA arithmetic.
    The model is never changed. ``primary=`` picks the metric (default: accuracy-like,
    else the first given metric, else the loss); ``loss_fn``, ``metrics``, ``forward``,
    ``process_group``, ``batch_size``, ``shuffle`` and ``seed`` are as in
    :func:`evalgap.torch.diagnose`.
    """

    def __init__(
        self, data: Iterable[Any], *, max_samples: int = 256, every: int = 1, verbose: int = 1, primary: str | None = None,
        loss_fn=None, metrics=None, forward: Forward | None = None, process_group=None, batch_size: int | None = None,
        shuffle: bool = True, seed: int = 0,
    ):
        self.adapter = TorchAdapter(forward=forward, process_group=process_group)
        self.data, self.batching = data, {"batch_size": batch_size, "shuffle": shuffle, "seed": seed}
        self.metric_options = {"loss_fn": loss_fn, "metrics": metrics}
        self.core = engine.GapProbe(max_samples=max_samples, every=every, verbose=verbose, primary=primary, fix=self.adapter.remedies.monitor_fix(),
                                    batch_size=batch_size)

    @property
    def updates(self) -> int:
        return self.core.updates

    @property
    def last(self):
        return self.core.last

    def step(self, n: int = 1) -> None:
        self.core.step(n)

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if not self.core.due(epoch):
            return {}
        source = lambda: self.adapter.batches(self.data, targets=True, **self.batching)  # noqa: E731
        return self.core.measure(self.adapter, model, source, epoch, metric_options=self.metric_options)
