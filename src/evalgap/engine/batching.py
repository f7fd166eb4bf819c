"""Batches drawn the way training draws them.

Arrays (``x`` or ``(x, y[, sample_weight])``, leaves nested in dicts, lists or tuples) are
cut into batches the way ``fit(shuffle=True)`` cuts them: a permutation of the samples
(seeded, so every pass of one call, and every call with the same seed, sees the same
batches), then consecutive batches of ``batch_size``. ``shuffle=False`` keeps the given
order, for data trained in order. ``take(max_samples)`` keeps whole batches drawn at random
from all of the data. Batches the user formed (a ``tf.data.Dataset``, a ``DataLoader``, a
generator, a list) keep the user's order: that is what training saw; ``take`` keeps the
first ones.

Each source says how it drew its batches (``order``) for the report's notes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .._checks import check_size
from ..errors import DataError
from .protocol import Batch

ToBatch = Callable[[Any, Any, Any, int], Batch]


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` on every leaf of nested dicts, lists and tuples (None stays None)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        mapped = [tree_map(fn, v) for v in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else type(tree)(mapped)
    return fn(tree)


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of nested dicts, lists, tuples and dataclass instances (a model's output), in order (None left out)."""
    out: list[Any] = []

    def visit(t: Any) -> None:
        if t is None:
            return
        if isinstance(t, dict):
            for v in t.values():
                visit(v)
        elif isinstance(t, (list, tuple)) and not hasattr(t, "shape"):
            for v in t:
                visit(v)
        elif dataclasses.is_dataclass(t) and not isinstance(t, type):
            for f in dataclasses.fields(t):
                visit(getattr(t, f.name))
        else:
            out.append(t)

    visit(tree)
    return out


class ArrayBatches:
    """Batches of ``batch_size`` cut from arrays with a leading sample axis.

    ``arrays`` is ``(x, y, w)`` (``y``/``w`` may be None); every leaf is indexed with NumPy
    integer arrays (NumPy, JAX and PyTorch arrays all allow it). ``to_batch(x, y, w, n)``
    turns the slices into the adapter's :class:`Batch`. Re-iterable: every iteration
    yields the same batches.
    """

    reiterable = True

    def __init__(
        self,
        arrays: tuple[Any, Any, Any],
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        to_batch: ToBatch,
        size_note: str | None = None,
    ):
        leaves = tree_leaves(arrays)
        if not leaves:
            raise DataError("the data hold no array: pass x or (x, y) arrays.")
        lengths = {int(leaf.shape[0]) if getattr(leaf, "shape", ()) else -1 for leaf in leaves}
        if len(lengths) != 1 or -1 in lengths:
            raise DataError(
                f"every array must hold one row per sample, but their first dimensions are {sorted(lengths)}: "
                "check that x, y (and sample weights) have the same number of samples."
            )
        batch_size = check_size("batch_size", batch_size)
        if batch_size is None:
            raise DataError("batch_size is needed to cut arrays into batches: pass the training batch size, e.g. batch_size=32.")
        self.arrays = arrays
        self.samples = lengths.pop()
        if self.samples == 0:
            raise DataError("the data hold no sample (length 0).")
        self.batch_size = int(batch_size)
        self.size_note = size_note
        if self.batch_size > self.samples:  # as fit and a DataLoader do: one batch of all the samples
            clamped = f"batch_size={self.batch_size} is more than the {self.samples} samples: one batch of all of them, as training draws it"
            self.size_note = clamped if size_note is None else f"{size_note}; {clamped}"
            self.batch_size = self.samples
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.to_batch = to_batch
        self._starts = list(range(0, self.samples, self.batch_size))  # batch start positions, in order
        self._limited = False

    @property
    def order(self) -> str:
        drawn = "shuffled with seed %d" % self.seed if self.shuffle else "in the given order"
        used = len(self._starts)
        whole = self.samples // self.batch_size
        if self._limited:
            return (f"arrays cut into batches of {self.batch_size} {drawn}; {used} of {whole} whole batches drawn at "
                    f"random (seed {self.seed}) from all {self.samples} samples")
        return f"arrays cut into batches of {self.batch_size} {drawn} (as fit(shuffle={self.shuffle}) draws them)"

    @property
    def total(self) -> int:
        return len(self._starts)

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng(self.seed).permutation(self.samples)
        return np.arange(self.samples)

    def __iter__(self) -> Iterator[Batch]:
        order = self._indices()
        for start in self._starts:
            yield self._cut(order[start : start + self.batch_size])

    def _cut(self, idx: np.ndarray) -> Batch:
        if not self.shuffle:  # contiguous: a view, no copy
            x, y, w = tree_map(lambda a, s=slice(int(idx[0]), int(idx[-1]) + 1): a[s], self.arrays)
        else:
            x, y, w = tree_map(lambda a, i=idx: a[i], self.arrays)
        return self.to_batch(x, y, w, len(idx))

    def __len__(self) -> int:
        return len(self._starts)

    def take(self, max_samples: int) -> "ArrayBatches":
        """Whole batches within ``max_samples`` (at least one), drawn at random from all of the data."""
        whole = [s for s in self._starts if s + self.batch_size <= self.samples]
        k = max(1, check_size("max_samples", max_samples) // self.batch_size)
        if k >= len(whole):
            return self
        out = ArrayBatches.__new__(ArrayBatches)
        out.__dict__.update(self.__dict__)
        if self.shuffle:  # the permutation already makes consecutive batches random
            out._starts = whole[:k]
        else:  # keep the given order inside batches: pick whole batches at random positions
            pick = np.sort(np.random.default_rng(self.seed).choice(len(whole), size=k, replace=False))
            out._starts = [whole[i] for i in pick]
        out._limited = True
        return out


class StreamBatches:
    """Batches the user formed, in the user's order; ``take`` keeps the first ones."""

    def __init__(self, make_iter: Callable[[], Iterable[Any]], *, to_batch: Callable[[Any], Batch], reiterable: bool, total: int | None = None):
        self.make_iter, self.to_batch, self.reiterable = make_iter, to_batch, reiterable
        self.batch_size: int | None = None
        self.size_note: str | None = "the size of the first batch"
        self.total = total
        self.describe: str = "the data's own batches, in their order (the order training saw)"
        self.infinite = False  # the data repeat forever: a pass needs a limit
        self._max_samples: int | None = None
        self._kept = 0

    @property
    def order(self) -> str:
        if self._max_samples is not None:
            return f"the first {self._kept} batches of {self.describe} (max_samples={self._max_samples})"
        return self.describe

    def __iter__(self) -> Iterator[Batch]:
        seen = kept = 0
        for raw in self.make_iter():
            batch = self.to_batch(raw)
            if self.batch_size is None:
                self.batch_size = batch.size
            n = batch.size or 0
            if self._max_samples is not None and kept and seen + n > self._max_samples:
                break
            seen += n
            kept += 1
            self._kept = max(self._kept, kept)
            yield batch

    def take(self, max_samples: int) -> "StreamBatches":
        out = StreamBatches(self.make_iter, to_batch=self.to_batch, reiterable=self.reiterable, total=None)
        out.batch_size, out.size_note, out.describe = self.batch_size, self.size_note, self.describe
        out._max_samples = check_size("max_samples", max_samples)
        return out


class ListBatches:
    """Batches held in memory (a stream read once, for several passes)."""

    reiterable = True

    def __init__(self, batches: list[Batch], *, batch_size: int | None, size_note: str | None, order: str):
        self.batches, self.batch_size, self.size_note, self.order = batches, batch_size, size_note, order
        self.total = len(batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def take(self, max_samples: int) -> "ListBatches":
        return self


def materialize(source: Any) -> Any:
    """A source that gives the same batches on every iteration (streams are read once, into memory)."""
    from ..errors import EvalgapError, RecalibrationError

    if isinstance(source, (ArrayBatches, ListBatches)):
        return source
    batches: list[Batch] = []
    it = iter(source)
    try:
        for batch in it:
            batches.append(batch)
    except Exception as exc:
        if isinstance(exc, EvalgapError):
            raise
        raise RecalibrationError(
            f"reading batch {len(batches)} of the data failed ({type(exc).__name__}: {exc}); nothing ran, the model was "
            "restored exactly as it was."
        ) from exc
    finally:
        getattr(it, "close", lambda: None)()
    if not batches:
        raise DataError("the data yielded no batch: give at least one batch of the training batch size.")
    return ListBatches(batches, batch_size=source.batch_size or batches[0].size, size_note=source.size_note, order=source.order)


class Cursor:
    """Where a pass over batches is: ``index`` of the last batch read (-1 before the first) and
    whether the next one is being read, so an error names the batch it happened at."""

    def __init__(self) -> None:
        self.index, self.reading = -1, False

    def over(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The batches of ``batches`` (an iterator, closed by its owner), counted."""
        end = object()
        while True:
            self.reading = True  # stays True when reading raises
            batch = next(batches, end)
            self.reading = False
            if batch is end:
                return
            self.index += 1
            yield batch

    def where(self, before: str, data: str = "the data") -> str:
        """``while reading batch k of the data`` (``data`` names them), ``at batch k``, or ``before`` when no batch was
        reached."""
        if self.reading:
            return f"while reading batch {self.index + 1} of {data}"
        return f"at batch {self.index}" if self.index >= 0 else before


class _Chained:
    """A source that yields an already-read first batch, then the rest of a one-shot stream."""

    def __init__(self, source: Any, first: Batch, rest: Iterator[Batch]):
        self._source, self._first, self._rest = source, first, rest
        self._used = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def __iter__(self) -> Iterator[Batch]:
        if self._used:
            return iter(())
        self._used = True

        def chain() -> Iterator[Batch]:
            yield self._first
            yield from self._rest

        return chain()


def peek(source: Any) -> tuple[Batch | None, Any]:
    """The first batch, and a source that still yields every batch (the first one included).

    An error while reading the first batch is an error in the data: it says so.
    """
    from ..errors import RecalibrationError

    it = iter(source)
    try:
        first = next(it, None)
    except Exception as exc:
        if isinstance(exc, DataError):
            raise
        raise RecalibrationError(f"reading the first batch failed ({type(exc).__name__}: {exc}); nothing ran, the model was restored exactly as it was.") from exc
    if first is None or isinstance(source, (ArrayBatches, ListBatches)):
        return first, source
    return first, _Chained(source, first, it)


def without_singleton_batch(source: Any, refuses: Callable[[Batch], bool]) -> Any:
    """The source without its last batch when that batch holds one sample (the others more) and
    ``refuses(batch)``: PyTorch's BatchNorm refuses one value per channel in training mode, so
    diagnose leaves such a batch out of every mode, for the modes to score the same samples.
    The returned source's ``left_out`` is 1."""
    if isinstance(source, ArrayBatches):
        starts = source._starts
        if source.batch_size > 1 and len(starts) > 1 and source.samples - starts[-1] == 1:
            if not refuses(source._cut(source._indices()[starts[-1]:])):
                return source
            out = ArrayBatches.__new__(ArrayBatches)
            out.__dict__.update(source.__dict__)
            out._starts = starts[:-1]
            out.left_out = 1
            return out
        return source
    batches = list(source)
    if len(batches) > 1 and batches[-1].size == 1 and (batches[0].size or 0) > 1 and refuses(batches[-1]):
        kept = ListBatches(batches[:-1], batch_size=source.batch_size, size_note=source.size_note, order=source.order)
        kept.left_out = 1
        return kept
    return source
