"""Code to paste, for Keras 2 (``tf_keras`` / ``tf.keras`` of TensorFlow <= 2.15) users."""

from __future__ import annotations

from typing import Sequence


def _vec(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _package() -> str:
    """How the user's code names Keras 2: ``tf_keras`` where that package is installed (TensorFlow 2.16+;
    ``tf.keras`` there is Keras 3 unless ``TF_USE_LEGACY_KERAS=1``), else ``tf.keras`` (TensorFlow <= 2.15).
    Found without importing either (remedies import no framework)."""
    import importlib.util

    return "tf_keras" if importlib.util.find_spec("tf_keras") is not None else "tf.keras"


class TfKerasRemedies:
    api = "evalgap.tf_keras"
    data = "train_data"

    def __init__(self, package: str | None = None):
        self._package = package

    @property
    def package(self) -> str:
        """``tf_keras`` or ``tf.keras``, looked up on first use."""
        if self._package is None:
            self._package = _package()
        return self._package

    def recalibrate(self, include_frozen: bool = False) -> str:
        return f"import evalgap.tf_keras\nevalgap.tf_keras.recalibrate(model, train_data{', include_frozen=True' if include_frozen else ''})"

    def before_validation(self) -> str:
        return "model.fit(..., callbacks=[evalgap.tf_keras.PreciseBN(train_data)])"

    def momentum(self, momentum: float) -> str:
        return f"{self.package}.layers.BatchNormalization(momentum={momentum})  # memory of at most half an epoch"

    def rescale(self, mean: Sequence[float], std: Sequence[float], *, axis: int = -1) -> str:
        return f"{self.package}.layers.Rescaling(1 / 255.0)  # or {self.normalize(mean, std, axis=axis)}"

    def normalize(self, mean: Sequence[float], std: Sequence[float], *, axis: int = -1) -> str:
        """Per channel on ``axis`` (Normalization's own default: the last)."""
        where = "" if axis == -1 else f"axis={axis}, "
        return f"{self.package}.layers.Normalization({where}mean={_vec(mean)}, variance={_vec([s * s for s in std])})"

    def synchronized(self) -> str:
        return f"{self.package}.layers.BatchNormalization(synchronized=True)"

    def monitor_fix(self) -> str:
        return "add evalgap.tf_keras.PreciseBN(train_data) to the callbacks"


REMEDIES = TfKerasRemedies()
