"""evalgap for Flax (NNX and Linen): exact BatchNorm recalibration and diagnosis of the train/eval gap.

``import evalgap.flax as eg``; NNX: ``eg.recalibrate(model, batches)``; Linen:
``result, variables = eg.recalibrate((module, variables), batches)``; ``eg.diagnose(model, batches)``;
in a training loop ``eg.PreciseBN(batches)`` and ``eg.GapMonitor(batches)``.
"""

from __future__ import annotations

from typing import Any

_PUBLIC = {
    "recalibrate": ".api", "diagnose": ".api", "PreciseBN": ".callbacks", "GapMonitor": ".callbacks",
    "find_batchnorms": ".layers", "is_frozen": ".layers",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (so that ``evalgap.flax.remedies`` needs no framework)."""
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
