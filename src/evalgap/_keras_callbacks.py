"""The Keras callbacks of evalgap, for Keras 3 (``evalgap.keras``) and Keras 2 (``evalgap.tf_keras``).

Both Keras versions share the callback protocol (``set_model``, ``on_epoch_begin``,
``on_test_begin``, ``on_epoch_end``, ...), so the two callbacks are written once here and
the logic lives in :class:`PreciseBNLogic` and :class:`GapMonitorLogic`, which each version's
``callbacks.py`` combines with its own ``Callback`` class and adapter. Framework-free: nothing
here imports Keras. ``{api}`` in the docstrings is filled in by :func:`doc`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from typing import Any

import numpy as np

from . import engine
from ._keras_common import repeats_forever, reshuffle_warning, reshuffles_each_iteration
from ._random import random_states_kept
from .errors import DataError

logger = logging.getLogger("evalgap")


def _swaps_weights(callback: Any) -> bool:
    """A callback that swaps other weights into the model around validation (Keras's ``SwapEMAWeights``)."""
    return any(cls.__name__ == "SwapEMAWeights" for cls in type(callback).__mro__)


def run_first(callback: Any, model: Any, set_model: Any) -> None:
    """Move evalgap's callbacks to the front of the ``CallbackList`` that is calling ``set_model``, or right behind
    the first callback that swaps weights in for validation (``SwapEMAWeights``); no other callback moves.

    Keras passes one logs dict to every callback's ``on_epoch_end`` in list order, so a
    ``CSVLogger`` or ``TensorBoard`` listed before an evalgap callback would write the epoch
    before evalgap adds its values. A ``SwapEMAWeights`` stays ahead, so that ``PreciseBN``
    recalibrates the weights validation runs with (the EMA weights it has swapped in), and the
    callbacks listed before it stay before it (a ``ModelCheckpoint`` saving the raw weights).
    Called from ``set_model``, which the ``CallbackList`` calls on every callback when fit
    builds it (found by inspection of the calling frames; if it is not there, nothing
    changes). The list is being iterated: the callbacks moved before the current position get
    their model here (the others may get ``set_model`` once more, which only stores the model
    again). The relative order of the other callbacks, and of evalgap's, is kept.
    """
    frame, callbacks = sys._getframe(1), None
    for _ in range(6):  # our set_model (or a subclass's), then the CallbackList
        frame = frame.f_back if frame is not None else None
        candidate = getattr(frame.f_locals.get("self") if frame is not None else None, "callbacks", None)
        if isinstance(candidate, list) and any(c is callback for c in candidate):
            callbacks = candidate
            break
    if callbacks is None:
        return
    ours = [c for c in callbacks if getattr(c, "_evalgap_runs_first", False)]
    others = [c for c in callbacks if not getattr(c, "_evalgap_runs_first", False)]
    at = next((i + 1 for i, c in enumerate(others) if _swaps_weights(c)), 0)
    callbacks[:] = others[:at] + ours + others[at:]
    for c in others[:at]:  # now ahead of the position being iterated: they may not have their model yet
        c.set_model(model)
    for c in ours:
        set_model(c, model)  # the framework's Callback.set_model: no second reordering


def _fingerprint(weights: Any) -> str:
    """A digest of the weights' values: equal digests, equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for w in weights:
        value = np.ascontiguousarray(w.numpy() if hasattr(w, "numpy") else np.asarray(w))
        digest.update(str((value.shape, value.dtype)).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _steps_taken(model: Any) -> int | None:
    """The optimizer's step counter (every training step, those of earlier fits included), if it has one."""
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    try:
        return int(np.asarray(iterations.numpy() if hasattr(iterations, "numpy") else iterations))
    except Exception:
        return None



class PreciseBNLogic:
    """Exact BatchNorm population statistics after every ``every``-th epoch, before validation.

    ``fit`` runs validation (``on_test_begin``) before ``on_epoch_end``; this callback
    recalibrates at that point, so the epoch's ``val_*`` metrics in the logs and the
    History are computed with exact statistics. Without validation it recalibrates at
    ``on_epoch_end``. A standalone ``model.evaluate`` does not trigger it. Once more at
    the end of training if the weights changed since the last run (by training, or by fit
    swapping in an optimizer's EMA weights, ``use_ema=True``, at its end). With Keras's
    ``SwapEMAWeights`` it recalibrates the EMA weights that validation runs with.

    Args:
        data: training data as :func:`{api}.recalibrate` takes it (arrays are
            drawn into shuffled batches like fit's; batched sources keep their batches).
        max_samples: use at most this many samples, whole batches only (default: all).
        every: recalibrate after every ``every``-th epoch.
        verbose: 1 prints one line per run (time, largest drift corrected); 0 is silent.
        batch_size: for array data, the batch size ``fit`` uses (a callback cannot see
            it); without it, Keras's default 32, with a warning.
        shuffle, seed: how array data are drawn into batches.
        training_metrics: also log ``train_mode_<metric>``: the compiled loss and metrics of
            the recalibration pass's own outputs (the epoch's final weights, BatchNorm on
            batch statistics, dropout off; :func:`{api}.recalibrate`'s
            ``training_metrics``), next to ``val_*`` from the same weights with exact
            statistics, at no extra pass. Needs ``(x, y)`` data.

    Adds ``precise_bn_seconds`` to the epoch logs; runs before the other callbacks whatever
    their order in the list (:func:`run_first`), so ``CSVLogger`` and ``TensorBoard`` see it.
    Side effects: the model's moving statistics, which is the point; training continues from them.
    The passes leave Python's and NumPy's global random states as they were, so a
    ``PyDataset`` or ``Sequence`` that augments with ``np.random`` draws what it would without them.
    """

    #: set by each Keras version's subclass
    _adapter: Any = None
    _callback_base: Any = None
    _evalgap_runs_first = True

    @staticmethod
    def _is_array_structure(data: Any) -> bool:
        return False

    def __init__(
        self, data: Any, *, max_samples: int | None = None, every: int = 1, verbose: int = 1, batch_size: int | None = None,
        shuffle: bool = True, seed: int = 0, training_metrics: bool = False,
    ):
        super().__init__()
        engine.check_schedule(every, max_samples, batch_size=batch_size)
        engine.check_reiterable(data, "PreciseBN")
        if max_samples is None and repeats_forever(data):
            raise DataError("PreciseBN: the data repeat forever (e.g. a tf.data.Dataset with .repeat()): pass max_samples=.")
        if reshuffles_each_iteration(data):
            logger.warning(reshuffle_warning("PreciseBN"))
        self.data, self.max_samples, self.every, self.verbose = data, max_samples, int(every), verbose
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        if training_metrics and self._is_array_structure(data) and not isinstance(data, (tuple, list)):
            raise DataError("PreciseBN(training_metrics=True) scores against targets: pass (x, y), not x alone.")
        self.training_metrics = training_metrics
        self.last = None
        self._epoch: int | None = None
        self._done_this_epoch = False
        self._seconds = 0.0
        self._stale = False
        self._fingerprint: str | None = None  # of the trainable weights at the last run, with an EMA optimizer
        self._warned = False

    # ---- fit hooks ----------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        run_first(self, model, self._callback_base.set_model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._done_this_epoch = False
        self._seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self._stale = True

    def on_test_begin(self, logs=None):
        if self._epoch is not None and self._due():  # validation inside fit
            self._run()

    def on_epoch_end(self, epoch, logs=None):
        if self._due():
            self._run()
        if logs is not None:
            logs["precise_bn_seconds"] = self._seconds
            if self._done_this_epoch and self.last.training_metrics:  # None unless training_metrics=True
                logs.update({f"train_mode_{k}": v for k, v in self.last.training_metrics.items()})
        self._epoch = None

    def on_train_end(self, logs=None):
        # fit has swapped an EMA optimizer's weights in by now (finalize_variable_values comes before on_train_end)
        if self._stale or (self._fingerprint is not None and self._fingerprint != _fingerprint(self.model.trainable_weights)):
            self._run()
        self._epoch = None

    # ---- work ---------------------------------------------------------------------
    def _due(self) -> bool:
        return not self._done_this_epoch and (self._epoch + 1) % self.every == 0

    def _run(self) -> None:
        t = time.perf_counter()
        source = self._adapter.batches(self.data, batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed)
        if self.max_samples is not None:
            source = source.take(self.max_samples)
        with random_states_kept():
            self.last = engine.recalibrate(self._adapter, self.model, source, progress=False, training_metrics=self.training_metrics)
        # an EMA optimizer's weights are swapped in at the end of fit: remember these (a host copy, EMA only)
        self._fingerprint = _fingerprint(self.model.trainable_weights) if getattr(self.model.optimizer, "use_ema", False) else None
        if self.batch_size is None and self._is_array_structure(self.data) and not self._warned:
            logger.warning("PreciseBN: array data without batch_size, so batches of 32 (Keras's default); "
                           "pass PreciseBN(..., batch_size=<fit's batch_size>) to match training.")
            self._warned = True
        self._seconds += time.perf_counter() - t
        self._done_this_epoch = True
        self._stale = False
        if self.verbose:
            where = "end of training" if self._epoch is None else f"epoch {self._epoch + 1}"
            print(f"PreciseBN ({where}): {self.last.summary()}")


class GapMonitorLogic:
    """After every ``every``-th epoch, measure E, P and Td (and T) on a fixed probe subset.

    Adds to the epoch logs (so History, CSVLogger and TensorBoard carry them, whatever the order
    of the callbacks list: :func:`run_first`):

    - ``gap_bn_stale``: P - E of the primary metric on the probe of training data: what stale
      moving statistics cost an evaluation of these samples (validation, when it is the same data);
    - ``gap_batch_stats``: Td - P: batch statistics vs population statistics;
    - ``precise_val_<metric>``: each compiled metric in evaluation mode with exact statistics, on the
      probe (what validation of these samples would report after PreciseBN).

    Prints one plain sentence when the validation numbers are distorted by BatchNorm
    statistics. The EMA arithmetic in :attr:`last` (the latest :class:`evalgap.Report`) uses real
    step counts: each training step is a BatchNorm update, and the optimizer's ``iterations``
    counts those of earlier fits too (a resumed ``fit(..., initial_epoch=...)``). The model is
    never changed, and Python's and NumPy's global random states are left as they were.

    Args:
        data: training data with targets, as :func:`{api}.diagnose` takes it; re-iterable (not
            a generator: the probe drawn from the one fit trains on would take fit's batches).
        max_samples: size of the probe subset (whole batches, drawn at random from arrays;
            at least one batch).
        every: measure after every ``every``-th epoch.
        batch_size: the training batch size, for array data.
        verbose: 1 prints the sentence when the gap is significant; 0 is silent.
        primary: the metric of ``gap_*`` (default: accuracy-like, else the first compiled
            metric, else the loss).
        shuffle, seed: how array data are drawn into batches.
    """

    _adapter: Any = None
    _callback_base: Any = None
    _evalgap_runs_first = True

    def __init__(
        self, data: Any, *, max_samples: int = 256, every: int = 1, batch_size: int | None = None, verbose: int = 1,
        primary: str | None = None, shuffle: bool = True, seed: int = 0,
    ):
        super().__init__()
        engine.check_reiterable(data, "GapMonitor", "draws its probe from the data during fit (from the generator fit trains on, it would take fit's batches)")
        self.data, self.batching = data, {"batch_size": batch_size, "shuffle": shuffle, "seed": seed}
        if reshuffles_each_iteration(data):
            logger.warning(reshuffle_warning("GapMonitor"))
        self.core = engine.GapProbe(max_samples=max_samples, every=every, verbose=verbose, primary=primary, fix=self._adapter.remedies.monitor_fix(),
                                    batch_size=batch_size)

    @property
    def updates(self) -> int:
        return self.core.updates

    @property
    def last(self):
        return self.core.last

    def set_model(self, model):
        super().set_model(model)
        run_first(self, model, self._callback_base.set_model)

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        # one call per execution: with steps_per_execution=k, ``batch`` is the last of its k steps, each a BN update
        last = getattr(self, "_last_batch", -1)
        self.core.step(batch - last if isinstance(batch, int) and batch > last else 1)
        self._last_batch = batch if isinstance(batch, int) else last + 1

    def on_epoch_end(self, epoch, logs=None):
        if not self.core.due(epoch):
            return
        source = lambda: self._adapter.batches(self.data, targets=True, **self.batching)  # noqa: E731
        with random_states_kept():
            epoch_logs = self.core.measure(self._adapter, self.model, source, epoch, steps_per_epoch=(self.params or {}).get("steps"),
                                           updates=_steps_taken(self.model))
        if logs is not None:
            logs.update(epoch_logs)


def doc(logic: type, api: str) -> str:
    """The logic class's docstring for one Keras version's public class."""
    return (logic.__doc__ or "").replace("{api}", api)
