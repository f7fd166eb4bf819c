"""The framework-free engine: the lifecycle of ``recalibrate`` and ``diagnose``, written once.

Adapters (``evalgap.keras``, ``evalgap.torch``, ...) implement :class:`Adapter`
(:mod:`evalgap.engine.protocol`) and call :func:`recalibrate` / :func:`diagnose` with a
:class:`BatchSource` of the user's data. See ``docs/architecture.md``.
"""

from __future__ import annotations

from .batching import ArrayBatches, ListBatches, StreamBatches, materialize, peek, tree_leaves, tree_map
from .diagnose import Training, diagnose
from .monitor import GapProbe, check_reiterable, check_schedule
from .protocol import (
    Adapter, Batch, BatchSource, Capture, Collective, HostCaptures, Metrics, MetricState, ModelFacts, NormLayer, Remedies, is_training_only,
    scale_changed, value_summary,
)
from .recalibrate import Measured, assemble, measure, recalibrate, write

__all__ = [
    "is_training_only", "scale_changed", "value_summary",
    "Adapter", "Batch", "BatchSource", "Capture", "Collective", "HostCaptures", "Metrics", "MetricState", "ModelFacts", "NormLayer",
    "Remedies", "ArrayBatches", "ListBatches", "StreamBatches", "materialize", "peek", "tree_map", "tree_leaves",
    "Training", "diagnose", "recalibrate", "measure", "assemble", "write", "Measured", "GapProbe", "check_reiterable",
    "check_schedule",
]
