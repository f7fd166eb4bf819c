"""The framework-free lifecycle of a recalibration: pass, merge, combine, write or roll back.

:func:`measure` runs one moments pass over whole batches: each BatchNorm layer normalizes
by its batch statistics (as in training) and everything else runs in inference mode
(dropout off); frozen layers run as in training (inference mode) and only have their
input's moments measured. Per layer the population statistics are

    mean = sum_b n_b mu_b / N,     var = sum_b n_b (var_b + (mu_b - mean)^2) / N

in float64, combined exactly across processes. :func:`recalibrate` then writes them,
all or nothing. Side effects: the written layers' moving mean and variance, nothing else;
the adapter's moments pass leaves the model as it was, and a failed write is rolled back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .._checks import check_finite, check_size
from .._progress import progress_bar
from ..errors import DataError, DistributedError, EvalgapError, ModelError, RecalibrationError
from ..recalibration import LayerRecalibration, Recalibration
from .batching import Cursor, peek
from .moments import FLUSH_EVERY, LayerMoments
from .protocol import Adapter, Batch, BatchSource, Collective, NormLayer

logger = logging.getLogger("evalgap")

OnOutput = Callable[[Batch, Any], None]


@dataclass
class Measured:
    """A moments pass's result, before anything is written.

    ``layers`` are the layers with moving statistics, ``batch_statistics[i]`` says whether
    layer i normalized by batch statistics in the pass (else it is frozen and only
    observed), ``before`` their moving statistics before the pass.
    """

    result: Recalibration
    layers: list[NormLayer]
    batch_statistics: list[bool]
    before: list[tuple[np.ndarray, np.ndarray] | None]
    moments: LayerMoments
    static: list[NormLayer]

    def population(self, include_frozen: bool = False) -> tuple[list[NormLayer], list[tuple[np.ndarray, np.ndarray]]]:
        """The layers that got data (recalibrated ones; frozen too if asked) and their (mean, var)."""
        chosen, stats = [], []
        for layer, batch_stats, m in zip(self.layers, self.batch_statistics, self.moments.moments):
            if m is not None and (batch_stats or include_frozen):
                chosen.append(layer)
                stats.append((m.mean, m.var))
        return chosen, stats


def _no_layer_error(adapter: Adapter, model: Any, layers: list[NormLayer]) -> ModelError:
    name = getattr(model, "name", None) or type(model).__name__
    if layers:
        return ModelError(
            f"no BatchNorm layer of {name} tracks moving statistics (all use batch statistics in both modes, e.g. "
            "track_running_stats=False), so there is nothing to recalibrate."
        )
    return ModelError(
        f"{name} has no {adapter.bn_kind}: there are no moving statistics to recalibrate. LayerNorm and GroupNorm "
        "normalize each sample the same way in both modes (an InstanceNorm with track_running_stats=True does not, and "
        "evalgap does not set its running statistics: diagnose names it)."
    )


def measure(
    adapter: Adapter,
    model: Any,
    source: BatchSource,
    layers: list[NormLayer],
    *,
    include_frozen: bool = False,
    max_batches: int | None = None,
    drop_ragged: bool = True,
    on_output: OnOutput | None = None,
    collective: Collective | None = None,
    progress: bool = True,
    description: str = "recalibrating BatchNorm",
) -> Measured:
    """One moments pass over ``source``; nothing is written.

    Batches smaller than the batch size (the source's, else the first batch's) give no
    moments with ``drop_ragged`` (they are counted as skipped); with ``on_output`` they still
    run, and ``on_output(batch, outputs)`` receives every batch and the model's outputs in
    this mode (BN on batch statistics, dropout off), as the metrics of mode Td need.
    """
    max_batches = check_size("max_batches", max_batches)
    start = time.perf_counter()
    tracked = [layer for layer in layers if layer.tracks_statistics]
    static = [layer for layer in layers if not layer.tracks_statistics]
    batch_statistics = [include_frozen or not layer.frozen for layer in tracked]
    before = adapter.read(tracked)
    result = Recalibration(framework=adapter.framework(model), batch_size=source.batch_size)
    acc = LayerMoments(tracked, adapter.host_captures)
    cursor, where = Cursor(), None
    total = getattr(source, "total", None)
    total = min(total, max_batches) if total is not None and max_batches is not None else (total or max_batches)
    try:
        if collective is not None and drop_ragged:
            where = f"while agreeing on the batch size over {collective.description}, before the pass"
            source = _agree_on_batch_size(source, collective, result)
            where = None
        batches = iter(source)
        with adapter.moments_pass(model, tracked, batch_statistics) as run, progress_bar(description, total, progress) as advance:
            try:
                for batch in cursor.over(batches):
                    if max_batches is not None and cursor.index >= max_batches:
                        break
                    _run_batch(run, batch, result, acc, drop_ragged, on_output, adapter.one_sample_batches)
                    if result.batches % FLUSH_EVERY == 0:
                        acc.flush()
                    advance(1)
            finally:
                getattr(batches, "close", lambda: None)()  # a data loader puts its RNG state back now
            acc.flush()
        if collective is not None:
            where = f"while combining the statistics over {collective.description}, after its {cursor.index + 1} batches"
            _combine(acc, collective, result, tracked, before)
        check_finite([(tracked[i].name, acc.moments[i]) for i in acc.order()])
    except BaseException as exc:  # the pass restored the model; nothing was written
        if isinstance(exc, EvalgapError) or not isinstance(exc, Exception):
            raise
        raise RecalibrationError(_explain(adapter, exc, where or cursor.where("while setting up the pass"))) from exc
    if result.batches == 0:
        skipped = f" of full size (left out {result.skipped_samples} samples of ragged batches)" if result.skipped_batches else ""
        raise DataError(f"the data yielded no batch{skipped}: no full batch to use; give at least one batch of the training batch size.")
    result.seconds = time.perf_counter() - start
    return Measured(result, tracked, batch_statistics, before, acc, static)


def set_up_together(adapter: Adapter, model: Any, set_up: Callable[[], Any]) -> tuple[Any, Collective | None]:
    """``set_up()`` (check the data, prepare and inspect the model) and the adapter's collective; with several
    processes, one sum then says which of them failed: a process whose set-up failed raises its own error, every
    other one a :class:`DistributedError` naming it, before any pass and with nothing changed. Without it a process
    that stopped early (its shard yielded no batch) left the others waiting in the first collective until the
    group's timeout. Collective: every process calls it."""
    failure: Exception | None = None
    value = None
    try:
        value = set_up()
    except Exception as exc:
        failure = exc
    collective = adapter.collective(model)
    if collective is not None:
        flags = np.zeros(collective.world, dtype=np.float64)
        flags[collective.rank] = failure is not None
        failed = np.flatnonzero(np.asarray(collective.sum(flags)) > 0)
        if failure is None and failed.size:
            which = f"process{'es' if failed.size > 1 else ''} {', '.join(map(str, failed))} of {collective.world}"
            raise DistributedError(
                f"{which} stopped before the pass with an error of its own (e.g. its data "
                "yielded no batch), so no process measured or wrote anything: fix what that process's error names and "
                "call again on every process."
            )
    if failure is not None:
        raise failure
    return value, collective


def _agree_on_batch_size(source: BatchSource, collective: Collective, result: Recalibration) -> BatchSource:
    """Whole batches are those of the largest batch size over the processes (each process's: its source's, else
    its first batch's; one sum of a one-hot vector): a process whose shard is one short batch leaves it out as
    every other process leaves out its short last batch. Collective: every process calls it."""
    first, source = peek(source)
    mine = int(source.batch_size or (first.size if first is not None and first.size else 0) or 0)
    slots = np.zeros(collective.world, dtype=np.float64)
    slots[collective.rank] = mine
    agreed = int(np.max(collective.sum(slots)))
    if agreed > 0:
        result.batch_size = agreed
    if 0 < mine < agreed:
        result.notes.append(f"batch size {agreed}, another process's: this process's batches of fewer samples (its first "
                            f"holds {mine}) are left out as ragged, as every process leaves out its short batches.")
    return source


def _run_batch(run, batch: Batch, result: Recalibration, acc: LayerMoments, drop_ragged: bool, on_output: OnOutput | None,
               one_sample_batches: bool = True) -> None:
    n = batch.size
    if result.batch_size is None:
        result.batch_size = n
    ragged = drop_ragged and n is not None and bool(result.batch_size) and n < result.batch_size
    if ragged:
        result.skipped_batches += 1
        result.skipped_samples += n or 0
        if on_output is None:
            return
    try:
        captures, outputs = run(batch)
    except ValueError as exc:  # PyTorch's BatchNorm refuses one value per channel (an (N, C) batch of one sample)
        if not (ragged and n == 1 and not one_sample_batches) or isinstance(exc, EvalgapError):
            raise
        result.notes.append(f"training_metrics: left out the last batch, of one sample, which the model refuses in "
                            f"training mode ({exc}).")
        return
    if not ragged:
        acc.add(captures, n or 0)
        result.batches += 1
        result.samples += n or 0
    if on_output is not None:
        on_output(batch, outputs)


def _combine(acc: LayerMoments, collective: Collective, result: Recalibration, layers: list[NormLayer], before) -> None:
    channels = [
        m.channels if m is not None else (b[0].shape[0] if b is not None else layer.channels)
        for layer, m, b in zip(layers, acc.moments, before)
    ]
    counts = [result.batches, result.samples, result.skipped_batches, result.skipped_samples]
    result.batches, result.samples, result.skipped_batches, result.skipped_samples = acc.combine(collective, channels, counts)
    result.notes.append(f"statistics combined exactly over {collective.description}.")


def _explain(adapter: Adapter, exc: Exception, where: str) -> str:
    msg = f"the statistics pass failed {where} ({type(exc).__name__}: {exc}); the model was restored exactly as it was."
    hint = getattr(adapter, "hint", None)
    extra = hint(exc) if hint is not None else None
    return msg + (" " + extra if extra else "")


def assemble(measured: Measured, *, written: bool) -> Recalibration:
    """Fill the result per layer, in forward order (then unreached, then layers without statistics)."""
    result, acc = measured.result, measured.moments
    entries = []
    for i in acc.order():
        layer, m, before = measured.layers[i], acc.moments[i], measured.before[i]
        if m is None:
            status = "unreached"
        elif not measured.batch_statistics[i]:
            status = "frozen"
        else:
            status = "recalibrated" if written else "measured"
        entries.append(
            LayerRecalibration(
                name=layer.name, kind=layer.kind, status=status,
                channels=m.channels if m is not None else (before[0].shape[0] if before is not None else layer.channels),
                eps=layer.eps, count=0 if m is None else m.count, samples=acc.samples[i], calls=acc.calls[i],
                calls_per_batch=acc.calls_per_batch[i],
                mean_before=None if before is None else before[0], var_before=None if before is None else before[1],
                mean_after=None if m is None else m.mean, var_after=None if m is None else m.var,
            )
        )
    for layer in measured.static:
        entries.append(LayerRecalibration(layer.name, layer.kind, "no-running-stats", layer.channels, layer.eps))
    result.layers = entries
    return result


def unrepresentable(layers: Sequence[NormLayer], stats: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """The layers whose population mean or variance exceeds the largest finite value of their moving statistics'
    dtype (float16: 65504), each as ``"<name> (<value> > <largest> of float16)"``: written, they would be inf."""
    found = []
    for layer, (mean, var) in zip(layers, stats):
        if layer.dtype is None:
            continue
        try:
            largest = float(np.finfo(np.dtype(layer.dtype)).max)
        except TypeError:  # a dtype NumPy does not know by name (bfloat16: range of float32)
            continue
        worst = max(float(np.max(np.abs(mean), initial=0.0)), float(np.max(var, initial=0.0)))
        if worst > largest:
            found.append(f"{layer.name} ({worst:.4g} > {largest:.6g} of {layer.dtype})")
    return found


def write(adapter: Adapter, measured: Measured) -> None:
    """Write the population statistics of the recalibrated layers; on any failure, write the old ones back. Statistics
    that the layers' dtype cannot hold (:func:`unrepresentable`) are a DataError, before anything is written."""
    layers, stats = measured.population()
    if not layers:
        return
    too_large = unrepresentable(layers, stats)
    if too_large:
        raise DataError(
            f"the population statistics of {len(too_large)} BatchNorm layer(s) exceed what their moving statistics' dtype "
            f"holds: {', '.join(too_large[:3])}{' ...' if len(too_large) > 3 else ''}. Written, they would be inf and the "
            "layers' outputs constant, so nothing was written. Keep BatchNorm in float32 (mixed precision does: "
            "torch.autocast or Keras's 'mixed_float16' policy, instead of model.half() or the 'float16' policy), or give "
            "the model inputs of a smaller scale."
        )
    before = {id(layer): b for layer, b in zip(measured.layers, measured.before)}
    try:
        adapter.write(layers, stats)
    except BaseException:
        restore = [(layer, before[id(layer)]) for layer in layers if before[id(layer)] is not None]
        adapter.write([layer for layer, _ in restore], [b for _, b in restore])
        raise


def recalibrate(
    adapter: Adapter,
    model: Any,
    source: BatchSource,
    *,
    max_batches: int | None = None,
    include_frozen: bool = False,
    progress: bool = True,
    drop_ragged: bool = True,
    training_metrics: bool = False,
    metric_options: Mapping[str, Any] | None = None,
) -> Recalibration:
    """Measure and write exact population statistics (see the module docstring).

    ``training_metrics``: also score the pass's own outputs with the adapter's metrics (the
    model's loss and metrics; ``metric_options`` go to ``adapter.metrics``, e.g. PyTorch's
    ``loss_fn`` and ``metrics``): BatchNorm on batch statistics, dropout off, at the current
    weights, over every batch of the pass (ragged ones too), in ``result.training_metrics``.
    That is the training-mode side of the gap at fixed weights (diagnose's Td; T for a model
    without dropout), at no extra pass. Needs targets in the data. Across processes the
    moments are combined and the metrics reduced over the processes (the adapter's metrics
    reduce them: PyTorch, Flax, Keras's workers).
    """
    start = time.perf_counter()
    max_batches = check_size("max_batches", max_batches)
    if metric_options and not training_metrics:
        raise DataError(f"{', '.join(sorted(metric_options))} score the pass's outputs: pass training_metrics=True as well.")
    if max_batches is None and getattr(source, "infinite", False):
        raise DataError("the data repeat forever (e.g. a tf.data.Dataset with .repeat()): pass max_batches= (max_samples= for a callback).")

    def set_up() -> tuple[Any, list[NormLayer], BatchSource]:
        first, batches = peek(source)
        if first is None:
            raise DataError("the data yielded no batch: give at least one batch of the training batch size.")
        if training_metrics and first.targets is None:
            raise DataError("training_metrics=True scores the pass's outputs against targets: pass (x, y), not x alone.")
        prepared = adapter.prepare(model, first)
        found = adapter.layers(prepared)
        if not any(layer.tracks_statistics for layer in found):
            raise _no_layer_error(adapter, prepared, found)
        return prepared, found, batches

    (model, layers, source), collective = set_up_together(adapter, model, set_up)
    score = _Score(adapter, model, metric_options or {}) if training_metrics else None
    try:
        measured = measure(
            adapter, model, source, layers, include_frozen=include_frozen, max_batches=max_batches, drop_ragged=drop_ragged,
            collective=collective, progress=progress and (collective is None or collective.rank == 0),
            on_output=None if score is None else score.update,
        )
        if score is not None:
            score.finish()
    finally:
        if score is not None:
            score.close()
    write(adapter, measured)
    result = assemble(measured, written=True)
    if score is not None:
        result.training_metrics = score.value
        result.notes.extend(score.notes())
    add_batching_notes(result, source)
    result.add_layer_notes(adapter.frozen_means)
    result.seconds = time.perf_counter() - start
    if logger.isEnabledFor(logging.INFO):  # the summary's drift scan costs ~0.1 ms a layer
        logger.info(result.summary())
    return result


class _Score:
    """Loss and metrics of a pass's outputs, with the adapter's metrics (built at the first batch)."""

    def __init__(self, adapter: Adapter, model: Any, options: Mapping[str, Any]):
        self.adapter, self.model, self.options = adapter, model, options
        self.metrics: Any = None
        self.state: Any = None
        self.value: dict[str, float] | None = None

    def update(self, batch: Batch, outputs: Any) -> None:
        if self.metrics is None:
            self.metrics = self.adapter.metrics(self.model, batch, outputs, **self.options)
            self.state = self.metrics.new()
        self.state.update(batch, outputs)

    def finish(self) -> None:
        """Take the result into ``value`` (before :meth:`close`: closing puts back the state of borrowed metric objects)."""
        self.value = {k: float(v) for k, v in self.state.result().items()}

    def close(self) -> None:
        getattr(self.metrics, "close", lambda: None)()

    def notes(self) -> list[str]:
        """What the metrics had to assume (e.g. an uncompiled Keras model: cross-entropy and accuracy)."""
        return [f"training_metrics: {note}" for note in getattr(self.metrics, "notes", [])]


def add_batching_notes(result: Recalibration, source: BatchSource) -> None:
    """How the batches were drawn and, when the user did not give it, where the batch size came from."""
    result.batching = source.order
    result.batch_size_note = source.size_note
    if source.size_note:
        result.notes.append(f"batch size {result.batch_size} ({source.size_note}).")
    result.notes.append(f"batches: {source.order}.")


__all__: Sequence[str] = ["measure", "assemble", "write", "recalibrate", "Measured"]
