"""Code to paste, for Keras users."""

from __future__ import annotations

from typing import Sequence


def _vec(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


class KerasRemedies:
    api = "evalgap.keras"
    data = "train_data"

    def recalibrate(self, include_frozen: bool = False) -> str:
        return f"import evalgap.keras\nevalgap.keras.recalibrate(model, train_data{', include_frozen=True' if include_frozen else ''})"

    def before_validation(self) -> str:
        return "model.fit(..., callbacks=[evalgap.keras.PreciseBN(train_data)])"

    def momentum(self, momentum: float) -> str:
        return f"keras.layers.BatchNormalization(momentum={momentum})  # memory of at most half an epoch"

    def rescale(self, mean: Sequence[float], std: Sequence[float], *, axis: int = -1) -> str:
        return f"keras.layers.Rescaling(1 / 255.0)  # or {self.normalize(mean, std, axis=axis)}"

    def normalize(self, mean: Sequence[float], std: Sequence[float], *, axis: int = -1) -> str:
        """Per channel on ``axis`` (Normalization's own default: the last)."""
        where = "" if axis == -1 else f"axis={axis}, "
        return f"keras.layers.Normalization({where}mean={_vec(mean)}, variance={_vec([s * s for s in std])})"

    def synchronized(self) -> str:
        return "keras.layers.BatchNormalization(synchronized=True)"

    def monitor_fix(self) -> str:
        return "add evalgap.keras.PreciseBN(train_data) to the callbacks"


REMEDIES = KerasRemedies()
