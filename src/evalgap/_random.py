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
    """The ``torch.Generator`` objects a DataLoader's shuffling draws from (its own, its sampler's)."""
    t = sys.modules.get("torch")
    found: list[Any] = []
    if t is None:
        return found
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, t.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def iterate_keeping_random_states(loader: Any, batches: Iterable[Any] | None = None) -> Iterator[Any]:
    """Iterate a torch DataLoader (or ``batches`` read from it, e.g. through Keras's data adapter) and put
    back every random state the iteration drew from (the loader's generators and torch's global RNG,
    which a sampler without a generator and the worker seeds use): reading the training loader for
    statistics must not change the order training draws next."""
    with random_states_kept(python=False, numpy=False, generators=loader_generators(loader)):
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
