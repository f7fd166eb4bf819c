"""evalgap.keras.diagnose measures the model's OWN compiled loss and metrics, as fit/evaluate do.

For a bank of compiled models (each with BatchNormalization, trained one short epoch so
that the moving statistics are not the population's):

* E (evaluation mode, current moving statistics) equals ``model.evaluate(...)``;
* P (evaluation mode, population statistics) equals ``evaluate`` after
  ``evalgap.keras.recalibrate`` on the same data and batch size (on the model with the
  weights it had before diagnose restored);
* the metric names are exactly the keys ``evaluate(..., return_dict=True)`` returns;
* the model is left exactly as it was.

Sample counts are multiples of the batch size, so every batch is whole and the order in
which diagnose draws the batches cannot change any value.

Keras semantics the references rely on (Keras 3.15):

* keys: single output -> ``loss`` and each metric's name (``accuracy``, ``auc``,
  ``precision``, ``f1_score``, the custom metric's name, ...); two outputs named a and b
  (list or dict) -> ``loss``, ``a_loss``, ``b_loss``, ``a_accuracy``, ``b_mae``; a weighted
  metric is renamed ``weighted_<name>`` only when a plain metric has the same name;
* ``loss`` = sum over outputs of ``loss_weight * <output>_loss`` (the ``<output>_loss``
  are unweighted) + ``sum(model.losses)`` (the regularization), in evaluate as in fit;
* with sample weights, each batch's loss is ``sum(w * l) / batch_size`` (not / sum(w)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

import keras
from keras import layers, ops

import evalgap
import evalgap.keras as eg
from evalgap import DataError

from ._reference import snapshot

N = 128
BATCH = 32
RTOL = 1e-5
ATOL = 1e-6  # floor for values near 0 (e.g. a precision of 0)


class MeanAbsoluteGap(keras.metrics.Metric):
    """A custom stateful metric: mean over samples of mean |y_true - y_pred| over the last axis."""

    def __init__(self, name="mean_abs_gap", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true, self.dtype)
        y_pred = ops.cast(y_pred, self.dtype)
        err = ops.mean(ops.abs(y_true - y_pred), axis=-1)
        self.total.assign_add(ops.sum(err))
        self.count.assign_add(ops.sum(ops.ones_like(err)))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


# ---------------------------------------------------------------------------------
# data: features far from mean 0 / variance 1, so that the moving statistics after one
# short epoch (initialized at 0 and 1) are far from the population's
# ---------------------------------------------------------------------------------
def _rng(seed=0):
    return np.random.default_rng(seed)


def _features(n=N, d=6, seed=0):
    return _rng(seed).normal(2.0, 3.0, (n, d)).astype("float32")


def _images(n=N, seed=0):
    return _rng(seed).normal(1.0, 2.0, (n, 8, 8, 1)).astype("float32")


def _binary(x):
    return (x[:, 0] + x[:, 1] > 4.0).astype("float32")


def _classes(x, k=4):
    return (np.floor(x[:, 0] - x[:, 2]) % k).astype("int64")


def _one_hot(labels, k=4):
    return np.eye(k, dtype="float32")[labels]


def _regression(x):
    return (0.5 * x[:, 0] - 0.3 * x[:, 1] + 0.1 * x[:, 2] ** 2).astype("float32")


def _weights(n=N, seed=1):
    return _rng(seed).uniform(0.1, 3.0, n).astype("float32")


# ---------------------------------------------------------------------------------
# models: each builder returns a new compiled model (optimizer "adam") with fresh metric
# objects and at least one BatchNormalization layer (momentum 0.9)
# ---------------------------------------------------------------------------------
def _trunk(inp, units=8, reg=None):
    h = layers.Dense(units, kernel_regularizer=reg)(inp)
    h = layers.BatchNormalization(momentum=0.9)(h)
    return layers.ReLU()(h)


def _sequential(head, d=6, **compile_args):
    model = keras.Sequential(
        [keras.Input((d,)), layers.Dense(8), layers.BatchNormalization(momentum=0.9), layers.ReLU(), head]
    )
    model.compile(optimizer="adam", **compile_args)
    return model


def _functional(head, **compile_args):
    inp = keras.Input((6,))
    model = keras.Model(inp, head(_trunk(inp)))
    model.compile(optimizer="adam", **compile_args)
    return model


def _two_outputs(as_dict: bool):
    inp = keras.Input((6,))
    h = _trunk(inp)
    a = layers.Dense(3, activation="softmax", name="a")(h)
    b = layers.Dense(1, name="b")(layers.BatchNormalization(momentum=0.9)(layers.Dense(4)(h)))
    if as_dict:
        model = keras.Model(inp, {"a": a, "b": b})
        model.compile(
            optimizer="adam",
            loss={"a": "sparse_categorical_crossentropy", "b": keras.losses.Huber()},
            loss_weights={"a": 1.0, "b": 0.5},
            metrics={"a": ["accuracy"], "b": ["mae"]},
        )
    else:
        model = keras.Model(inp, [a, b])
        model.compile(
            optimizer="adam",
            loss=["sparse_categorical_crossentropy", keras.losses.Huber()],
            loss_weights=[1.0, 0.5],
            metrics=[["accuracy"], ["mae"]],
        )
    return model


def _l2_conv():
    reg = keras.regularizers.L2(1e-2)
    inp = keras.Input((8, 8, 1))
    h = layers.Conv2D(4, 3, padding="same", kernel_regularizer=reg)(inp)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.ReLU()(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = _trunk(h, reg=reg)
    out = layers.Dense(4, activation="softmax", kernel_regularizer=reg)(h)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@dataclass
class Case:
    build: Callable[[], Any]
    data: Callable[[], tuple]  # (x, y) or (x, y, sample_weight)


def _xy(y_of):
    def data():
        x = _features()
        return x, y_of(x)

    return data


def _xyw(y_of):
    def data():
        x = _features()
        return x, y_of(x), _weights()

    return data


def _two_output_data(as_dict):
    def data():
        x = _features()
        ya, yb = _classes(x, 3), _regression(x)  # yb is (n,) for the (n, 1) output
        return x, ({"a": ya, "b": yb} if as_dict else [ya, yb])

    return data


CASES = {
    "binary-sigmoid-y1d": Case(
        lambda: _sequential(layers.Dense(1, activation="sigmoid"), loss="binary_crossentropy", metrics=["accuracy"]),
        _xy(_binary),
    ),
    "binary-sigmoid-y2d": Case(
        lambda: _sequential(layers.Dense(1, activation="sigmoid"), loss="binary_crossentropy", metrics=["accuracy"]),
        _xy(lambda x: _binary(x)[:, None]),
    ),
    "onehot-softmax-f1-custom": Case(
        lambda: _functional(
            layers.Dense(4, activation="softmax"),
            loss="categorical_crossentropy",
            metrics=[
                "accuracy",
                keras.metrics.TopKCategoricalAccuracy(k=2),
                keras.metrics.F1Score(average="macro"),
                MeanAbsoluteGap(),
            ],
        ),
        _xy(lambda x: _one_hot(_classes(x))),
    ),
    "sparse-from-logits": Case(
        lambda: _functional(
            layers.Dense(4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2)],
        ),
        _xy(_classes),
    ),
    "multilabel-sigmoid": Case(
        lambda: _functional(
            layers.Dense(3, activation="sigmoid"),
            loss="binary_crossentropy",
            metrics=["auc", keras.metrics.Precision(), keras.metrics.Recall()],
        ),
        _xy(lambda x: (x[:, :3] > 2.0).astype("float32")),
    ),
    "mse-y1d": Case(lambda: _sequential(layers.Dense(1), loss="mse", metrics=["mae"]), _xy(_regression)),
    "mae-y2d": Case(
        lambda: _sequential(layers.Dense(1), loss="mae", metrics=[keras.metrics.RootMeanSquaredError()]),
        _xy(lambda x: _regression(x)[:, None]),
    ),
    "two-outputs-list": Case(lambda: _two_outputs(as_dict=False), _two_output_data(as_dict=False)),
    "two-outputs-dict": Case(lambda: _two_outputs(as_dict=True), _two_output_data(as_dict=True)),
    # keys: accuracy (plain), weighted_accuracy (weighted, renamed: same name as a plain one),
    # sparse_top_k_categorical_accuracy (weighted, not renamed)
    "sample-weights": Case(
        lambda: _functional(
            layers.Dense(4, activation="softmax"),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            weighted_metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2)],
        ),
        _xyw(_classes),
    ),
    "l2-regularized-conv-dense": Case(_l2_conv, lambda: (_images(), _classes(_images().reshape(N, -1)))),
}


# ---------------------------------------------------------------------------------
def _evaluate(model, data) -> dict[str, float]:
    x, y, *w = data
    logs = model.evaluate(x, y, sample_weight=w[0] if w else None, batch_size=BATCH, return_dict=True, verbose=0)
    return {k: float(np.asarray(v)) for k, v in logs.items()}


def _fit(model, data, epochs=1):
    x, y, *w = data
    return model.fit(x, y, sample_weight=w[0] if w else None, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)


def _mode(report, mode) -> dict[str, float]:
    """``values[mode]`` of every metric (NaN where the mode is missing, so that it fails visibly)."""
    return {k: float(d.values.get(mode, np.nan)) for k, d in report.decompositions.items()}


def _assert_close(got: dict[str, float], want: dict[str, float], what: str):
    assert set(got) == set(want), f"{what}: metric names {sorted(got)} != evaluate's {sorted(want)}"
    bad = {k: (got[k], want[k]) for k in want if not np.isclose(got[k], want[k], rtol=RTOL, atol=ATOL)}
    assert not bad, f"{what} differs from evaluate (got, want): {bad}"


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_E_and_P_equal_evaluate(case):
    data = case.data()
    model = case.build()
    _fit(model, data)
    weights = model.get_weights()
    want_e = _evaluate(model, data)

    before = snapshot(model)
    report = eg.diagnose(model, data, batch_size=BATCH, progress=False)
    after = snapshot(model)

    # the P reference: evaluate after recalibrate, from the weights as they were before
    # diagnose, on the same model object rather than a copy: a rebuilt model gets other
    # auto-generated metric names (precision_1), keras.models.clone_model of a compiled
    # functional model fails on the unregistered custom metric (it recompiles from the
    # serialized config), and a copy costs another compilation
    model.set_weights(weights)
    assert _evaluate(model, data) == want_e, "evaluate is not reproducible after set_weights"
    eg.recalibrate(model, data, batch_size=BATCH, progress=False)
    want_p = _evaluate(model, data)
    # the test is not trivial: the moving statistics after fit are not the population's
    assert not np.isclose(want_p["loss"], want_e["loss"], rtol=1e-3), (want_p, want_e)

    assert set(report.decompositions) == set(want_e), (sorted(report.decompositions), sorted(want_e))
    _assert_close(_mode(report, "E"), want_e, "E")
    _assert_close(_mode(report, "P"), want_p, "P")
    assert after == before, "diagnose changed the model"


# ---------------------------------------------------------------------------------
def test_gap_is_fit_minus_evaluate():
    data = _xy(_classes)()
    model = _functional(
        layers.Dense(4, activation="softmax"), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    history = _fit(model, data, epochs=2)
    want_e = _evaluate(model, data)
    fit_last = {k: float(v[-1]) for k, v in history.history.items()}

    report = eg.diagnose(model, data, batch_size=BATCH, history=history, progress=False)

    assert set(report.decompositions) == set(want_e) == set(fit_last)
    _assert_close(_mode(report, "E"), want_e, "E")
    _assert_close(_mode(report, "F"), fit_last, "F")
    assert report.primary == "accuracy"
    d = report.decompositions["accuracy"]
    assert report.gap == pytest.approx(d.values["F"] - d.values["E"], abs=1e-6)
    assert report.gap == pytest.approx(fit_last["accuracy"] - want_e["accuracy"], abs=1e-6)


def _binary_model(metrics):
    return _sequential(layers.Dense(1, activation="sigmoid"), loss="binary_crossentropy", metrics=metrics)


def test_primary_metric_rule():
    data = _xy(lambda x: _binary(x)[:, None])()  # (n, 1) labels: the rank is tested in the bank

    def diagnose(metrics, **kw):
        return eg.diagnose(_binary_model(metrics), data, batch_size=BATCH, progress=False, **kw)

    assert diagnose(["auc", "accuracy"]).primary == "accuracy"  # accuracy-like first
    assert diagnose(["auc"]).primary == "auc"  # else the first compiled metric, not the loss
    assert diagnose([]).primary == "loss"  # else the loss
    report = diagnose(["auc", "accuracy"], primary="auc")
    assert report.primary == "auc"
    d = report.decompositions["auc"]
    assert report.gap == pytest.approx(d.values["T"] - d.values["E"], abs=1e-12)
    with pytest.raises(evalgap.DataError) as raised:
        diagnose(["auc", "accuracy"], primary="nope")
    message = str(raised.value)
    assert "nope" in message and all(name in message for name in ("loss", "auc", "accuracy")), message


def test_per_output_losses_with_a_ragged_last_batch_are_sample_means():
    """97 samples in batches of 32: each output's loss in E is its mean over the 97 samples (a float64 NumPy
    reference from the model's own predictions), and the total equals evaluate's. (Keras 3.15 on TensorFlow
    reports per-output losses in ``evaluate`` that miss this when the last batch is smaller; its total is
    right. The other backends agree with the reference, which is checked where they do.)"""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    h = layers.BatchNormalization(momentum=0.9)(layers.Dense(8, activation="relu")(inp))
    model = keras.Model(inp, {"a": layers.Dense(1, name="a")(h), "b": layers.Dense(1, name="b")(h)})
    model.compile(optimizer="adam", loss={"a": "mse", "b": "mse"})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(97, 4)).astype("float32")
    y = {"a": rng.normal(size=(97, 1)).astype("float32"), "b": 3 * rng.normal(size=(97, 1)).astype("float32")}
    pred = model.predict(x, batch_size=32, verbose=0)
    want = {f"{k}_loss": float(np.mean((np.asarray(pred[k], np.float64) - y[k]) ** 2)) for k in ("a", "b")}
    report = eg.diagnose(model, (x, y), batch_size=32, shuffle=False, progress=False)
    got = _mode(report, "E")
    for k, v in want.items():
        assert np.isclose(got[k], v, rtol=RTOL), (k, got[k], v)
    logs = {k: float(np.asarray(v)) for k, v in model.evaluate(x, y, batch_size=32, return_dict=True, verbose=0).items()}
    assert np.isclose(got["loss"], logs["loss"], rtol=RTOL) and np.isclose(got["loss"], sum(want.values()), rtol=RTOL)
    if keras.backend.backend() != "tensorflow":
        assert all(np.isclose(got[k], logs[k], rtol=RTOL) for k in want), (got, logs)


# ---------------------------------------------------------------------------------
class HitRate(keras.metrics.Metric):
    """The common custom-metric pattern: a constructor argument with a default, no ``get_config``."""

    def __init__(self, threshold=0.5, name="hit_rate", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.hits = self.add_variable(shape=(), initializer="zeros", name="hits")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        p = ops.sum(ops.cast(y_true, y_pred.dtype) * y_pred, axis=-1)  # the true class's probability
        self.hits.assign_add(ops.sum(ops.cast(p > self.threshold, "float32")))
        self.count.assign_add(ops.cast(ops.shape(p)[0], "float32"))

    def result(self):
        return ops.divide_no_nan(self.hits, self.count)


def test_a_custom_metric_keeps_its_constructor_arguments():
    """HitRate(threshold=0.2) is measured at 0.2, not at its default 0.5 (a copy from its config), and its own
    state is put back: E equals evaluate and the float64 NumPy reference."""
    x = _features()
    y = _one_hot(_classes(x))
    metric = HitRate(threshold=0.2)
    model = _functional(layers.Dense(4, activation="softmax"), loss="categorical_crossentropy", metrics=[metric])
    want = _evaluate(model, (x, y))
    p = (np.asarray(model.predict(x, batch_size=BATCH, verbose=0), np.float64) * y).sum(1)
    assert (p > 0.2).mean() != (p > 0.5).mean()  # the threshold matters on these data
    state = [np.asarray(v.numpy()).tobytes() for v in metric.variables]

    report = eg.diagnose(model, (x, y), batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), want, "E")
    assert _mode(report, "E")["hit_rate"] == pytest.approx((p > 0.2).mean(), abs=1e-7)
    assert [np.asarray(v.numpy()).tobytes() for v in metric.variables] == state, "the metric's state was not put back"


def test_a_metric_that_gives_a_vector_is_left_out_with_a_note():
    """F1Score() (average=None) and Recall(thresholds=[0.3, 0.7]) give one value per class / threshold: each is
    named in a note with its shape and the fix; the loss and accuracy are measured as evaluate gives them; asked
    as primary=, it is a DataError with that advice."""
    x = _features()
    y = _one_hot(_classes(x))

    def build():
        return _functional(layers.Dense(4, activation="softmax"), loss="categorical_crossentropy",
                           metrics=["accuracy", keras.metrics.F1Score(), keras.metrics.Recall(thresholds=[0.3, 0.7])])

    model = build()
    logs = model.evaluate(x, y, batch_size=BATCH, return_dict=True, verbose=0)
    assert np.shape(logs["f1_score"]) == (4,) and np.shape(logs["recall"]) == (2,)
    scalars = {k: float(v) for k, v in logs.items() if np.size(v) == 1}

    report = eg.diagnose(model, (x, y), batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), scalars, "E")
    for name, shape in (("f1_score", "(4,)"), ("recall", "(2,)")):
        note = next((n for n in report.notes if f"'{name}'" in n), None)
        assert note is not None and shape in note and "left out" in note, report.notes
    assert any("average='macro'" in n for n in report.notes) and any("one threshold" in n for n in report.notes)
    with pytest.raises(evalgap.DataError, match=r"primary='f1_score'.*\(4,\).*average='macro'"):
        eg.diagnose(build(), (x, y), batch_size=BATCH, primary="f1_score", progress=False)


def test_directions_keras_states_win_over_the_names():
    """poisson, msle and an MAE renamed "l1" shrink as the model improves: each decomposition says so, and the
    report's worse_by is E - T (a higher error in evaluation mode is worse)."""
    x = _features()
    y = np.abs(_regression(x))[:, None] + 1.0
    model = _functional(layers.Dense(1, activation="softplus"), loss="mse",
                        metrics=["poisson", "msle", keras.metrics.MeanAbsoluteError(name="l1"), keras.metrics.R2Score()])
    report = eg.diagnose(model, (x, y), batch_size=BATCH, primary="l1", progress=False)
    directions = {k: d.higher_is_better for k, d in report.decompositions.items()}
    assert directions == {"loss": False, "poisson": False, "msle": False, "l1": False, "r2_score": True}
    d = report.decompositions["l1"]
    assert abs(d.values["T"] - d.values["E"]) > 1e-3  # stale statistics: the sign matters
    assert report.worse_by() == pytest.approx(d.values["E"] - d.values["T"], abs=1e-12)


def test_function_metrics_get_backend_tensors():
    """A loss and a metric written with keras.ops (``yt - yp``) get the targets as backend tensors, as in evaluate
    (Keras on torch: NumPy minus a tensor failed); E equals evaluate and the float64 NumPy reference. Targets
    given in float64 are cast to floatx as Keras's data adapter casts them."""

    def my_loss(yt, yp):
        return ops.mean(ops.square(yt - yp), axis=-1)

    def my_metric(yt, yp):
        return ops.mean(ops.abs(yt - yp), axis=-1)

    x = _features()
    y = _regression(x).astype("float64")[:, None]
    model = _functional(layers.Dense(1), loss=my_loss, metrics=[my_metric])
    want = _evaluate(model, (x, y))
    pred = np.asarray(model.predict(x, batch_size=BATCH, verbose=0), np.float64)

    report = eg.diagnose(model, (x, y), batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), want, "E")
    assert _mode(report, "E")["my_metric"] == pytest.approx(np.abs(y - pred).mean(), rel=1e-5)


# ---------------------------------------------------------------------------------
class ExtraLoss(keras.Model):
    """Overrides compute_loss: the compiled loss (regularization included) plus 0.5 mean(y_pred**2), tracked by its
    own Mean (a state diagnose must not change)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = keras.metrics.Mean(name="extra")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        extra = 0.5 * ops.mean(ops.square(y_pred))
        self.extra.update_state(extra)
        return super().compute_loss(x, y, y_pred, sample_weight, training) + extra


def test_an_overridden_compute_loss_is_the_loss_of_every_mode():
    """E's loss is the override's, as evaluate gives it, and P's is evaluate's after recalibrate; the mae metric is
    unchanged; neither the weights nor the override's own tracker change."""
    x = _features()
    y = _regression(x)[:, None]
    inp = keras.Input((6,))
    model = ExtraLoss(inp, layers.Dense(1)(_trunk(inp, reg=keras.regularizers.L2(0.01))))
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    _fit(model, (x, y))
    weights = model.get_weights()
    want_e = _evaluate(model, (x, y))
    pred = np.asarray(model.predict(x, batch_size=BATCH, verbose=0), np.float64)
    compiled = np.mean((pred - y) ** 2) + sum(float(ops.convert_to_numpy(v)) for v in model.losses)
    assert want_e["loss"] == pytest.approx(compiled + 0.5 * np.mean(pred ** 2), rel=1e-4)  # evaluate calls the override
    before, tracked = snapshot(model), [np.asarray(v.numpy()).tobytes() for v in model.extra.variables]

    report = eg.diagnose(model, (x, y), batch_size=BATCH, progress=False)

    assert snapshot(model) == before and [np.asarray(v.numpy()).tobytes() for v in model.extra.variables] == tracked
    model.set_weights(weights)
    eg.recalibrate(model, (x, y), batch_size=BATCH, progress=False)
    want_p = _evaluate(model, (x, y))
    for mode, want in (("E", want_e), ("P", want_p)):
        got = _mode(report, mode)
        _assert_close({k: got[k] for k in ("loss", "mae")}, {k: want[k] for k in ("loss", "mae")}, mode)
    assert any("overrides compute_loss" in n for n in report.notes), report.notes


def test_an_overridden_test_step_is_named_in_a_note():
    """A model whose test_step scores something else: a note says evaluate may differ from E, and E is the compiled
    loss as Keras's own test_step computes it (evaluate of a plain functional model on the same layers)."""

    class Doubled(keras.Model):
        def test_step(self, *args):  # stands for code scoring something else (its signature differs on jax)
            raise NotImplementedError

    x = _features()
    y = _regression(x)[:, None]
    inp = keras.Input((6,))
    out = layers.Dense(1)(_trunk(inp))
    model = Doubled(inp, out)
    model.compile(optimizer="adam", loss="mse")
    _fit(model, (x, y))
    plain = keras.Model(inp, out)
    plain.compile(loss="mse")
    want = _evaluate(plain, (x, y))

    report = eg.diagnose(model, (x, y), batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), want, "E")
    assert any("overrides test_step" in n and "evaluate" in n for n in report.notes), report.notes


class EndpointMSE(layers.Layer):
    """An endpoint layer: adds mean((p - t)**2) with add_loss and returns p."""

    def call(self, inputs):
        p, t = inputs
        self.add_loss(ops.mean(ops.square(p - t)))
        return p


@pytest.mark.parametrize("targets", ["placeholder", "none"])
def test_a_loss_from_add_loss_alone_is_measured_as_evaluate_measures_it(targets):
    """compile(loss=None), the loss added by an endpoint layer: the model is compiled (no "not compiled" defaults, no
    error); with placeholder targets, or the inputs alone as fit([x, t]) takes them (diagnose refused them: "needs
    targets"), E's loss equals evaluate's and the float64 NumPy mean squared error."""
    x = _features()
    t = _regression(x)[:, None]
    inp, target = keras.Input((6,)), keras.Input((1,))
    model = keras.Model([inp, target], EndpointMSE()([layers.Dense(1)(_trunk(inp)), target]))
    model.compile(optimizer="adam", loss=None)
    model.fit([x, t], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    want = {k: float(v) for k, v in model.evaluate([x, t], batch_size=BATCH, return_dict=True, verbose=0).items()}
    pred = np.asarray(model.predict([x, t], batch_size=BATCH, verbose=0), np.float64)

    data = ([x, t], np.zeros_like(t)) if targets == "placeholder" else ([x, t],)  # (x,): fit([x, t])
    report = eg.diagnose(model, data, batch_size=BATCH, progress=False)

    _assert_close(_mode(report, "E"), want, "E")
    assert _mode(report, "E")["loss"] == pytest.approx(np.mean((pred - t) ** 2), rel=1e-5)
    assert not any("not compiled" in n for n in report.notes), report.notes


@pytest.mark.parametrize("regularized", [False, True])
def test_a_model_without_any_loss_still_needs_targets(regularized):
    """compile(optimizer) alone and no add_loss (a custom train_step, say), with or without weight regularization
    (the same for any input): there is no loss to measure from the inputs alone, so diagnose asks for targets (it
    reported a loss of 0, or the L2 penalty, in every mode)."""
    x = _features()
    inp = keras.Input((6,))
    reg = keras.regularizers.L2(0.1) if regularized else None
    model = keras.Model(inp, layers.Dense(1, kernel_regularizer=reg)(_trunk(inp)))
    model.compile(optimizer="adam")
    with pytest.raises(DataError, match="needs targets"):
        eg.diagnose(model, (x,), batch_size=BATCH, progress=False)


# ---------------------------------------------------------------------------------
# integer targets: class indices only for Keras's sparse losses and metrics
# ---------------------------------------------------------------------------------
def _masked_sparse_ce(y_true, y_pred):
    """The user's own segmentation loss: sparse cross-entropy from logits that skips the void label 255 (no
    ``ignore_class`` attribute anywhere)."""
    y_true = ops.cast(y_true, "int32")
    keep = ops.cast(y_true != 255, "float32")
    loss = keras.losses.sparse_categorical_crossentropy(ops.where(y_true == 255, 0, y_true), y_pred, from_logits=True)
    return ops.sum(loss * keep) / ops.maximum(ops.sum(keep), 1.0)


def _gaussian_nll(y_true, y_pred):
    """The user's own heteroscedastic regression loss: outputs (mean, log-variance), integer count targets (n,)."""
    y_true = ops.reshape(ops.cast(y_true, "float32"), (-1,))
    return ops.mean(0.5 * (y_pred[:, 1] + (y_true - y_pred[:, 0]) ** 2 / ops.exp(y_pred[:, 1])))


def _segmentation_with_void(classes=4):
    rng = _rng(3)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, classes, (64, 8, 8))
    y[:, :2] = 255
    inp = keras.Input((8, 8, 3))
    h = layers.BatchNormalization(momentum=0.9)(layers.Conv2D(8, 3, padding="same")(inp))
    model = keras.Model(inp, layers.Conv2D(classes, 1)(h))
    model.compile(optimizer="sgd", loss=_masked_sparse_ce)
    return model, (x, y)


def _counts_with_mean_and_log_variance():
    rng = _rng(4)
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
    key (diagnose refused them: "labels must be class indices in [0, 4)"), for arrays and a list of batches alike."""
    model, (x, y) = build()
    want = {k: float(v) for k, v in model.evaluate(x, y, batch_size=BATCH, return_dict=True, verbose=0).items()}
    assert all(np.isfinite(v) for v in want.values()), want
    _assert_close(_mode(eg.diagnose(model, (x, y), batch_size=BATCH, progress=False), "E"), want, "E")
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    _assert_close(_mode(eg.diagnose(model, batches, progress=False), "E"), want, "E (a list of batches)")


def _logit_penalty(y_true, y_pred):
    """A user's loss that does not read its targets."""
    return ops.mean(ops.square(y_pred), axis=-1)


SPARSE_COMPILES = {
    "loss-name": dict(loss="sparse_categorical_crossentropy"),
    "loss-object": dict(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    "loss-function": dict(loss=keras.losses.sparse_categorical_crossentropy),
    "loss-list": dict(loss=["sparse_categorical_crossentropy"]),
    "metric-name": dict(loss=_logit_penalty, metrics=["sparse_categorical_accuracy"]),
    "metric-object": dict(loss=_logit_penalty, metrics=[keras.metrics.SparseCategoricalAccuracy()]),
    "metric-top-k": dict(loss=_logit_penalty, metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=2)]),
    "metric-mean-iou": dict(loss=_logit_penalty, metrics=[keras.metrics.MeanIoU(3, sparse_y_pred=False)]),
    "weighted-metric": dict(loss=_logit_penalty, weighted_metrics=["sparse_categorical_accuracy"]),
}


@pytest.mark.parametrize("spec", list(SPARSE_COMPILES.values()), ids=list(SPARSE_COMPILES))
def test_labels_out_of_range_are_refused_where_a_keras_sparse_loss_or_metric_reads_them(spec):
    """Keras's sparse cross-entropy (by name, object, function) or a sparse metric (accuracy, top-k, IoU) reads the
    targets as class indices: labels 3 and 4 for 3 classes are a DataError naming the range, for arrays, (n, 1)
    labels and batches given as tensors alike (these went to the loss unchecked: NaN, garbage or an op error)."""
    x = _features(64)
    y = _classes(x, 3) + 2
    model = _functional(layers.Dense(3), **spec)
    tensors = [(ops.convert_to_tensor(x[i:i + BATCH]), ops.convert_to_tensor(y[i:i + BATCH])) for i in range(0, 64, BATCH)]
    for data, size in [((x, y), BATCH), ((x, y[:, None]), BATCH), (tensors, None)]:
        with pytest.raises(DataError, match=r"labels must be class indices in \[0, 3\).*\[2, 4\]"):
            eg.diagnose(model, data, batch_size=size, progress=False)


def test_labels_out_of_range_for_the_uncompiled_default_are_refused_and_accuracy_alone_checks_nothing():
    """The uncompiled model's default (evalgap's sparse cross-entropy) checks the labels; a user's loss with Keras's
    generic ``"accuracy"`` (which takes the targets in whatever form they come) checks nothing: E equals evaluate."""
    x = _features(64)
    y = _classes(x, 3) + 2
    inp = keras.Input((6,))
    uncompiled = keras.Model(inp, layers.Dense(3)(_trunk(inp)))
    with pytest.raises(DataError, match=r"labels must be class indices in \[0, 3\)"):
        eg.diagnose(uncompiled, (x, y), batch_size=BATCH, progress=False)
    model = _functional(layers.Dense(3, activation="softmax"), loss=_logit_penalty, metrics=["accuracy"])
    want = {k: float(v) for k, v in model.evaluate(x, y, batch_size=BATCH, return_dict=True, verbose=0).items()}
    _assert_close(_mode(eg.diagnose(model, (x, y), batch_size=BATCH, progress=False), "E"), want, "E")
