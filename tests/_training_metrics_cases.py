"""Cases of ``recalibrate(..., training_metrics=True)`` shared by Keras 3 (tests/keras) and Keras 2 (tests/tf_keras).

The pass's own outputs are scored with the compiled loss and metrics. Reference: the same small
network (Dense -> BatchNormalization -> ReLU -> Dense softmax) in float64 NumPy, each batch
normalized by its own biased statistics as in training, scored as ``evaluate`` scores: the sample
mean of the cross-entropy and of the accuracy over all 100 samples (batches of 32, 32, 32 and a
ragged 4: it runs too, with its own statistics). A subclass named ``Test...`` sets ``keras``,
``eg`` (``evalgap.keras`` or ``evalgap.tf_keras``) and ``snapshot``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

import evalgap

N, BATCH, FEATURES, CLASSES = 100, 32, 5, 3


def _model(keras, compiled: bool = True):
    inp = keras.Input((FEATURES,))
    h = keras.layers.Dense(8, name="d1")(inp)
    h = keras.layers.BatchNormalization(name="bn", epsilon=1e-3)(h)
    h = keras.layers.ReLU()(h)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="d2")(h)
    model = keras.Model(inp, out)
    if compiled:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _data():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(N, FEATURES)) * [1, 2, 3, 4, 5] + 10).astype("float32")
    y = rng.integers(0, CLASSES, N)
    return x, y


def reference(model, x, y) -> dict[str, float]:
    w1, b1 = (np.asarray(v, np.float64) for v in model.get_layer("d1").get_weights())
    bn = model.get_layer("bn")
    gamma, beta = (np.asarray(v, np.float64) for v in bn.get_weights()[:2])
    w2, b2 = (np.asarray(v, np.float64) for v in model.get_layer("d2").get_weights())
    losses, hits = [], []
    for start in range(0, N, BATCH):
        xb, yb = x[start:start + BATCH].astype(np.float64), y[start:start + BATCH]
        h = xb @ w1 + b1
        h = gamma * (h - h.mean(0)) / np.sqrt(h.var(0) + bn.epsilon) + beta
        logits = np.maximum(h, 0) @ w2 + b2
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        losses.append(-np.log(p[np.arange(len(yb)), yb]))
        hits.append(p.argmax(1) == yb)
    return {"loss": float(np.concatenate(losses).mean()), "accuracy": float(np.concatenate(hits).mean())}


class TrainingMetricsCases:
    keras: Any = None  # keras or tf_keras
    eg: Any = None  # evalgap.keras or evalgap.tf_keras
    snapshot: Callable[[Any], Any]  # every variable of a model, comparable with ==

    def test_training_metrics_score_the_pass_outputs_as_evaluate_would(self):
        model = _model(self.keras)
        x, y = _data()
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # weights away from their initial values
        expected = reference(model, x, y)  # before: the pass runs at these weights
        result = self.eg.recalibrate(model, (x, y), batch_size=BATCH, shuffle=False, training_metrics=True, progress=False)
        assert set(result.training_metrics) == {"loss", "accuracy"}
        assert result.training_metrics["loss"] == pytest.approx(expected["loss"], rel=1e-4)
        assert result.training_metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert result.to_dict()["training_metrics"] == result.training_metrics
        # the statistics are still those of the whole batches only (the ragged one is left out of them)
        assert result.samples == 96 and result.skipped_samples == 4

    def test_training_metrics_off_by_default_and_without_targets_a_clear_error_that_changes_nothing(self):
        model = _model(self.keras)
        x, y = _data()
        assert self.eg.recalibrate(model, (x, y), batch_size=BATCH, progress=False).training_metrics is None
        before = self.snapshot(model)
        with pytest.raises(evalgap.DataError, match=r"\(x, y\)"):
            self.eg.recalibrate(model, x, batch_size=BATCH, training_metrics=True, progress=False)
        assert self.snapshot(model) == before

    def test_precise_bn_logs_the_training_mode_metrics_of_the_epochs_final_weights(self):
        model = _model(self.keras)
        x, y = _data()
        callback = self.eg.PreciseBN((x, y), batch_size=BATCH, shuffle=False, verbose=0, training_metrics=True)
        history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
        # no validation: PreciseBN ran at the epoch's end, on the weights fit ended with
        expected = reference(model, x, y)
        assert history.history["train_mode_loss"][0] == pytest.approx(expected["loss"], rel=1e-4)
        assert history.history["train_mode_accuracy"][0] == pytest.approx(expected["accuracy"], abs=1e-6)
        plain = self.eg.PreciseBN((x, y), batch_size=BATCH, verbose=0)
        history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[plain])
        assert not any(k.startswith("train_mode_") for k in history.history)

    def test_training_metrics_note_what_an_uncompiled_model_was_scored_with(self):
        uncompiled = _model(self.keras, compiled=False)  # cross-entropy and accuracy are assumed, and the result says so
        x, y = _data()
        result = self.eg.recalibrate(uncompiled, (x, y), batch_size=BATCH, training_metrics=True, progress=False)
        assert any("training_metrics" in note and "not compiled" in note for note in result.notes), result.notes

    def test_precise_bn_with_training_metrics_and_no_targets_fails_before_training(self):
        x, _ = _data()
        with pytest.raises(evalgap.DataError, match=r"\(x, y\)"):
            self.eg.PreciseBN(x, batch_size=BATCH, training_metrics=True)
