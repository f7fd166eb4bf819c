"""evalgap for Keras 2: `tf_keras` (TensorFlow 2.16+, `TF_USE_LEGACY_KERAS=1`) and `tf.keras` of TensorFlow <= 2.15.

``import evalgap.tf_keras as eg; eg.recalibrate(model, data)``; ``eg.diagnose(model, data)``; in
``fit``: ``callbacks=[eg.PreciseBN(train_data), eg.GapMonitor(train_data)]``.
"""

from __future__ import annotations

from typing import Any

_PUBLIC = {
    "recalibrate": ".api", "diagnose": ".api", "PreciseBN": ".callbacks", "GapMonitor": ".callbacks",
    "find_batchnorms": ".layers", "is_frozen": ".layers",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (so that ``evalgap.tf_keras.remedies`` needs no framework)."""
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
