"""evalgap.tf_keras.diagnose measures the model's OWN compiled loss and metrics, as Keras 2's evaluate does.

For a bank of compiled Keras 2 models (each with BatchNormalization whose moving statistics
are set away from the population's):

* E (evaluation mode, current moving statistics) equals ``model.evaluate(..., return_dict=True)``,
  key by key (the metric names are exactly evaluate's keys, in both orders: diagnose before
  the model's metric containers are built, and after ``evaluate`` built and renamed them);
* P (evaluation mode, population statistics) equals ``evaluate`` after
  ``evalgap.tf_keras.recalibrate`` on the same data and batch size;
* the model is left exactly as it was (every variable, and a borrowed metric's state).

Sample counts are multiples of the batch size, so every batch is whole and the order in which
diagnose draws the batches cannot change any value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

import evalgap
import evalgap.tf_keras as eg

from ._reference import snapshot

N = 128
BATCH = 32
RTOL = 1e-5
ATOL = 1e-6


class AboveThreshold(keras.metrics.Metric):
    """A custom stateful metric that cannot be re-created from its config (``threshold`` is not in it):
    diagnose borrows it and must put its state back."""

    def __init__(self, threshold, name="above_threshold", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.hits = self.add_weight(name="hits", initializer="zeros")
        self.count = self.add_weight(name="count", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        above = tf.cast(tf.reshape(y_pred, [-1]) > self.threshold, self.dtype)
        self.hits.assign_add(tf.reduce_sum(above))
        self.count.assign_add(tf.cast(tf.size(above), self.dtype))

    def result(self):
        return tf.math.divide_no_nan(self.hits, self.count)


class HitRate(keras.metrics.Metric):
    """The common custom-metric pattern: a constructor argument with a default, no ``get_config`` (a copy from its
    config would measure at 0.5)."""

    def __init__(self, threshold=0.5, name="hit_rate", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.hits = self.add_weight(name="hits", initializer="zeros")
        self.count = self.add_weight(name="count", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        p = tf.reduce_max(y_pred, axis=-1)  # the top class's probability
        self.hits.assign_add(tf.reduce_sum(tf.cast(p > self.threshold, self.dtype)))
        self.count.assign_add(tf.cast(tf.size(p), self.dtype))

    def result(self):
        return tf.math.divide_no_nan(self.hits, self.count)


def _features(seed=0):
    return np.random.default_rng(seed).normal(2.0, 3.0, (N, 6)).astype("float32")


def _classes(x, k=4):
    return (np.floor(x[:, 0] - x[:, 2]) % k).astype("int64")


def _binary(x):
    return (x[:, 0] + x[:, 1] > 4.0).astype("float32")


def _regression(x):
    return (0.5 * x[:, 0] - 0.3 * x[:, 1] + 0.1 * x[:, 2] ** 2).astype("float32")


def _trunk(inp, reg=None):
    h = layers.Dense(8, kernel_regularizer=reg)(inp)
    return layers.ReLU()(layers.BatchNormalization(momentum=0.9)(h))


def _functional(head, **compile_args):
    inp = keras.Input((6,))
    model = keras.Model(inp, head(_trunk(inp)))
    model.compile(optimizer="adam", **compile_args)
    return model


def _binary_sequential():
    model = keras.Sequential([keras.Input((6,)), layers.Dense(8), layers.BatchNormalization(momentum=0.9), layers.ReLU(), layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy", keras.metrics.AUC(), AboveThreshold(0.5)])
    return model


def _two_outputs(as_dict: bool):
    inp = keras.Input((6,))
    h = _trunk(inp)
    a = layers.Dense(3, activation="softmax", name="a")(h)
    b = layers.Dense(1, name="b")(layers.BatchNormalization(momentum=0.9)(layers.Dense(4)(h)))
    spec = dict(loss=["sparse_categorical_crossentropy", keras.losses.Huber()], loss_weights=[1.0, 0.5], metrics=[["accuracy"], [keras.metrics.MeanAbsoluteError(name="mae")]])
    if as_dict:
        spec = {k: dict(zip("ab", v)) for k, v in spec.items()}
    model = keras.Model(inp, {"a": a, "b": b} if as_dict else [a, b])
    model.compile(optimizer="adam", **spec)
    return model


def _two_outputs_custom_metric():
    """A custom metric on one output of two: Keras prefixes its name (``a_hit_rate``) when it builds its container."""
    inp = keras.Input((6,))
    h = _trunk(inp)
    model = keras.Model(inp, {"a": layers.Dense(3, activation="softmax", name="a")(h), "b": layers.Dense(1, name="b")(h)})
    model.compile(optimizer="adam", loss={"a": "sparse_categorical_crossentropy", "b": "mse"},
                  metrics={"a": ["accuracy", HitRate(threshold=0.4)]})
    return model


def _regularized_conv():
    reg = keras.regularizers.L2(1e-2)
    inp = keras.Input((8, 8, 1))
    h = layers.Conv2D(4, 3, padding="same", kernel_regularizer=reg)(inp)
    h = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(h))  # fused
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(8, kernel_regularizer=reg, activity_regularizer=keras.regularizers.L1(1e-3))(h)  # add_loss in call
    out = layers.Dense(4, activation="softmax")(layers.BatchNormalization(momentum=0.9)(h))
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@dataclass
class Case:
    build: Callable[[], Any]
    data: Callable[[], tuple]


def _xy(y_of):
    return lambda: (lambda x: (x, y_of(x)))(_features())


CASES = {
    "sparse-softmax-topk": Case(
        lambda: _functional(layers.Dense(4, activation="softmax"), loss="sparse_categorical_crossentropy",
                            metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2)]),
        _xy(_classes),
    ),
    "sparse-from-logits": Case(
        lambda: _functional(layers.Dense(4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]),
        _xy(_classes),
    ),
    "binary-sigmoid-y1d-borrowed-metric": Case(_binary_sequential, _xy(_binary)),
    "two-outputs-list": Case(lambda: _two_outputs(False), lambda: (lambda x: (x, [_classes(x, 3), _regression(x)]))(_features())),
    "two-outputs-dict": Case(lambda: _two_outputs(True), lambda: (lambda x: (x, {"a": _classes(x, 3), "b": _regression(x)}))(_features())),
    "two-outputs-custom-metric": Case(
        _two_outputs_custom_metric, lambda: (lambda x: (x, {"a": _classes(x, 3), "b": _regression(x)}))(_features()),
    ),
    "sample-weights": Case(
        lambda: _functional(layers.Dense(4, activation="softmax"), loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                            weighted_metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2)]),
        lambda: (lambda x: (x, _classes(x), np.random.default_rng(1).uniform(0.1, 3.0, N).astype("float32")))(_features()),
    ),
    "l2-activity-regularized-conv": Case(
        _regularized_conv,
        lambda: (lambda x: (x, _classes(x.reshape(N, -1), 4)))(np.random.default_rng(0).normal(1.0, 2.0, (N, 8, 8, 1)).astype("float32")),
    ),
}


def _stale(model):
    """Moving statistics away from the population's (as after a short training)."""
    for _, bn in eg.find_batchnorms(model):
        bn.moving_mean.assign(bn.moving_mean + 0.7)
        bn.moving_variance.assign(bn.moving_variance * 3.0)


def _evaluate(model, data) -> dict[str, float]:
    x, y, *w = data
    logs = model.evaluate(x, y, sample_weight=w[0] if w else None, batch_size=BATCH, return_dict=True, verbose=0)
    return {k: float(np.asarray(v)) for k, v in logs.items()}


def _mode(report, mode) -> dict[str, float]:
    return {k: float(d.values.get(mode, np.nan)) for k, d in report.decompositions.items()}


def _assert_close(got: dict[str, float], want: dict[str, float], what: str):
    assert list(got) == list(want), f"{what}: metric names {list(got)} != evaluate's {list(want)}"
    bad = {k: (got[k], want[k]) for k in want if not np.isclose(got[k], want[k], rtol=RTOL, atol=ATOL)}
    assert not bad, f"{what} differs from evaluate (got, want): {bad}"


def _metric_state(model) -> list[bytes]:
    return [np.asarray(v.numpy()).tobytes() for m in model.metrics for v in m.variables]


#: where Keras renames metrics when it builds its containers (per-output prefixes, weighted_): also run after evaluate built them
RENAMED = ("two-outputs-list", "two-outputs-dict", "two-outputs-custom-metric", "sample-weights")
RUNS = [(name, False) for name in CASES] + [(name, True) for name in RENAMED]


@pytest.mark.parametrize("name, evaluate_first", RUNS, ids=[f"{n}-{'evaluate' if e else 'diagnose'}-first" for n, e in RUNS])
def test_E_and_P_equal_evaluate(name, evaluate_first):
    case = CASES[name]
    data = case.data()
    model = case.build()
    model(data[0][:2])
    _stale(model)
    want_e = _evaluate(model, data) if evaluate_first else None
    before, metric_state = snapshot(model), _metric_state(model)

    report = eg.diagnose(model, data, batch_size=BATCH, progress=False)

    assert snapshot(model) == before and _metric_state(model) == metric_state, "diagnose changed the model"
    want_e = want_e or _evaluate(model, data)
    _assert_close(_mode(report, "E"), want_e, "E")
    eg.recalibrate(model, data, batch_size=BATCH, progress=False)
    want_p = _evaluate(model, data)
    assert not np.isclose(want_p["loss"], want_e["loss"], rtol=1e-3), (want_p, want_e)  # not trivial
    _assert_close(_mode(report, "P"), want_p, "P")


def test_gap_is_fit_minus_evaluate():
    x = _features()
    data = (x, _classes(x))
    model = _functional(layers.Dense(4, activation="softmax"), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(*data, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    want_e = _evaluate(model, data)
    fit_last = {k: float(v[-1]) for k, v in history.history.items()}

    report = eg.diagnose(model, data, batch_size=BATCH, history=history, progress=False)

    _assert_close(_mode(report, "E"), want_e, "E")
    _assert_close(_mode(report, "F"), fit_last, "F")
    assert report.primary == "accuracy"
    assert report.gap == pytest.approx(fit_last["accuracy"] - want_e["accuracy"], abs=1e-6)


def test_add_metric_metrics_are_named_in_a_note_and_left_alone():
    x = _features()
    data = (x, _classes(x))
    inp = keras.Input((6,))
    h = _trunk(inp)
    model = keras.Model(inp, layers.Dense(4)(h))
    model.add_metric(tf.reduce_mean(h), name="mean_hidden")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    want_e = _evaluate(model, data)
    assert "mean_hidden" in want_e
    before, metric_state = snapshot(model), _metric_state(model)
    report = eg.diagnose(model, data, batch_size=BATCH, progress=False)
    assert snapshot(model) == before and _metric_state(model) == metric_state
    assert any("add_metric (mean_hidden)" in note for note in report.notes), report.notes
    _assert_close(_mode(report, "E"), {k: v for k, v in want_e.items() if k != "mean_hidden"}, "E")


class EndpointMSE(layers.Layer):
    """An endpoint layer: adds mean((p - t)**2) with add_loss and returns p."""

    def call(self, inputs):
        p, t = inputs
        self.add_loss(tf.reduce_mean(tf.square(p - t)))
        return p


def test_a_loss_from_add_loss_alone_needs_no_targets():
    """compile() with neither loss nor metrics, the loss added by an endpoint layer that reads its targets from the
    inputs, as fit([x, t]) trains it: the inputs alone are enough (diagnose refused them: "needs targets"), and E's
    loss equals evaluate's and the float64 NumPy mean squared error."""
    x = _features()
    t = _regression(x)[:, None]
    inp, target = keras.Input((6,)), keras.Input((1,))
    model = keras.Model([inp, target], EndpointMSE()([layers.Dense(1)(_trunk(inp)), target]))
    model.compile(optimizer="adam")
    model.fit([x, t], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    want = {k: float(v) for k, v in model.evaluate([x, t], batch_size=BATCH, return_dict=True, verbose=0).items()}
    pred = np.asarray(model.predict([x, t], batch_size=BATCH, verbose=0), np.float64)

    report = eg.diagnose(model, ([x, t],), batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), want, "E")
    assert _mode(report, "E")["loss"] == pytest.approx(np.mean((pred - t) ** 2), rel=1e-5)


@pytest.mark.parametrize("regularized", [False, True])
def test_a_model_without_any_loss_still_needs_targets(regularized):
    """compile(optimizer) alone and no add_loss, with or without weight regularization (the same for any input): there
    is no loss to measure from the inputs alone, so diagnose asks for targets (it reported a loss of 0, or the L2
    penalty, in every mode)."""
    inp = keras.Input((6,))
    reg = keras.regularizers.L2(0.1) if regularized else None
    model = keras.Model(inp, layers.Dense(1, kernel_regularizer=reg)(_trunk(inp)))
    model.compile(optimizer="adam")
    with pytest.raises(evalgap.DataError, match="needs targets"):
        eg.diagnose(model, (_features(),), batch_size=BATCH, progress=False)


def test_a_custom_metric_keeps_its_constructor_arguments_and_its_name():
    """HitRate(threshold=0.4) on output a is measured at 0.4, as evaluate and a float64 NumPy reference give it,
    under evaluate's key ``a_hit_rate``; the metric object keeps its name and state (a later evaluate agrees)."""
    x = _features()
    data = (x, {"a": _classes(x, 3), "b": _regression(x)})
    model = _two_outputs_custom_metric()
    metric = model.compiled_metrics._user_metrics["a"][1]
    model(x[:2])
    _stale(model)
    p = np.asarray(model.predict(x, batch_size=BATCH, verbose=0)["a"], np.float64).max(1)
    assert (p > 0.4).mean() != (p > 0.5).mean()  # the threshold matters on these data

    report = eg.diagnose(model, data, batch_size=BATCH, progress=False)

    assert metric.name == "hit_rate" and float(metric.count.numpy()) == 0.0
    want = _evaluate(model, data)
    _assert_close(_mode(report, "E"), want, "E")
    assert _mode(report, "E")["a_hit_rate"] == pytest.approx((p > 0.4).mean(), abs=1e-7)


def test_a_metric_that_gives_a_vector_is_left_out_with_a_note():
    """F1Score() (average=None) gives one value per class: named in a note with its shape and the fix; the loss
    and accuracy are evaluate's; asked as primary=, it is a DataError with that advice."""
    x = _features()
    y = np.eye(4, dtype="float32")[_classes(x)]

    def build():
        return _functional(layers.Dense(4, activation="softmax"), loss="categorical_crossentropy",
                           metrics=["accuracy", keras.metrics.F1Score()])

    model = build()
    model(x[:2])
    _stale(model)
    logs = model.evaluate(x, y, batch_size=BATCH, return_dict=True, verbose=0)
    assert np.shape(logs["f1_score"]) == (4,)

    report = eg.diagnose(model, (x, y), batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), {k: float(v) for k, v in logs.items() if k != "f1_score"}, "E")
    note = next((n for n in report.notes if "'f1_score'" in n), "")
    assert "(4,)" in note and "left out" in note and "average='macro'" in note, report.notes
    with pytest.raises(evalgap.DataError, match=r"primary='f1_score'.*\(4,\).*average='macro'"):
        eg.diagnose(build(), (x, y), batch_size=BATCH, primary="f1_score", progress=False)


def test_a_custom_metric_under_mirrored_strategy_is_measured_as_evaluate_does():
    """A custom metric created in a MirroredStrategy's scope (replica-local variables) is measured with its own
    threshold, as the mirrored model's evaluate and a float64 NumPy reference give it, and its state put back."""
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs 2 logical CPU devices, configured by conftest before TensorFlow starts (run tests/tf_keras alone)")
    x = _features()
    y = _classes(x)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _functional(layers.Dense(4, activation="softmax"), loss="sparse_categorical_crossentropy",
                            metrics=[HitRate(threshold=0.4)])
    model(x[:2])
    _stale(model)
    want = _evaluate(model, (x, y))
    p = np.asarray(model.predict(x, batch_size=BATCH, verbose=0), np.float64).max(1)
    assert (p > 0.4).mean() != (p > 0.5).mean()
    metric_state = _metric_state(model)

    report = eg.diagnose(model, (x, y), batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), want, "E")
    assert _mode(report, "E")["hit_rate"] == pytest.approx((p > 0.4).mean(), abs=1e-7)
    assert _metric_state(model) == metric_state


def test_an_overridden_test_step_is_named_in_a_note():
    """A model whose test_step scores 2 * y_pred: evaluate differs from E, a note says why, and E is the compiled loss
    as Keras's own test_step computes it (evaluate of a plain functional model on the same layers)."""

    class Doubled(keras.Model):
        def test_step(self, data):
            x, y = data
            loss = self.compiled_loss(y, 2.0 * self(x, training=False), regularization_losses=self.losses)
            return {"loss": loss}

    x = _features()
    data = (x, _regression(x)[:, None])
    inp = keras.Input((6,))
    out = layers.Dense(1)(_trunk(inp))
    model = Doubled(inp, out)
    model.compile(loss="mse")
    _stale(model)
    plain = keras.Model(inp, out)
    plain.compile(loss="mse")
    want = _evaluate(plain, data)
    assert not np.isclose(_evaluate(model, data)["loss"], want["loss"], rtol=1e-3)

    report = eg.diagnose(model, data, batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), want, "E")
    assert any("overrides test_step" in n and "evaluate" in n for n in report.notes), report.notes


def test_a_masked_output_is_scored_over_its_real_positions_as_evaluate_scores_it():
    """A padded-sequence tagger whose output carries the padding mask (Embedding(mask_zero=True)): evaluate weights
    the loss and metrics by the mask, which a compiled step drops; E equals evaluate and the float64 NumPy masked
    accuracy of predict (E was the accuracy over every position)."""
    rng = np.random.default_rng(0)
    n, length, vocab, classes = 64, 10, 20, 4
    x = rng.integers(1, vocab, (n, length)).astype("int32")
    for i, real in enumerate(rng.integers(3, length + 1, n)):
        x[i, real:] = 0
    y = rng.integers(0, classes, (n, length))
    inp = keras.Input((length,), dtype="int32")
    h = layers.LSTM(8, return_sequences=True)(layers.Embedding(vocab, 8, mask_zero=True)(inp))
    model = keras.Model(inp, layers.Dense(classes, activation="softmax")(layers.BatchNormalization(momentum=0.5)(h)))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    expected = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    hits = np.asarray(model.predict(x, batch_size=16, verbose=0)).argmax(-1) == y

    report = eg.diagnose(model, (x, y), batch_size=16, shuffle=False, progress=False)

    _assert_close(_mode(report, "E"), {k: float(v) for k, v in expected.items()}, "E")
    assert _mode(report, "E")["accuracy"] == pytest.approx(hits[x != 0].mean(), abs=1e-6)


# ---------------------------------------------------------------------------------
# integer targets: class indices only for Keras's sparse losses and metrics
# ---------------------------------------------------------------------------------
def _masked_sparse_ce(y_true, y_pred):
    """The user's own segmentation loss: sparse cross-entropy from logits that skips the void label 255 (no
    ``ignore_class`` attribute anywhere)."""
    y_true = tf.cast(y_true, "int32")
    keep = tf.cast(y_true != 255, "float32")
    loss = keras.losses.sparse_categorical_crossentropy(tf.where(y_true == 255, 0, y_true), y_pred, from_logits=True)
    return tf.reduce_sum(loss * keep) / tf.maximum(tf.reduce_sum(keep), 1.0)


def _gaussian_nll(y_true, y_pred):
    """The user's own heteroscedastic regression loss: outputs (mean, log-variance), integer count targets (n,)."""
    y_true = tf.reshape(tf.cast(y_true, "float32"), (-1,))
    return tf.reduce_mean(0.5 * (y_pred[:, 1] + (y_true - y_pred[:, 0]) ** 2 / tf.exp(y_pred[:, 1])))


def _segmentation_with_void(classes=4):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, classes, (64, 8, 8))
    y[:, :2] = 255
    inp = keras.Input((8, 8, 3))
    h = layers.BatchNormalization(momentum=0.9)(layers.Conv2D(8, 3, padding="same")(inp))
    model = keras.Model(inp, layers.Conv2D(classes, 1)(h))
    model.compile(optimizer="sgd", loss=_masked_sparse_ce)
    return model, (x, y)


def _counts_with_mean_and_log_variance():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.integers(0, 20, 64)
    inp = keras.Input((5,))
    model = keras.Model(inp, layers.Dense(2)(layers.BatchNormalization(momentum=0.9)(layers.Dense(8)(inp))))
    model.compile(optimizer="sgd", loss=_gaussian_nll)
    return model, (x, y)


@pytest.mark.parametrize("build", [_segmentation_with_void, _counts_with_mean_and_log_variance], ids=["void-255", "counts"])
def test_integer_targets_a_users_loss_reads_are_measured_as_evaluate_measures_them(build):
    """A compiled loss of the user's own whose integer targets are not class indices (segmentation labels with a void
    255 its code skips; counts for a (mean, log-variance) output): evaluate measures it, so E equals evaluate, key by
    key (diagnose refused them: "labels must be class indices in [0, 4)"), for arrays and tf.data alike."""
    model, (x, y) = build()
    want = {k: float(v) for k, v in model.evaluate(x, y, batch_size=BATCH, return_dict=True, verbose=0).items()}
    assert all(np.isfinite(v) for v in want.values()), want
    _assert_close(_mode(eg.diagnose(model, (x, y), batch_size=BATCH, progress=False), "E"), want, "E")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    _assert_close(_mode(eg.diagnose(model, data, progress=False), "E"), want, "E (tf.data)")


def _logit_penalty(y_true, y_pred):
    """A user's loss that does not read its targets."""
    return tf.reduce_mean(tf.square(y_pred), axis=-1)


SPARSE_COMPILES = {
    "loss-name": dict(loss="sparse_categorical_crossentropy"),
    "loss-object": dict(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    "loss-function": dict(loss=keras.losses.sparse_categorical_crossentropy),
    "metric-name": dict(loss=_logit_penalty, metrics=["sparse_categorical_accuracy"]),
    "metric-top-k": dict(loss=_logit_penalty, metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=2)]),
    "metric-mean-iou": dict(loss=_logit_penalty, metrics=[keras.metrics.MeanIoU(3, sparse_y_pred=False)]),
}


@pytest.mark.parametrize("spec", list(SPARSE_COMPILES.values()), ids=list(SPARSE_COMPILES))
def test_labels_out_of_range_are_refused_where_a_keras_sparse_loss_or_metric_reads_them(spec):
    """Keras's sparse cross-entropy (by name, object, function) or a sparse metric (accuracy, top-k, IoU) reads the
    targets as class indices: labels 3 and 4 for 3 classes are a DataError naming the range, for arrays, (n, 1)
    labels and batches given as tensors alike (these went to the loss unchecked: an op error or garbage)."""
    x = _features()[:64]
    y = _classes(x, 3) + 2
    model = _functional(layers.Dense(3), **spec)
    tensors = [(tf.constant(x[i:i + BATCH]), tf.constant(y[i:i + BATCH])) for i in range(0, 64, BATCH)]
    for data, size in [((x, y), BATCH), ((x, y[:, None]), BATCH), (tensors, None)]:
        with pytest.raises(evalgap.DataError, match=r"labels must be class indices in \[0, 3\).*\[2, 4\]"):
            eg.diagnose(model, data, batch_size=size, progress=False)
