"""Random states kept across a measurement, so that measuring never changes what a run draws next.

A statistics pass that iterates the training loader, a training-mode forward with dropout, or an
extra ``evaluate`` inside ``fit`` all draw from random generators that the user's run also draws
from (a DataLoader's sampler and worker seeds, Keras's torch-backend loader, dropout masks).
:func:`random_states_kept` records those states on entry and puts them back on exit, normal or not.
"""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Callable, Iterable, Iterator

import numpy as np


def loader_generators(loader: Any) -> list[Any]:
    """The random generators a DataLoader's reading draws from, wherever they are held.

    Walks the loader, its sampler, its batch sampler and its dataset, and from them every attribute
    that is a ``Sampler`` or a ``Dataset`` (a ``BatchSampler`` over a ``RandomSampler``, a custom
    batch sampler's own generator, a ``Subset``'s dataset, lists of them): each ``torch.Generator``,
    NumPy ``Generator`` / ``RandomState`` and ``random.Random`` found there, as objects with
    ``get_state()`` / ``set_state(state)``. Attributes of other objects are not entered.
    """
    t = sys.modules.get("torch")
    if t is None:
        return []
    tud = t.utils.data
    found: list[Any] = []
    seen: set[int] = set()
    pending: list[Any] = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None), getattr(loader, "dataset", None)]
    while pending:
        owner = pending.pop()
        if owner is None or id(owner) in seen:
            continue
        seen.add(id(owner))
        state = _state_of(owner, t)
        if state is not None:
            found.append(state)
            continue
        if isinstance(owner, (list, tuple)):
            pending.extend(owner)
            continue
        try:  # the roots whatever their type; below them only samplers and datasets are entered
            values = list(vars(owner).values())
        except TypeError:
            continue
        for value in values:
            if isinstance(value, (tud.Sampler, tud.Dataset)) or _state_of(value, t) is not None:
                pending.append(value)
            elif isinstance(value, (list, tuple)) and any(isinstance(v, (tud.Sampler, tud.Dataset)) for v in value[:8]):
                pending.extend(value)
    return found


class _PythonRandom:
    """A ``random.Random`` (or NumPy ``Generator``) seen through ``get_state`` / ``set_state``."""

    def __init__(self, rng: Any):
        self.rng = rng

    def get_state(self) -> Any:
        return self.rng.getstate() if isinstance(self.rng, random.Random) else self.rng.bit_generator.state

    def set_state(self, state: Any) -> None:
        if isinstance(self.rng, random.Random):
            self.rng.setstate(state)
        else:
            self.rng.bit_generator.state = state


def _state_of(value: Any, t: Any) -> Any:
    """``value`` as an object with ``get_state`` / ``set_state`` if it is a random generator, else None."""
    if isinstance(value, (t.Generator, np.random.RandomState)):
        return value
    if isinstance(value, (random.Random, np.random.Generator)):
        return _PythonRandom(value)
    return None


def iterate_keeping_random_states(loader: Any, batches: Iterable[Any] | None = None) -> Iterator[Any]:
    """Iterate a torch DataLoader (or ``batches`` read from it, e.g. through Keras's data adapter) and put
    back every random state the iteration drew from: the generators :func:`loader_generators` finds,
    torch's global RNG (a sampler without a generator, the worker seeds), and Python's and NumPy's
    global states (a dataset or sampler that augments or shuffles with ``random`` / ``np.random`` in
    the main process): reading the training loader for statistics must not change what training draws next."""
    with random_states_kept(generators=loader_generators(loader)):
        if batches is not None:
            yield from batches
        elif getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0:
            yield from _separate_pass(loader)
        else:
            yield from loader


def _separate_pass(loader: Any) -> Iterator[Any]:
    """The batches of a ``persistent_workers`` DataLoader, read through a loader of its own.

    ``iter()`` on such a loader resets and hands out its one ``_iterator``, the one a training loop
    may still be consuming mid-epoch (a validation inside the epoch would cut the epoch short), and
    its persistent workers would draw for the pass from the random states the next epochs'
    augmentations draw from. So the pass reads a DataLoader built from the same dataset, batch
    sampler or sampler, collate_fn, generator, worker options and ``num_workers`` (the workers are
    separate processes, so the main process's random states stay untouched), with
    ``persistent_workers=False``; its workers are shut down when the pass ends."""
    import torch.utils.data as tud

    options: dict[str, Any] = dict(
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        prefetch_factor=loader.prefetch_factor, persistent_workers=False, pin_memory_device=loader.pin_memory_device,
    )
    if hasattr(loader, "in_order"):
        options["in_order"] = loader.in_order
    if isinstance(loader.dataset, tud.IterableDataset):
        separate = tud.DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **options)
    elif loader.batch_sampler is not None:
        separate = tud.DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **options)
    else:
        separate = tud.DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, **options)
    iterator = iter(separate)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def is_torch_loader(data: Any) -> bool:
    """A ``torch.utils.data.DataLoader`` (without importing torch when it is not loaded)."""
    t = sys.modules.get("torch")
    return t is not None and isinstance(data, t.utils.data.DataLoader)


@contextlib.contextmanager
def random_states_kept(*, python: bool = True, numpy: bool = True, torch: bool = True, generators: Iterable[Any] = ()) -> Iterator[None]:
    """Put back, on exit, the global random states asked for and each ``generators`` state.

    ``python``: :mod:`random`; ``numpy``: the legacy global ``np.random`` state; ``torch``:
    torch's CPU generator and every CUDA device's, if torch is already imported (a process that
    never imported torch has no torch state to keep); ``generators``: objects with
    ``get_state()`` / ``set_state(state)``, e.g. a ``torch.Generator`` of a DataLoader.
    Side effects: none beyond restoring those states.
    """
    saved: list[tuple[Callable[[Any], Any], Any]] = []
    if python:
        saved.append((random.setstate, random.getstate()))
    if numpy:
        saved.append((np.random.set_state, np.random.get_state()))
    t = sys.modules.get("torch") if torch else None
    if t is not None:
        saved.append((t.random.set_rng_state, t.random.get_rng_state()))
        if t.cuda.is_available():
            saved.append((t.cuda.set_rng_state_all, t.cuda.get_rng_state_all()))
    for g in generators:
        saved.append((g.set_state, g.get_state()))
    try:
        yield
    finally:
        for put_back, state in reversed(saved):
            put_back(state)
