"""The seed's job in Keras 2 (``evalgap reproduce --keras 2``), as the question wrote it.

``tf_keras.applications.ResNet50(weights=None, classes=N, input_shape=(S, S, 3))`` built and
compiled under ``tf.distribute.MirroredStrategy()`` when there is more than one GPU (as the
Keras 3 job; on one device the strategy is one replica, the same computation, and tracing
under it costs CPU runs minutes) (Adam, sparse categorical cross-entropy, accuracy), trained with ``model.fit(train_data, epochs=E, validation_data=test_data)`` on the
question's ``tf.data`` pipeline: the examples in one fixed shuffled order (tfds stores UC
Merced shuffled and ``tfds.load`` reads it in that order every epoch; here a permutation with
the seed), ``map(parse)``, ``batch(96)``, no per-epoch shuffle, the same data twice. ``parse``
casts the cached ``resize_with_pad`` images to float32 (what ``resize_with_pad`` returns);
the answer's remedy 1 divides by 255 there (``img = img / 255.``), the standardized variant
subtracts the per-channel mean and divides by the std there. Remedy 2 sets every
BatchNormalization's momentum to 0.9. ``precise-bn`` adds ``evalgap.tf_keras.PreciseBN(train_data)``.
"""

from __future__ import annotations

import time
from typing import Any, Collection

import numpy as np

from .common import DEFAULT_PRECISE_SAMPLES, PRECISE_SCHEDULE, precise_epochs, precise_plan, variant_batch_size

FRAMEWORK = "tf_keras"


def framework() -> str:
    """How the header and the JSON name this framework."""
    import tf_keras

    return f"Keras {tf_keras.__version__} (tf_keras, TensorFlow)"


def variants(table: dict) -> dict:
    """The variants of ``reproduce`` (:data:`evalgap.seed.reproduce.VARIANTS`), their descriptions naming ``evalgap.tf_keras``."""
    import dataclasses

    return {n: dataclasses.replace(v, description=v.description.replace("evalgap.keras.", "evalgap.tf_keras.")) for n, v in table.items()}


def pipeline(images: np.ndarray, labels: np.ndarray, batch_size: int, inputs: str, order: np.ndarray, mean=None, std=None):
    """The question's ``dataset.map(parse).batch(96)``, the examples in ``order``."""
    import tensorflow as tf

    def parse(img, label):
        img = tf.cast(img, tf.float32)  # what tf.image.resize_with_pad returns
        if inputs == "div255":
            img = img / 255.0  # the answer's remedy 1
        elif inputs == "standardize":
            img = (img - mean) / std
        return img, label

    data = tf.data.Dataset.from_tensor_slices((images[order], labels[order].astype("int64")))
    return data.map(parse).batch(batch_size)


def build_model(classes: int, image_size: int, momentum: float | None):
    """ResNet50 from scratch as the seed built it; remedy 2 sets every BatchNormalization's momentum."""
    import tf_keras as keras

    model = keras.applications.ResNet50(weights=None, classes=classes, input_shape=(image_size, image_size, 3))
    if momentum is not None:
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(momentum)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _precise_validation():
    import tf_keras as keras

    from .._random import random_states_kept
    from ..tf_keras import find_batchnorms, recalibrate

    class PreciseValidation(keras.callbacks.Callback):
        """After the epochs ``at`` (1-based), evaluate ``val_data`` with exact population statistics of ``data``.

        The moving statistics (every replica's copy) are saved, recalibrated, used for
        ``evaluate`` and put back bitwise, and the global random states are kept, so training goes on exactly as without this
        callback. Adds ``precise_val_<metric>`` to the epoch logs.
        """

        def __init__(self, data: Any, val_data: Any, at: Collection[int]):
            super().__init__()
            self.data, self.val_data, self.at = data, val_data, set(at)
            self.last = None
            self.seconds: dict[int, float] = {}  # epoch (1-based) -> seconds the measurement took

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 not in self.at:
                return
            start = time.perf_counter()
            variables = [v for _, bn in find_batchnorms(self.model) for v in (bn.moving_mean, bn.moving_variance)]
            saved = [(part, part.numpy()) for v in variables for part in (getattr(v, "values", None) or (v,))]
            try:
                with random_states_kept():
                    self.last = recalibrate(self.model, self.data, progress=False, training_metrics=True)
                    metrics = self.model.evaluate(self.val_data, verbose=0, return_dict=True)
            finally:
                for part, value in saved:
                    part.assign(value)
            self.seconds[epoch + 1] = time.perf_counter() - start
            if logs is not None:
                logs.update({f"precise_val_{k}": float(v) for k, v in metrics.items()})
                logs.update({f"train_mode_{k}": v for k, v in (self.last.training_metrics or {}).items()})

    return PreciseValidation


def _validation_is_precise():
    import tf_keras as keras

    class ValidationIsPrecise(keras.callbacks.Callback):
        """``precise_val_<metric>`` = ``val_<metric>``: after PreciseBN, fit's validation is the precise measurement."""

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs.update({f"precise_{k}": float(v) for k, v in list(logs.items()) if k.startswith("val_")})

    return ValidationIsPrecise


def run_variant(
    variant, images: np.ndarray, labels: np.ndarray, classes: int, epochs: int, *, batch_size: int | None = None,
    on_epoch=None, seed: int = 0, precise_every: int | str = PRECISE_SCHEDULE, info: dict[str, Any] | None = None,
    precise_samples: int | None = DEFAULT_PRECISE_SAMPLES,
) -> list[dict[str, float]]:
    """Train one variant (Keras 2) with validation data = training data; return its per-epoch logs (as ``reproduce.run_variant``)."""
    import tensorflow as tf
    import tf_keras as keras

    from ..tf_keras import PreciseBN

    keras.utils.set_random_seed(seed)
    bs = variant_batch_size(variant.batch_size, batch_size, len(images))
    pixels = images.reshape(-1, 3).astype(np.float64)
    mean, std = (pixels.mean(0).astype("float32"), pixels.std(0).astype("float32")) if variant.inputs == "standardize" else (None, None)
    order = np.random.default_rng(seed).permutation(len(images))
    train_data = pipeline(images, labels, bs, variant.inputs, order, mean, std)
    test_data = pipeline(images, labels, bs, variant.inputs, order, mean, std)  # the same data, as in the question
    strategy = tf.distribute.MirroredStrategy() if len(tf.config.list_logical_devices("GPU")) > 1 else tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(classes, images.shape[1], variant.momentum)
    logs: list[dict[str, float]] = []

    class Collect(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, epoch_logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, epoch_logs=None):
            row = {"epoch": epoch + 1, "seconds": time.perf_counter() - self.t, **{k: float(v) for k, v in (epoch_logs or {}).items()}}
            side = measuring.get("precise_val")
            if side is not None and epoch + 1 in side.seconds:  # the side measurement's share of "seconds"
                row["precise_seconds"] = side.seconds[epoch + 1]
            logs.append(row)
            if on_epoch is not None:
                on_epoch(variant, row)

    measuring: dict[str, Any] = {}
    extra: list[Any] = []
    if variant.precise_bn:
        measuring["precise_bn"] = PreciseBN(train_data, verbose=0, training_metrics=True)
    mode, pick, precise = precise_plan(labels, precise_bn=variant.precise_bn, every=precise_every, samples=precise_samples,
                                       batch_size=bs, seed=seed)
    if mode == "validation":  # fit's validation runs after PreciseBN's recalibration: it is the measurement
        extra.append(_validation_is_precise()())
    elif mode == "side":
        stats_data = pipeline(images[pick], labels[pick], bs, variant.inputs, np.random.default_rng(seed).permutation(len(pick)), mean, std)
        measuring["precise_val"] = _precise_validation()(stats_data, test_data, at=precise_epochs(epochs, precise_every))
    if info is not None:
        info["precise_val"] = precise
    model.fit(train_data, epochs=epochs, verbose=0, validation_data=test_data, callbacks=[*measuring.values(), *extra, Collect()])
    if info is not None:
        info["batching"] = {name: cb.last.batching for name, cb in measuring.items() if cb.last is not None}
    return logs
