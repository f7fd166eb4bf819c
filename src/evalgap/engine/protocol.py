"""The adapter protocol: the framework questions the engine asks, and nothing else.

An adapter (``evalgap.keras``, ``evalgap.torch``, ...) is instantiated per call with that
call's framework options (PyTorch's ``forward=`` and ``process_group=``, say) and answers:

=========================  ===============================================================
method                     answers
=========================  ===============================================================
``batches``                the user's data as :class:`Batch` es (arrays: shuffled like fit)
``prepare``                the model to work on (unwrapped, built), or a ModelError
``layers``                 the BatchNorm layers: :class:`NormLayer`
``moments_pass``           a context: one forward per batch, chosen BN layers on batch
                           statistics, everything else in inference mode; per call the
                           layer's (count, mean, biased var); on exit the model is as before
``host_captures``          a flush of captures on the host, in bulk: :class:`HostCaptures`
``to_host``                device values (targets) as NumPy
``read`` / ``write``       moving statistics out and in (the engine rolls back on failure)
``predictor``              a context giving outputs in mode E, P (given statistics) or T,
                           without changing the model
``metrics``                the model's / user's loss and metrics, fresh (:class:`Metrics`)
``facts``                  training-only layers, other normalization, replicas, sync BN
``collective``             sums across processes (:class:`Collective`), or None
``input_array``            one batch's model input as NumPy and its channel axis (None: not an image-like array)
``remedies``               the code to paste for this framework (:class:`Remedies`)
=========================  ===============================================================

Everything else (walking batches, whole batches only, merging moments in float64,
combining processes, rolling back, probes, the primary metric, the decomposition, the
findings) is the engine's: :mod:`evalgap.engine`. ``docs/architecture.md`` shows the flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np

from ..stats import Convention

#: One BN call seen by a moments pass: the layer index in the pass's list first (the engine
#: reads only that), then the call's values per channel, mean and biased variance in whatever
#: form the adapter chooses (Keras 3: ``(index, packed batch, position, None)``);
#: :meth:`Adapter.host_captures` turns a list of them into host values.
Capture = tuple[int, Any, Any, Any]


@dataclass(frozen=True)
class HostCaptures:
    """A flush of captures on the host, in call order, side by side (no per-capture objects).

    Capture ``i`` is a call of layer ``index[i]`` with ``count[i]`` values per channel; its
    ``channels[i]`` means and *biased* variances follow capture ``i - 1``'s in ``mean`` and
    ``var`` (float64).
    """

    index: np.ndarray
    count: np.ndarray
    channels: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @classmethod
    def from_list(cls, host: Sequence[tuple[int, Any, Any, Any]]) -> "HostCaptures":
        """From host ``(index, n, mean, biased var)`` tuples."""
        means = [np.asarray(m, dtype=np.float64).reshape(-1) for _, _, m, _ in host]
        variances = [np.asarray(v, dtype=np.float64).reshape(-1) for _, _, _, v in host]
        for (index, _, _, _), m, v in zip(host, means, variances):
            if m.shape != v.shape:
                raise ValueError(f"capture of layer {index}: {m.size} means but {v.size} variances.")
        empty = np.zeros(0, dtype=np.float64)
        return cls(
            index=np.fromiter((h[0] for h in host), dtype=np.int64, count=len(host)),
            count=np.fromiter((float(np.asarray(h[1]).reshape(())) for h in host), dtype=np.float64, count=len(host)),
            channels=np.fromiter((m.size for m in means), dtype=np.int64, count=len(host)),
            mean=np.concatenate(means) if means else empty, var=np.concatenate(variances) if variances else empty,
        )


#: Mode names, as in :mod:`evalgap.attribution`.
MODES = ("T", "Td", "P", "E")


@dataclass
class NormLayer:
    """A BatchNorm layer as an adapter describes it.

    ``frozen``: it normalizes with its moving statistics even in training (Keras
    ``trainable=False``, a PyTorch module in eval mode while the model trains).
    ``tracks_statistics``: False for layers without moving statistics (PyTorch
    ``track_running_stats=False``): batch statistics in both modes, no gap.
    ``dtype``: the moving statistics' dtype (a NumPy name, ``"float16"``), for the check that the population
    statistics fit it (:func:`evalgap.engine.recalibrate.unrepresentable`); None: not checked.
    """

    name: str
    handle: Any
    kind: str
    channels: int
    eps: float
    momentum: float | None
    frozen: bool = False
    tracks_statistics: bool = True
    dtype: str | None = None


@dataclass
class Batch:
    """One batch: the model's inputs, targets, sample weights, the number of samples.

    ``raw`` is the batch as the user's data yielded it (PyTorch's ``forward=`` gets it).
    """

    inputs: Any
    targets: Any = None
    weights: Any = None
    size: int | None = None
    raw: Any = None


class BatchSource(Protocol):
    """Batches of the user's data, with how they were formed."""

    batch_size: int | None
    size_note: str | None  # how the batch size was chosen, when the user did not give it
    order: str  # how the batches are drawn, for the report's notes
    reiterable: bool  # iterating again gives the same batches

    def __iter__(self) -> Iterator[Batch]: ...

    def take(self, max_samples: int) -> "BatchSource": ...


class MetricState(Protocol):
    """Loss and metrics accumulated over batches for one mode."""

    def update(self, batch: Batch, outputs: Any) -> None: ...

    def result(self) -> dict[str, float]: ...


class Metrics(Protocol):
    """The loss and metrics to measure: ``new()`` gives a fresh state per mode.

    ``names`` in the order ``evaluate`` (or the user) gives them, ``"loss"`` first;
    ``given`` are the names of the metrics the user compiled or passed (for the primary
    metric); ``notes`` say where a default was chosen. Optional: ``higher_is_better``
    (name -> bool where the framework states a direction: Keras metrics, torchmetrics objects;
    it wins over the name rule) and ``left_out`` (name -> reason and fix, for metrics that are
    not one number: a ``primary=`` naming one is refused with it).
    """

    names: list[str]
    given: list[str]
    notes: list[str]

    def new(self) -> MetricState: ...


class Collective(Protocol):
    """Sums across the processes (ranks, workers) that each passed their share of the data."""

    world: int
    rank: int
    description: str  # "2 processes", "4 replicas on 2 workers"

    def sum(self, vector: np.ndarray) -> np.ndarray: ...

    def broadcast(self, vector: np.ndarray) -> np.ndarray: ...


#: Class-name fragments of layers that act differently in training mode besides BatchNorm: dropout of
#: every kind (Dropout, AlphaDropout, DropPath, DropBlock2d), stochastic depth, noise layers and random
#: augmentation layers (Keras's RandomFlip, ...). A match only costs the diagnosis one more pass (T).
TRAINING_ONLY_TOKENS = ("Drop", "StochasticDepth", "Noise", "Random")


def scale_changed(given: tuple[float, float, float], received: tuple[float, float, float], tolerance: float = 0.01) -> bool:
    """Whether the first layer receives its input on another scale than the model's input, each given as
    ``(minimum, maximum, standard deviation)`` of one batch (:func:`value_summary`). Changed: the received values
    leave the input's range by more than ``tolerance`` of it (shifted or widened: standardizing, ``x / 127.5 - 1``),
    or their standard deviation is under a tenth, or over ten times, the input's (``x / 255`` stays inside
    [0, 255] with a spread 255 times smaller). A reshape, a permutation, a dtype conversion, a crop, zero padding,
    a resize or a pooling keep both within these margins. The adapters' probes of what their first layer receives
    all judge by this rule."""
    lo, hi, spread = given
    got_lo, got_hi, got_spread = received
    tol = tolerance * max(hi - lo, abs(hi), abs(lo), 1e-12)
    if got_lo < lo - tol or got_hi > hi + tol:
        return True
    return spread > 0 and not 0.1 <= got_spread / spread <= 10.0


def value_summary(values: Any) -> tuple[float, float, float]:
    """``(minimum, maximum, standard deviation)`` of an array of numbers, in float64, for :func:`scale_changed`."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.min()), float(a.max()), float(a.std())


def is_training_only(class_name: str) -> bool:
    """Whether a layer of this class name may act differently in training mode (:data:`TRAINING_ONLY_TOKENS`)."""
    return any(t in class_name for t in TRAINING_ONLY_TOKENS)


@dataclass
class ModelFacts:
    """What the diagnosis says beside the measurements."""

    training_only: list[str] = field(default_factory=list)
    other_normalization: list[str] = field(default_factory=list)
    replicas: int = 1
    synchronized: bool = False
    per_process_batches: bool = False  # each process has its own batches (torch.distributed): global = local x replicas
    input_transforms: list[str] = field(default_factory=list)  # layers that rescale/normalize/embed the inputs in the model
    # layers whose outputs may depend on the training flag beyond BatchNorm and ``training_only`` (user code taking
    # ``training``); None: not known, so diagnose compares T and Td on the first batch; [] : T = Td, no check needed
    mode_dependent: list[str] | None = None
    # the channel axis of the model's input where the model says it (a channels_first convolution first: 1);
    # None: the one ``Adapter.input_array`` gives
    input_channel_axis: int | None = None
    # per-sample normalization that keeps running statistics for evaluation mode (PyTorch's InstanceNorm with
    # track_running_stats=True): each sample's own statistics in training mode, the running ones in evaluation mode
    running_instance_norm: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the adapter knows about the model that the report should say


class Remedies(Protocol):
    """Code to paste, in the adapter's framework."""

    api: str
    data: str  # how the pasteable code names the training data ("train_data", "train_loader")

    def recalibrate(self, include_frozen: bool = False) -> str: ...

    def before_validation(self) -> str: ...

    def momentum(self, momentum: float) -> str: ...

    def rescale(self, mean: Sequence[float], std: Sequence[float], *, axis: int = -1) -> str: ...

    def normalize(self, mean: Sequence[float], std: Sequence[float], *, axis: int = -1) -> str: ...

    def synchronized(self) -> str: ...

    def monitor_fix(self) -> str: ...


class Adapter(Protocol):
    """The framework questions; see the module docstring."""

    api: str
    convention: Convention
    frozen_means: str  # what "frozen" is in this framework, for notes
    one_sample_batches: bool  # training mode takes a batch of one sample (PyTorch refuses one value per channel)
    target_keys: tuple[str, ...] = ()  # the keys a dict batch holds its targets under, where the adapter reads dicts
    bn_kind: str  # how errors name the framework's BatchNorm layers ("BatchNormalization layer")
    remedies: Remedies

    def framework(self, model: Any) -> str: ...

    # optional: needs_targets(model, first) -> bool, False where the model's loss needs no targets beside its inputs
    # (Keras compiled with neither loss nor metrics, with a loss of its own: add_loss, compute_loss); diagnose
    # refuses batches without targets otherwise

    def refuses_one_sample(self, model: Any, layers: Sequence[NormLayer], batch: Batch) -> bool:
        """Only where ``one_sample_batches`` is False: whether training mode refuses ``batch``, of one sample."""
        ...

    def batches(self, data: Any, *, batch_size: int | None, shuffle: bool, seed: int, targets: bool) -> BatchSource: ...

    def prepare(self, model: Any, first: Batch) -> Any: ...

    def layers(self, model: Any) -> list[NormLayer]: ...

    def moments_pass(
        self, model: Any, layers: Sequence[NormLayer], batch_statistics: Sequence[bool]
    ) -> ContextManager[Callable[[Batch], tuple[list[Capture], Any]]]: ...

    def host_captures(self, captures: list[Capture]) -> HostCaptures: ...

    def to_host(self, values: Sequence[Any]) -> list[np.ndarray]: ...

    def read(self, layers: Sequence[NormLayer]) -> list[tuple[np.ndarray, np.ndarray] | None]: ...

    def write(self, layers: Sequence[NormLayer], stats: Sequence[tuple[np.ndarray, np.ndarray]]) -> None: ...

    def predictor(
        self, model: Any, mode: str, layers: Sequence[NormLayer] = (), stats: Sequence[tuple[np.ndarray, np.ndarray]] = ()
    ) -> ContextManager[Callable[[Batch], Any]]: ...

    def metrics(self, model: Any, batch: Batch, outputs: Any, **options: Any) -> Metrics: ...

    def facts(self, model: Any, first: Batch | None = None) -> ModelFacts: ...

    def collective(self, model: Any) -> Collective | None: ...

    def input_array(self, inputs: Any) -> tuple[np.ndarray, int] | None: ...
