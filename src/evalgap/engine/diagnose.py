"""The framework-free lifecycle of a diagnosis: the probe, the modes, the decomposition, the report.

Passes over the same probe batches, at fixed weights (see :mod:`evalgap.attribution`):

1. E: evaluation mode, current moving statistics (the model's own ``evaluate``);
2. Td: the moments pass of :func:`evalgap.engine.recalibrate.measure` (BN on batch
   statistics, dropout off), which also gives the exact population statistics;
3. P: evaluation mode with the population statistics (a side copy or a stateless call);
4. T, full training mode (frozen BN stays frozen): only with training-only layers, or when
   training mode changes the first batch's outputs beyond BN (functional dropout; checked unless
   the adapter knows no layer depends on the mode, ``ModelFacts.mode_dependent == []``); else T = Td;
   only with frozen BN layers: P with those recalibrated too (their effect);
   only with ``val_data``: E on the validation data.

Metrics are the adapter's (the model's compiled ones, the user's), one fresh state per mode; its
optional ``higher_is_better`` (name -> bool, where the framework states a direction) wins over the
name rule, and its optional ``left_out`` (name -> reason and fix) answers a ``primary=`` it left out.
The model is left exactly as it was: the adapter's passes and predictors change nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .._checks import check_size
from .._progress import progress_bar
from ..attribution import choose_primary, decompose
from ..diagnosis import Context, InputScale, build_report, label_mix
from ..errors import DataError, EvalgapError, RecalibrationError
from ..report import Report
from .batching import Cursor, ListBatches, materialize, peek, tree_leaves, without_singleton_batch
from .protocol import Adapter, Batch, BatchSource, Metrics, NormLayer
from .recalibrate import assemble, measure, set_up_together, unrepresentable


@dataclass
class Training:
    """What the user knows about training: fit's last-epoch metrics (F) and the step counts."""

    fit: Mapping[str, float] | float | None = None
    steps_per_epoch: int | None = None
    epochs: int | None = None
    bn_updates: int | None = None
    of_history: bool = False  # fit holds every number of a Keras History (learning_rate too), not metrics the user picked

    def unused_fit(self, names: list[str]) -> list[str]:
        """Notes on the keys of ``fit`` that name no measured metric (F needs the same names). A dict the user
        gave whose keys name none of them is a :class:`DataError`: F would silently be unknown."""
        fit = self.fit
        if not isinstance(fit, Mapping) or not fit:
            return []
        unused = [str(k) for k in fit if k not in names]
        if not unused:
            return []
        measured = ", ".join(names)
        if self.of_history:  # a History holds more than metrics (learning_rate): only say so when nothing matched
            return [] if len(unused) < len(fit) else [f"F not known: the history's {', '.join(unused)} name none of the measured metrics ({measured})."]
        if len(unused) == len(fit):
            example = ", ".join(f"{n!r}: ..." for n in names[:2])
            raise DataError(
                f"fit_metric names {', '.join(map(repr, unused))}, none of which diagnose measures ({measured}): give the "
                f"training loop's last-epoch values under these names ({{{example}}}), or one number for the primary metric."
            )
        return [f"fit_metric: {', '.join(unused)} not used (diagnose measures {measured})."]

    @classmethod
    def from_history(cls, history: Any) -> "Training":
        """From a Keras ``History`` (or its ``.history`` dict): F (the last epoch's averaged training
        metrics, ``val_*`` left out), the steps per epoch and the number of epochs trained."""
        if history is None:
            return cls()
        hist = getattr(history, "history", history)
        if not isinstance(hist, Mapping):
            raise DataError(
                f"history must be what model.fit returns (a History) or its .history dict of per-epoch lists, got "
                f"{type(hist).__name__}: pass history=model.fit(...) itself."
            )
        params = getattr(history, "params", None) or {}
        last = {
            k: float(v[-1]) for k, v in hist.items()
            if not k.startswith("val_") and len(v) and isinstance(v[-1], (int, float, np.floating)) and np.ndim(v[-1]) == 0
        }
        epochs = len(next(iter(hist.values()))) if hist else None
        return cls(fit=last, steps_per_epoch=params.get("steps"), epochs=epochs, of_history=True)


@dataclass
class _Run:
    adapter: Adapter
    model: Any
    probe: Any
    layers: list[NormLayer]
    progress: bool
    metric_options: dict = field(default_factory=dict)
    metrics: Metrics | None = None
    by_mode: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    first: dict[str, tuple[Batch, Any]] = field(default_factory=dict)  # a mode's first batch and its outputs

    def score(self, mode: str, layers=(), stats=(), batches: Any = None, keep_first: bool = False,
              data: str = "the data") -> dict[str, float]:
        """Loss and metrics of the batches (the probe by default; ``data`` names them in errors) with the adapter's
        predictor; ``keep_first``: the first batch and its outputs are kept in ``first[mode]``.

        A framework error in the pass (a shape the model cannot take, a loss that does not
        return a scalar) becomes a :class:`evalgap.RecalibrationError` naming the mode and
        the batch; the predictor has put the model back by then.
        """
        batches = self.probe if batches is None else batches
        what = {"E": "evaluation mode", "P": "population statistics", "T": "training mode"}[mode]
        cursor = Cursor()
        try:
            with self.adapter.predictor(self.model, mode, layers, stats) as predict, \
                    progress_bar(f"diagnosing: {what}", getattr(batches, "total", None), self.progress) as advance:
                state = None
                for batch in cursor.over(iter(batches)):
                    advance(1)
                    outputs = predict(batch)
                    if keep_first and mode not in self.first:
                        self.first[mode] = (batch, outputs)
                    if self.metrics is None:
                        self.metrics = self.adapter.metrics(self.model, batch, outputs, **self.metric_options)
                    if state is None:
                        state = self.metrics.new()
                    state.update(batch, outputs)
                if state is None:
                    raise DataError("the data yielded no batch: pass the training data with targets.")
                return state.result()
        except Exception as exc:
            if isinstance(exc, EvalgapError):
                raise
            where = cursor.where("at the start of the pass", data)
            over = "" if data == "the data" else f" over {data}"
            hint = getattr(self.adapter, "hint", lambda e: None)(exc)
            raise RecalibrationError(
                f"diagnose's {what} pass{over} failed {where} ({type(exc).__name__}: {exc}); the model was restored exactly as "
                "it was." + (" " + hint if hint else "") + " Check that the data fit the model and that loss_fn/metrics "
                "return one number per batch or one per sample."
            ) from exc


def diagnose(
    adapter: Adapter,
    model: Any,
    source: BatchSource,
    *,
    max_samples: int | None = None,
    val_source: BatchSource | None = None,
    training: Training | None = None,
    primary: str | None = None,
    progress: bool = True,
    metric_options: dict | None = None,
) -> Report:
    """Measure every mode on the same batches of ``source`` and explain the gap (module docstring)."""
    start = time.perf_counter()
    training = training or Training()
    if check_size("max_samples", max_samples) is not None:
        source = source.take(max_samples)
    elif getattr(source, "infinite", False):
        raise DataError("the data repeat forever (e.g. a tf.data.Dataset with .repeat()): pass max_samples= to say how much to probe.")

    def set_up() -> tuple[Any, list, Any, Batch]:
        first, batches = peek(materialize(source))
        if first is None:
            raise DataError("the data yielded no batch: pass the training data with targets, e.g. (x, y).")
        prepared = adapter.prepare(model, first)
        if first.targets is None and getattr(adapter, "needs_targets", lambda model, batch: True)(prepared, first):
            raise DataError("diagnose needs targets to measure the loss and metrics: pass (x, y), not x alone." + _dict_hint(adapter, first))
        found = adapter.layers(prepared)
        if not adapter.one_sample_batches:
            batches = without_singleton_batch(batches, lambda batch: adapter.refuses_one_sample(prepared, found, batch))
        return prepared, found, batches, first

    (model, layers, probe, first), collective = set_up_together(adapter, model, set_up)
    run = _Run(adapter, model, probe, layers, progress and (collective is None or collective.rank == 0),
               metric_options=dict(metric_options or {}))
    try:
        return _measure_and_explain(run, collective, probe, first, training, primary, max_samples, val_source, start)
    finally:
        close = getattr(run.metrics, "close", None)
        if close is not None:
            close()


def _dict_hint(adapter: Adapter, batch: Batch) -> str:
    keys = getattr(adapter, "target_keys", ())
    if not isinstance(batch.raw, Mapping) or not keys:
        return ""
    return (f" The batches are dicts with the keys {', '.join(map(repr, batch.raw))}, and the targets are read from the key "
            f"{', '.join(map(repr, keys[:-1]))} or {keys[-1]!r}: rename yours, or give the batches as (x, y).")


def _measure_and_explain(run: "_Run", collective, probe, first: Batch, training: Training, primary, max_samples, val_source,
                         start) -> Report:
    adapter, model = run.adapter, run.model
    facts = adapter.facts(model, first)  # the first batch: what the model's first layer receives
    check = not facts.training_only and facts.mode_dependent != []  # does training mode do more than BN? not known
    run.by_mode["E"] = run.score("E", keep_first=check)
    choose_primary(list(run.by_mode["E"]), run.metrics.given, primary, left_out=_left_out(run))  # a wrong primary= fails now
    run.notes.extend(training.unused_fit(list(run.by_mode["E"])))
    measured = _batch_statistic_modes(run, collective, keep_first=check)
    trains_differently = bool(facts.training_only) or check and _training_mode_differs(run, collective)
    run.by_mode["T"] = run.score("T") if trains_differently else run.by_mode["Td"]
    frozen_effect = _frozen_effect(run, measured, collective)
    if val_source is not None:
        val = val_source.take(max_samples) if max_samples is not None else val_source

        def val_set_up() -> BatchSource:  # agreed, as the probe's: a process whose val_data are empty stops them all
            first_val, batches = peek(val)
            if first_val is None:
                raise DataError("val_data yielded no batch: pass the validation data with targets, e.g. (x_val, y_val).")
            return batches

        val, _ = set_up_together(adapter, model, val_set_up)
        run.by_mode["E_val"] = run.score("E", batches=val, data="val_data")
    decompositions = _decompositions(run, training.fit, primary)
    recal = None if measured is None else assemble(measured, written=False)
    ctx = _context(run, recal, facts, training, frozen_effect, probe)
    report = build_report(decompositions, recal, ctx, primary=choose_primary(list(decompositions), run.metrics.given, primary, left_out=_left_out(run)))
    report.seconds = time.perf_counter() - start
    return report


def _batch_statistic_modes(run: _Run, collective, keep_first: bool = False):
    """Td (and the population statistics), then P. Without moving statistics Td = P = E."""
    if not any(layer.tracks_statistics for layer in run.layers):
        run.by_mode["Td"] = run.by_mode["P"] = run.by_mode["E"]
        if run.layers:
            run.notes.append(
                "every BatchNorm layer normalizes with batch statistics in both modes (no moving statistics, e.g. "
                "track_running_stats=False): they cannot cause a train/eval gap, so Td = P = E."
            )
        return None
    state = run.metrics.new()

    def on_output(batch: Batch, outputs: Any) -> None:
        if keep_first:
            run.first.setdefault("Td", (batch, outputs))
        state.update(batch, outputs)

    measured = measure(
        run.adapter, run.model, run.probe, run.layers, on_output=on_output, collective=collective,
        progress=run.progress, description="diagnosing: batch statistics",
    )
    run.by_mode["Td"] = state.result()
    population = measured.population()
    too_large = unrepresentable(*population)
    if too_large:
        run.notes.append(f"population statistics that the layers' dtype cannot hold ({', '.join(too_large[:3])}): P runs with "
                         "them as that dtype stores them (inf), and recalibrate refuses to write them; keep BatchNorm in "
                         "float32 (mixed precision does) or scale the inputs down.")
    run.by_mode["P"] = run.score("P", *population)
    return measured


def _training_mode_differs(run: _Run, collective) -> bool:
    """Whether training mode changes the outputs beyond BatchNorm's batch statistics, in code no layer
    class names (``F.dropout(x, training=self.training)``, a branch on the training flag): T and Td
    on the first batch, compared (relative 1e-3). One forward; every process takes the same answer."""
    batch, expected = run.first.get("Td") or run.first["E"]  # without moving statistics Td = E
    run.score("T", batches=ListBatches([batch], batch_size=batch.size, size_note=None, order="the first batch"), keep_first=True)
    got, want = (run.adapter.to_host(tree_leaves(out)) for out in (run.first.pop("T")[1], expected))
    run.first.clear()  # the outputs kept for this check are not needed again
    differs = len(got) != len(want) or not all(_close(a, b) for a, b in zip(got, want))
    if collective is not None:
        differs = bool(np.asarray(collective.sum(np.array([float(differs)])))[0] > 0)
    if differs:
        run.notes.append("training mode changes the outputs beyond BatchNorm (code that depends on the training flag, "
                         "e.g. F.dropout(x, training=self.training)): T measured in training mode.")
    return differs


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if not (np.issubdtype(b.dtype, np.number) or b.dtype == bool):
        return True  # strings, objects: not outputs a mode changes
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0)) or 1.0
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-3 * scale, equal_nan=True))


def _frozen_effect(run: _Run, measured, collective) -> dict[str, float]:
    """How P would change with ``recalibrate(..., include_frozen=True)``: a moments pass with the frozen
    layers on batch statistics too (what that call measures), then P with all of its statistics."""
    if measured is None or all(measured.batch_statistics):
        return {}
    again = measure(run.adapter, run.model, run.probe, run.layers, include_frozen=True, collective=collective,
                    progress=run.progress, description="diagnosing: frozen layers included")
    pf = run.score("P", *again.population(include_frozen=True))
    return {k: pf[k] - run.by_mode["P"][k] for k in pf}


def _left_out(run: _Run) -> Mapping[str, str]:
    """Metrics the adapter could not measure as one number, with the reason and the fix (optional ``Metrics.left_out``)."""
    return getattr(run.metrics, "left_out", None) or {}


def _decompositions(run: _Run, fit: Mapping[str, float] | float | None, primary: str | None) -> dict:
    names = list(run.by_mode["E"])
    if fit is not None and not isinstance(fit, Mapping):  # one number: fit's value of the primary metric
        fit = {choose_primary(names, run.metrics.given, primary, left_out=_left_out(run)): float(fit)}
    directions = getattr(run.metrics, "higher_is_better", None) or {}  # where the framework states it; else the name says
    out = {}
    for name in names:
        values = {mode: run.by_mode[mode][name] for mode in run.by_mode}
        if fit and name in fit:
            values["F"] = float(fit[name])
        out[name] = decompose(name, values, higher_is_better=directions.get(name))
    return out


def _input_sample(adapter: Adapter, batches, limit: int = 2048, axis: int | None = None) -> tuple[np.ndarray, int] | None:
    """Up to ``limit`` samples of what reaches the model's first layer, as ``(values, channels)`` rows
    (every position of every sample one row), and the channel axis of the input (``axis`` where the
    model says it, else the adapter's). Batches may differ in every other dimension (sequences padded
    per batch); None when the input is not an array or its number of channels changes between batches."""
    rows, seen, where = [], 0, axis
    for batch in batches:
        found = adapter.input_array(batch.inputs)
        if found is None:
            return None
        x, axis = found[0], found[1] if where is None or found[0].ndim < 2 else where
        flat = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]) if x.ndim > 1 else x.reshape(-1, 1)
        if rows and flat.shape[1] != rows[0].shape[1]:
            return None
        rows.append(flat)
        seen += len(x) if x.ndim else 1
        if seen >= limit:
            break
    return (np.concatenate(rows), axis) if rows else None


def _context(run: _Run, recal, facts, training: Training, frozen_effect, probe) -> Context:
    adapter = run.adapter
    sample = None if facts.input_transforms else _input_sample(adapter, probe, axis=facts.input_channel_axis)
    tracked = [layer for layer in run.layers if layer.tracks_statistics]
    notes = [] if recal is None else [n for n in recal.notes]
    notes += run.notes + list(run.metrics.notes) + list(facts.notes)
    if facts.input_transforms:
        notes.append(f"input scale not judged: the model transforms its inputs itself ({', '.join(facts.input_transforms[:3])}).")
    size_note = f"batch size {probe.batch_size} ({probe.size_note})" if probe.size_note else None
    notes += [n for n in (size_note, f"probe: {probe.order}") if n]
    if getattr(probe, "left_out", 0):
        notes.append("left out the last sample from every mode: the model refuses a batch of one sample in training "
                     "mode (BatchNorm needs more than one value per channel), or it was not tried (a lazy BatchNorm "
                     "not materialized yet).")
    sizes = [b.size or 0 for b in probe]
    mix = label_mix(probe, adapter.to_host)
    info = {"order": probe.order, "batches": len(sizes), "samples": sum(sizes), "batch_size": probe.batch_size}
    if mix is not None:
        info.update(classes=mix.classes, classes_per_batch=mix.per_batch, classes_per_shuffled_batch=mix.shuffled)
    return Context(
        framework=adapter.framework(run.model),
        remedies=adapter.remedies,
        convention=adapter.convention,
        samples=recal.samples + recal.skipped_samples if recal is not None else sum(sizes),
        batch_size=(probe.batch_size or 0) * facts.replicas if facts.per_process_batches else probe.batch_size,
        input_scale=None if sample is None else InputScale.measure(sample[0], -1, axis=sample[1]),
        momenta=[layer.momentum for layer in tracked if not layer.frozen],  # frozen layers never update
        steps_per_epoch=training.steps_per_epoch,
        epochs=training.epochs,
        bn_updates=training.bn_updates,
        training_only_layers=facts.training_only,
        mode_dependent_layers=[name for name in facts.mode_dependent or [] if name not in facts.training_only],
        other_normalization=facts.other_normalization,
        running_instance_norm=facts.running_instance_norm,
        replicas=facts.replicas,
        synchronized=facts.synchronized,
        frozen_effect=frozen_effect,
        label_mix=mix,
        probe=info,
        notes=notes,
    )
