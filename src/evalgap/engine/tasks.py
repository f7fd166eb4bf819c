"""Which default loss and metrics the shapes of outputs and targets leave no doubt about.

Used by adapters whose users may not pass a loss (PyTorch, Flax); each adapter maps the
task to its framework's own loss and metric functions. A default is chosen only when the
shapes and dtypes leave no doubt; otherwise the adapter asks for ``loss_fn``/``metrics``.

=================  ===========================================  ============================
task               output / targets                             loss, metrics
=================  ===========================================  ============================
``classification`` scores (N, C), C > 1 / integers (N,) or (N, 1)  cross-entropy, accuracy
``segmentation``   scores (N, C, *S) / integers (N, [1,] *S)     per-pixel CE, pixel accuracy
                   (PyTorch: not where the classes may be on the
                   last axis as well, :func:`two_class_axes`)
``binary``         one logit (N,) or (N, 1) / 0-1 values          BCE with logits, accuracy
``regression``     any / floats of the output's shape, not 0-1,   MSE only
                   not rows of class probabilities
=================  ===========================================  ============================

No default is chosen for targets holding NaN or Inf, a 'no label' marker no default masks
(:func:`completed`); labels outside the classes that are all one such marker (255, -100, -1) get
an error naming the loss that leaves them out (:func:`ignore_like`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..errors import DataError

TASKS = ("classification", "segmentation", "binary", "regression")

NOTES = {
    "classification": "cross-entropy and accuracy (default for class scores with integer targets)",
    "segmentation": "per-pixel cross-entropy and pixel accuracy (default for (N, C, ...) scores with (N, ...) integer targets)",
    "binary": "binary cross-entropy with logits and accuracy at logit 0 (default for one logit with 0/1 targets)",
    "regression": "mean squared error (default for float targets shaped like the output; no accuracy)",
}


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    return shape[:-1] if len(shape) == 2 and shape[-1] == 1 else shape


def _labels_shape(out: tuple[int, ...], tgt: tuple[int, ...]) -> tuple[int, ...]:
    """(N, 1, *S) labels as (N, *S), as Keras's sparse losses take them, for scores of more than one class on axis 1."""
    if len(tgt) == len(out) >= 2 and tgt[1] == 1 and out[1] > 1:
        return tgt[:1] + tgt[2:]
    return tgt


def two_class_axes(output_shape: Sequence[int], target_shape: Sequence[int]) -> bool:
    """Whether integer targets fit scores of at least 3 dimensions with the classes on axis 1 (segmentation: scores
    (N, C, *S), labels (N, *S)) and with the classes on the last axis (per token: scores (N, L, C), labels (N, L), as
    a tagger returns them) alike: every axis after the first has the same size, so the shapes cannot tell which."""
    out, tgt = tuple(int(d) for d in output_shape), tuple(int(d) for d in target_shape)
    if len(out) < 3 or out[1] < 2:
        return False
    tgt = _labels_shape(out, tgt)
    return tgt == (out[0], *out[2:]) and tgt == out[:-1]


def default_task(output_shape: Sequence[int], target_shape: Sequence[int], integer_targets: bool, binary_values: bool,
                 probability_rows: bool = False, classes_last_too: bool = False) -> str | None:
    """The task the shapes imply (table above), or None when they leave doubt.

    ``integer_targets``: the targets are an integer dtype; ``binary_values``: every target is
    0 or 1. One logit and 0/1 targets is ``binary`` whatever the target dtype.
    ``probability_rows``: the targets are non-negative and sum to 1 over the class axis (soft
    labels: label smoothing, mixup, distillation), which cross-entropy takes as well as MSE: doubt,
    as for one-hot rows. ``classes_last_too``: the framework's models may return their classes on the
    last axis as well (PyTorch's per-token scores (N, L, C)), so shapes that fit both readings
    (:func:`two_class_axes`) leave doubt instead of being taken for segmentation.
    """
    out, tgt = tuple(int(d) for d in output_shape), tuple(int(d) for d in target_shape)
    if not out or not tgt or out[0] != tgt[0]:
        return None
    one_logit = len(out) == 1 or (len(out) == 2 and out[1] == 1)
    if one_logit and _squeezed(tgt) == _squeezed(out):
        if binary_values:
            return "binary"
        return None if integer_targets else "regression"
    if integer_targets:
        if classes_last_too and two_class_axes(out, tgt):
            return None
        tgt = _labels_shape(out, tgt)  # (N, 1) labels, as Keras's sparse losses take them
        if len(out) == 2 and out[1] > 1 and tgt == (out[0],):
            return "classification"
        if len(out) >= 3 and out[1] > 1 and tgt == (out[0], *out[2:]):
            return "segmentation"
        return None
    if tgt == out and not binary_values and not probability_rows:
        return "regression"
    return None


def batch_total(name: str, shape: Sequence[int], samples: int, summed: bool = False) -> str:
    """How the value a user's loss or metric gave on one batch becomes the batch's per-sample total.

    - ``"mean"``: one number, the batch's mean (``reduction='mean'``, the usual): total = value x samples;
    - ``"sum"``: one number from a callable declared to sum (``reduction='sum'``): total = value;
    - ``"each"``: one value per sample (``reduction='none'``, shape ``(samples,)`` or ``(samples, 1)``):
      total = their sum.

    Dividing the totals over all batches by the number of samples gives the per-sample mean,
    as an evaluation loop that averages per sample does. Any other shape: a :class:`DataError`.
    """
    size = 1
    for d in shape:
        size *= int(d)
    if size == 1:
        return "sum" if summed else "mean"
    if len(shape) >= 1 and int(shape[0]) == samples and size == samples:
        return "each"
    raise DataError(
        f"{name} gave values of shape {tuple(int(d) for d in shape)} for a batch of {samples} samples: return one number "
        f"(the batch mean, or its sum with reduction='sum') or one value per sample (reduction='none')."
    )


#: Label values that mark pixels or tokens without a label (VOC/Cityscapes masks, PyTorch's ``ignore_index`` default, -1).
IGNORE_LIKE = (255, -100, -1)


def whole_number_floats(values: Any) -> bool:
    """Whether ``values`` are floats, at least one, each finite and whole: class indices as pandas or a float array
    stores them (read as integers)."""
    import numpy as np

    y = np.asarray(values)
    return y.dtype.kind == "f" and y.size > 0 and bool(np.all(np.isfinite(y) & (np.mod(y, 1) == 0)))


def ignore_like(labels: Any, classes: int) -> int | None:
    """The one value that integer ``labels`` hold outside ``[0, classes)`` when it is a usual 'no label' marker
    (:data:`IGNORE_LIKE`: 255, -100, -1), else None (no such value, several, or another: a wrong encoding)."""
    import numpy as np

    y = np.asarray(labels)
    if whole_number_floats(y):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        return None
    outside = np.unique(y[(y < 0) | (y >= classes)])
    return int(outside[0]) if len(outside) == 1 and int(outside[0]) in IGNORE_LIKE else None


def check_class_labels(labels: Any, classes: int, fix: Callable[[int, int], str]) -> None:
    """:func:`evalgap._checks.check_labels`; where the labels outside ``[0, classes)`` are all one 'no label' marker
    (:func:`ignore_like`), the error names what leaves it out: ``fix(marker, classes)``, a loss and metrics in the adapter's
    framework (as :func:`non_finite_error` takes its ``example``)."""
    from .._checks import check_labels

    try:
        check_labels(labels, classes)
    except DataError as exc:
        v = ignore_like(labels, classes)
        if v is None:
            raise
        raise DataError(
            f"{exc} The labels outside [0, {classes}) are all {v}, a 'no label' marker the default loss and accuracy do not "
            f"leave out: pass {fix(v, classes)}."
        ) from None


def non_finite_error(bad: int, size: int, example: str) -> DataError:
    """The error for targets holding NaN or Inf (``bad`` of ``size`` values in the first batch), which no default loss
    or metric takes: every mode would be NaN. ``example``: a masking loss in the adapter's framework."""
    return DataError(
        f"the targets hold non-finite values (NaN or Inf: {bad} of {size} in the first batch), often a 'no label' marker "
        "(invalid depth, missing values), which no default loss or metric masks: every mode would be NaN. Pass a loss_fn "
        f"that leaves them out (e.g. {example}), and metrics= that do too (metrics={{}} for none)."
    )


def completed(
    loss_fn: Any, metrics: Mapping[str, Any] | None, task: Callable[[], str], table: Mapping[str, tuple[Any, Mapping[str, Any]]],
    non_finite: Callable[[], tuple[int, int]] | None = None, masked_example: str = "",
) -> tuple[Any, dict[str, Any], frozenset[str], list[str]]:
    """The user's loss and metrics, completed with the adapter's defaults for the task the shapes imply.

    ``task()`` is asked only when something is missing; ``table[task]`` is the adapter's
    ``(loss, {name: metric})``. Returns ``(loss_fn, metrics, names computed by defaults, notes)``.
    ``non_finite()``: how many of the first batch's target values are NaN or Inf, and of how many; where any are,
    no default is chosen (:func:`non_finite_error`, naming ``masked_example``): neither the default loss nor a default
    metric (a user's loss with the task's metrics is kept where the task has none, as regression).
    """
    if loss_fn is not None and metrics is not None:
        return loss_fn, dict(metrics), frozenset(), []
    bad, size = non_finite() if non_finite is not None else (0, 0)
    try:
        kind = task()
    except DataError:
        if bad:  # the shapes may be fine: the values are what no default takes
            raise non_finite_error(bad, size, masked_example) from None
        raise
    default_loss, default_metrics = table[kind]
    if bad and (loss_fn is None or (metrics is None and default_metrics)):
        raise non_finite_error(bad, size, masked_example)
    which = "loss and metrics" if loss_fn is None and metrics is None else "loss" if loss_fn is None else "metrics"
    defaults = ({"loss"} if loss_fn is None else set()) | (set(default_metrics) if metrics is None else set())
    return (loss_fn if loss_fn is not None else default_loss, dict(metrics if metrics is not None else default_metrics), frozenset(defaults),
            [f"{which}: {NOTES[kind]}; pass loss_fn=/metrics= to measure your own."])

