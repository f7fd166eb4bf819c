"""``PreciseBN`` for PyTorch training loops: exact statistics before every validation."""

from __future__ import annotations

import time
from typing import Any, Iterable

from torch import nn

from ..errors import DataError
from ..recalibration import Recalibration
from ._batches import Forward
from .precise_bn import recalibrate


class PreciseBN:
    """Recalibrate BatchNorm before validating, every ``every``-th epoch.

    Call it where validation starts; it runs :func:`evalgap.torch.recalibrate` on ``data``
    when the epoch is due and returns the :class:`evalgap.Recalibration` (else ``None``)::

        precise_bn = evalgap.torch.PreciseBN(train_loader, max_batches=200)
        for epoch in range(epochs):
            train_one_epoch(model, train_loader)
            precise_bn(model, epoch)          # exact statistics for the current weights
            validate(model, val_loader)

    Or let it fire by itself whenever the model switches to evaluation mode
    (``model.eval()``) after training steps: ``precise_bn.attach(model)`` (``detach()`` undoes
    it). Side effects: the model's BatchNorm running statistics, which is the point.
    """

    def __init__(
        self,
        data: Iterable[Any],
        *,
        every: int = 1,
        max_batches: int | None = None,
        forward: Forward | None = None,
        verbose: int = 1,
    ):
        if every < 1:
            raise DataError(f"every must be >= 1, got {every}.")
        if hasattr(data, "__next__"):
            raise DataError(
                "PreciseBN reads the data at every validation, and a generator or iterator is used up after one pass: "
                "pass a DataLoader or a list of batches."
            )
        self.data, self.every, self.max_batches, self.forward, self.verbose = data, every, max_batches, forward, verbose
        self.last: Recalibration | None = None
        self.seconds = 0.0
        self._calls = 0
        self._model: nn.Module | None = None
        self._orig_train = None
        self._busy = False

    def __call__(self, model: nn.Module, epoch: int | None = None) -> Recalibration | None:
        self._calls += 1
        index = epoch if epoch is not None else self._calls - 1
        if (index + 1) % self.every:
            return None
        t = time.perf_counter()
        self.last = recalibrate(model, self.data, max_batches=self.max_batches, forward=self.forward, progress=False)
        self.seconds = time.perf_counter() - t
        if self.verbose:
            print(f"PreciseBN (epoch {index + 1}): {self.last.summary()}")
        return self.last

    # ---- automatic mode: recalibrate when the model goes from training to evaluation -----
    def attach(self, model: nn.Module) -> "PreciseBN":
        """Recalibrate each time ``model.eval()`` (or ``train(False)``) follows training mode."""
        if self._model is not None:
            raise RuntimeError("this PreciseBN is already attached; detach() it first")
        orig = model.train
        hook = self

        def train(mode: bool = True):
            if model.training and not mode and not hook._busy:
                hook._busy = True  # recalibrate itself switches modes
                try:
                    hook(model)  # still in training mode: frozen (eval-mode) BN layers are recognized
                finally:
                    hook._busy = False
            return orig(mode)

        self._model, self._orig_train = model, orig
        model.train = train  # type: ignore[method-assign]
        return self

    def detach(self) -> None:
        if self._model is not None:
            self._model.__dict__.pop("train", None)
        self._model = self._orig_train = None
