"""The gap decomposition and the report, on hand-made numbers (no framework)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evalgap.attribution import choose_primary, decompose, higher_is_better, is_fraction
from evalgap.diagnosis import Context, InputScale, build_report
from evalgap.errors import DataError
from evalgap.keras.remedies import KerasRemedies
from evalgap.torch.remedies import TorchRemedies
from evalgap.recalibration import LayerRecalibration, Recalibration

unit = st.floats(0.0, 1.0, allow_nan=False)


@given(f=unit, t=unit, td=unit, p=unit, e=unit)
def test_terms_add_up_exactly_to_f_minus_e(f, t, td, p, e):
    d = decompose("accuracy", {"F": f, "T": t, "Td": td, "P": p, "E": e})
    assert list(d.terms) == ["epoch_average", "training_only_layers", "batch_statistics", "stale_moving_statistics"]
    assert sum(d.terms.values()) == pytest.approx(f - e, abs=1e-12)
    assert d.total == pytest.approx(f - e, abs=1e-15)


def test_without_f_the_sum_is_t_minus_e_and_validation_extends_it():
    d = decompose("loss", {"T": 0.5, "Td": 0.4, "P": 0.45, "E": 3.0, "E_val": 3.5})
    assert "epoch_average" not in d.terms and d.terms["data"] == pytest.approx(-0.5)
    assert sum(d.terms.values()) == pytest.approx(0.5 - 3.5)
    assert not d.higher_is_better and d.goodness(-1.0) == 1.0


def test_seed_numbers_epoch_7():
    # the seed: fit reported accuracy 0.7243, validation 0.2548 on the same data
    d = decompose("accuracy", {"F": 0.7243, "T": 0.74, "Td": 0.74, "P": 0.735, "E": 0.2548})
    assert 100 * d.total == pytest.approx(46.95)
    assert d.ranked()[0] == ("stale_moving_statistics", pytest.approx(0.4802))
    assert set(d.significant()) == {"stale_moving_statistics", "epoch_average"}  # |F - T| = 1.57 points > 1


def test_metric_names():
    assert higher_is_better("accuracy") and not higher_is_better("val_loss") and not higher_is_better("mse")
    assert is_fraction("sparse_categorical_accuracy") and not is_fraction("loss")


#: Keras's metric names (and common others) that shrink as the model improves, and ones that grow
LOWER = ["poisson", "logcosh", "log_cosh", "mape", "msle", "false_positives", "false_negatives", "hamming_distance", "nll",
         "kld", "mean_absolute_percentage_error", "val_poisson", "out_a_msle"]
HIGHER = ["accuracy", "auc", "mean_io_u", "r2_score", "cosine_similarity", "true_positives", "fbeta_score", "pearson_correlation"]
#: Keras's IoU metrics are named io_u; F-beta and AUROC are fractions too
FRACTIONS = ["mean_io_u", "io_u", "one_hot_io_u", "one_hot_mean_io_u", "binary_io_u", "auroc", "fbeta_score", "c_mean_io_u"]


def test_the_direction_of_keras_metric_names():
    assert [m for m in LOWER if higher_is_better(m)] == []
    assert [m for m in HIGHER if not higher_is_better(m)] == []
    assert [m for m in FRACTIONS if not is_fraction(m)] == []
    assert not any(is_fraction(m) for m in ("poisson", "false_positives", "r2_score", "loss"))


def test_a_lower_is_better_primary_is_worse_when_evaluation_mode_is_higher():
    """poisson T = 1.3846, E = 1.2837: evaluation mode scores better, so worse_by = E - T = -0.1009 (a CLI
    --fail-over 0 passes); msle T = 0.7531, E = 0.7833: worse by +0.0302."""
    values = {"poisson": {"T": 1.3846, "Td": 1.3846, "P": 1.30, "E": 1.2837}, "msle": {"T": 0.7531, "Td": 0.7531, "P": 0.76, "E": 0.7833}}
    for name, want in (("poisson", -0.1009), ("msle", 0.0302)):
        report = build_report({name: decompose(name, values[name])}, None, _keras_ctx(), primary=name)
        assert report.worse_by() == pytest.approx(want, abs=1e-12) and report.gap_points is None
        assert ("below" if want < 0 else "above") in report.headline()


def test_an_iou_gap_is_in_points():
    """mean_io_u T = 0.900, E = 0.584: 31.6 points worse (a CLI --fail-over 5 fails), the threshold 1 point."""
    d = decompose("mean_io_u", {"T": 0.900, "Td": 0.900, "P": 0.895, "E": 0.584})
    report = build_report({"mean_io_u": d}, None, _keras_ctx(), primary="mean_io_u")
    assert report.gap_points == pytest.approx(31.6) and report.worse_by() == pytest.approx(31.6)
    assert d.threshold() == 0.01 and "31.6 points below" in report.headline()


def test_a_direction_the_framework_states_wins_over_the_name():
    """A torchmetrics MeanAbsoluteError under the key "l1" states higher_is_better=False: T = 0.40, E = 0.52 is
    worse by 0.12; without the statement the name rule reads "l1" as higher-is-better."""
    values = {"T": 0.40, "Td": 0.41, "P": 0.45, "E": 0.52}
    assert decompose("l1", values).higher_is_better
    d = decompose("l1", values, higher_is_better=False)
    assert not d.higher_is_better and d.goodness(d.total) == pytest.approx(0.12)
    report = build_report({"l1": d}, None, _keras_ctx(), primary="l1")
    assert report.worse_by() == pytest.approx(0.12) and "0.12 above training" in report.headline()
    assert decompose("loss", values, higher_is_better=True).higher_is_better  # the statement wins both ways


def test_a_primary_the_adapter_left_out_is_refused_with_its_reason():
    why = "metric 'f1_score' gives 4 values (shape (4,)), not one number: compile it with average='macro'."
    with pytest.raises(DataError) as info:
        choose_primary(["loss", "accuracy"], ["accuracy"], "f1_score", left_out={"f1_score": why})
    assert why in str(info.value) and "primary='f1_score'" in str(info.value)
    assert choose_primary(["loss", "accuracy"], ["accuracy"], left_out={"f1_score": why}) == "accuracy"


def _recal():
    mean_after, var_after = np.array([100.0, 50.0]), np.array([900.0, 400.0])
    layer = LayerRecalibration("conv1_bn", "BatchNormalization", "measured", 2, 1e-3, samples=96,
                               mean_before=np.array([30.0, 20.0]), var_before=np.array([300.0, 200.0]),
                               mean_after=mean_after, var_after=var_after)
    return Recalibration("keras/jax", [layer], batches=1, samples=96, batch_size=96)


def test_report_names_causes_with_remedies_and_serializes(tmp_path):
    d = decompose("accuracy", {"F": 0.7243, "T": 0.74, "Td": 0.74, "P": 0.735, "E": 0.2548})
    ctx = Context(
        framework="keras/jax", remedies=KerasRemedies(), samples=2100, batch_size=96,
        input_scale=InputScale.measure(np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3)).astype("float32"), -1),
        momenta=[0.99] * 53, steps_per_epoch=22, epochs=7,
    )
    report = build_report({"accuracy": d}, _recal(), ctx)
    # F - T = -1.57 points narrows the 46.95-point gap: significant, but not a cause; information without a fix
    assert [k for k, _ in report.causes] == ["stale_moving_statistics"]
    average = report.finding("epoch_average")
    assert average.severity == "info" and average.remedy is None and "narrows the gap" in average.message
    stale = report.finding("stale_moving_statistics")
    assert stale.severity == "cause" and stale.numbers["updates"] == 154
    assert round(stale.numbers["initial_weight"], 2) == 0.21 and stale.numbers["advised_momentum"] == pytest.approx(0.9091, abs=1e-4)
    assert "evalgap.keras.recalibrate(model, train_data)" in stale.remedy and "momentum=0.9091" in stale.remedy
    assert report.finding("input_scale").severity == "warning"  # a setting, not a term: normalizing alone does not close the gap
    drift = report.finding("drift")
    # |30 - 100| / sqrt(900.001) = 2.333
    assert drift.numbers["first_layer"] == "conv1_bn" and drift.numbers["max_drift"] == pytest.approx(70 / np.sqrt(900.001))
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert data["schema"] == "evalgap.report/1" and data["gap_points"] == pytest.approx(46.95)
    assert {c["term"]: c["explains_gap"] for c in data["causes"] if c["significant"]} == {
        "stale_moving_statistics": True, "epoch_average": False}
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert "mean_before" not in data["layers"][0]
    text = str(report)
    assert "stale_moving_statistics" in text and "fix: import evalgap.keras" in text and "evalgap.keras.recalibrate(model, train_data)" in text
    assert "46.9 points" in text or "47.0 points" in text


def test_healthy_report_says_so():
    d = decompose("accuracy", {"T": 0.95, "Td": 0.95, "P": 0.948, "E": 0.947})
    report = build_report({"accuracy": d}, None, Context(framework="torch", remedies=TorchRemedies(), samples=10, batch_size=5))
    assert report.causes == [] and "No significant cause" in str(report)
    assert report.finding("no_batchnorm") is not None


def test_interrupted_writes_leave_no_half_file(tmp_path, monkeypatch):
    from evalgap import plots, report as report_module
    from evalgap._files import atomic_write_text

    target = tmp_path / "out.png"
    fig = plots.accuracy_by_epoch({"accuracy": [0.1, 0.2]}, "t")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(KeyboardInterrupt):
        plots.save_figure(fig, target)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    target = tmp_path / "r.json"
    target.write_text("previous")
    monkeypatch.setattr(report_module.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_cumulative_average_gets_momentum_advice_and_strict_json():
    """PyTorch's momentum=None: the statistics never forget, so a momentum is advised; no 'inf' in text or JSON."""
    d = decompose("accuracy", {"T": 0.9, "Td": 0.9, "P": 0.88, "E": 0.4})
    ctx = Context(framework="torch", remedies=TorchRemedies(), samples=640, batch_size=32, momenta=[None] * 3,
                  convention="torch", steps_per_epoch=20, epochs=5)
    stale = build_report({"accuracy": d}, None, ctx).finding("stale_moving_statistics")
    assert "cumulative average" in stale.message and "inf" not in stale.message
    assert stale.numbers["memory_updates"] is None and stale.numbers["mean_age_updates"] == pytest.approx(49.5)  # (100 - 1) / 2
    assert stale.numbers["too_slow"] and "m.momentum = 0.1" in stale.remedy  # 2 / 20 steps, in PyTorch's convention
    report = build_report({"accuracy": d}, None, ctx)
    report.decompositions["accuracy"].values["F"] = float("nan")
    strict = json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert strict["metrics"]["accuracy"]["values"]["F"] is None


def test_layers_that_never_update_get_no_ema_arithmetic():
    """PyTorch momentum 0 (Keras 1.0): the statistics never move; no memory of 'inf updates' is claimed."""
    d = decompose("accuracy", {"T": 0.9, "Td": 0.9, "P": 0.88, "E": 0.4})
    for convention, momentum in (("torch", 0.0), ("keras", 1.0)):
        ctx = Context(framework="x", remedies=TorchRemedies(), samples=640, batch_size=32, momenta=[momentum] * 2,
                      convention=convention, steps_per_epoch=20, epochs=5)
        stale = build_report({"accuracy": d}, None, ctx).finding("stale_moving_statistics")
        assert "inf" not in stale.message and "momentum" not in stale.numbers


def _keras_ctx(**kw):
    return Context(framework="keras/jax", remedies=KerasRemedies(), samples=960, batch_size=96, **kw)


def test_moving_statistics_that_score_better_are_not_given_a_fix():
    """Evaluation better than training: the moving statistics score 2.7 points better than the exact ones (P < E).
    That explains part of the gap's direction, but recalibrating would lower validation: no fix offered, anywhere."""
    d = decompose("accuracy", {"T": 0.80, "Td": 0.80, "P": 0.8535, "E": 0.8809})
    report = build_report({"accuracy": d}, _recal(), _keras_ctx(momenta=[0.99] * 2, steps_per_epoch=10, epochs=3))
    stale = report.finding("stale_moving_statistics")
    assert stale.remedy is None and "would change validation to 0.8535, worse" in stale.message
    assert all(f.remedy is None or "recalibrate" not in f.remedy for f in report.findings), [f.to_dict() for f in report.findings]
    assert all("momentum=" not in (f.remedy or "") for f in report.findings)
    assert "above training" in report.headline()


def test_a_healthy_model_is_offered_no_fix_and_the_threshold_is_in_points():
    d = decompose("accuracy", {"T": 0.950, "Td": 0.950, "P": 0.946, "E": 0.942})
    report = build_report({"accuracy": d}, None, _keras_ctx(momenta=[0.99] * 2, steps_per_epoch=10, epochs=3))
    assert report.causes == [] and "nothing to fix" in report.headline() and "(1.0 point)" in report.headline()
    ema = report.finding("ema")
    assert ema.severity == "info" and ema.remedy is None and "momentum 0.8" in ema.message  # 1 - 2 / 10, said, not pasted
    assert "within 1.0 point" in str(report)


def test_terms_that_cancel_are_named_not_called_causes():
    d = decompose("accuracy", {"T": 0.90, "Td": 0.85, "P": 0.90, "E": 0.895})  # dropout -5, batch statistics -5... +5
    assert abs(d.total) <= d.threshold() and len(d.significant()) == 2
    report = build_report({"accuracy": d}, None, _keras_ctx())
    assert report.causes == [] and "offset each other" in report.headline()
    assert "training only layers +5.0 points" in report.headline() and "batch statistics -5.0 points" in report.headline()
    assert {f.kind: f.severity for f in report.findings if f.kind in d.terms} == {"training_only_layers": "info", "batch_statistics": "info"}


def test_every_remedy_is_code_that_compiles():
    """Remedies are code to paste (the schema's promise); advice in words belongs to the message."""
    cases = [
        {"F": 0.70, "T": 0.95, "Td": 0.99, "P": 0.90, "E": 0.40, "E_val": 0.30},  # every term, data included
        {"T": 0.60, "Td": 0.95, "P": 0.90, "E": 0.89},
    ]
    for values in cases:
        for remedies in (KerasRemedies(), TorchRemedies()):
            ctx = Context(framework="x", remedies=remedies, samples=960, batch_size=96, momenta=[0.99] * 2,
                          steps_per_epoch=10, epochs=3, replicas=2)
            report = build_report({"accuracy": decompose("accuracy", values)}, _recal(), ctx)
            for f in report.findings:
                if f.remedy is not None:
                    compile(f.remedy.replace("model.fit(...,", "model.fit(x,"), f"<{f.kind}>", "exec")  # raises on prose


def test_a_layer_with_statistics_that_are_not_finite_is_named():
    layer = LayerRecalibration("bn_broken", "BatchNormalization", "measured", 2, 1e-3, samples=96,
                               mean_before=np.array([0.0, 0.0]), var_before=np.array([-1.0, 1.0]),
                               mean_after=np.array([0.1, 0.2]), var_after=np.array([1.0, 1.0]))
    recal = Recalibration("keras/jax", [layer], batches=1, samples=96, batch_size=96)
    d = decompose("accuracy", {"T": 0.9, "Td": 0.9, "P": 0.9, "E": 0.5})
    report = build_report({"accuracy": d}, recal, _keras_ctx())
    broken = [f for f in report.findings if f.kind == "drift" and "not valid" in f.message]
    assert broken and broken[0].numbers["layers"] == ["bn_broken"] and "recalibrate" in broken[0].remedy
    text = str(report)
    assert "not finite" in text and " nan" not in text.lower()


def test_validation_data_are_named_where_they_are_measured():
    d = decompose("accuracy", {"T": 0.95, "Td": 0.95, "P": 0.94, "E": 0.93, "E_val": 0.30})
    report = build_report({"accuracy": d}, None, _keras_ctx())
    assert "(on the validation data) is 65.0 points below training (on the training data)" in report.headline()
    assert "same data, same weights" not in str(report) and "E_val on the validation data" in str(report)


def test_stale_statistics_that_cost_validation_are_said_whatever_the_gap_does():
    """Dropout outweighs the stale term (T < E): the gap's cause is dropout, but exact statistics would still
    raise validation by 5 points: the finding is a warning with the fix, and GapMonitor's sentence says it."""
    d = decompose("accuracy", {"T": 0.70, "Td": 0.85, "P": 0.85, "E": 0.80})
    report = build_report({"accuracy": d}, None, _keras_ctx())
    assert [k for k, _ in report.causes] == ["training_only_layers"]
    stale = report.finding("stale_moving_statistics")
    assert stale.severity == "warning" and "recalibrate" in stale.remedy
    sentence = report.distortion_sentence(3, "recalibrate")
    assert sentence is not None and "it would be 0.8500, not 0.8000 (+5.0 points)" in sentence


def test_a_term_of_the_gaps_sign_in_a_gap_within_noise_is_said_to_offset():
    d = decompose("accuracy", {"T": 0.80, "Td": 0.85, "P": 0.80, "E": 0.795})  # gap +0.5 points
    found = build_report({"accuracy": d}, None, _keras_ctx()).finding("batch_statistics")  # +5 points
    assert found.severity == "info" and "gap itself is within the noise threshold" in found.message
    assert "opposite" not in found.message.split("(", 1)[0] and "narrows" not in found.message


def test_a_layer_whose_statistics_overflowed_is_named_not_a_crash():
    layer = LayerRecalibration("bn_inf", "BatchNormalization", "measured", 2, 1e-3, samples=96,
                               mean_before=np.array([0.0, 0.0]), var_before=np.array([np.inf, 1.0]),
                               mean_after=np.array([0.1, 0.2]), var_after=np.array([1.0, 1.0]))
    recal = Recalibration("keras/jax", [layer], batches=1, samples=96, batch_size=96)
    report = build_report({"accuracy": decompose("accuracy", {"T": 0.9, "Td": 0.9, "P": 0.9, "E": 0.5})}, recal, _keras_ctx())
    drift = [f for f in report.findings if f.kind == "drift"]
    assert len(drift) == 1 and drift[0].numbers["layers"] == ["bn_inf"] and "not valid" in drift[0].message


def test_processes_with_different_layers_are_told_apart_by_the_fingerprint():
    """Channel lists that agree in number, total and weighted sums must still differ ([65, 61, 67, 63] and
    [64] * 4 differ by (1, -3, 3, -1)): one process's view, process 0 holding the other list."""
    from evalgap import DistributedError
    from evalgap.engine.moments import _check_same_layers

    class Other:
        world, rank, description = 2, 1, "2 processes"

        def __init__(self, theirs):
            self.theirs = theirs

        def broadcast(self, vector):
            return self.theirs

        def sum(self, vector):
            return vector

    names = ["a", "b", "c", "d"]
    for mine, theirs in (([65, 61, 67, 63], [64] * 4), ([4, 6], [6, 4]), ([4, 6], [4, 6, 6])):
        zero = []
        _check_same_layers(type("Zero", (), {"broadcast": lambda s, v: zero.append(v.copy()) or v, "sum": lambda s, v: v * 0})(), names, theirs)
        with pytest.raises(DistributedError, match="models differ in their BatchNorm layers"):
            _check_same_layers(Other(zero[0]), names[:len(mine)], mine)
    same = []
    _check_same_layers(type("Zero", (), {"broadcast": lambda s, v: same.append(v.copy()) or v, "sum": lambda s, v: v * 0})(), names, [64] * 4)
    _check_same_layers(Other(same[0]), names, [64] * 4)  # the same layers: no error


@pytest.mark.parametrize("convention, pasted", [("keras", 0.7143), ("torch", 0.2857)])
def test_the_advised_momentum_as_printed_is_not_too_slow(convention, pasted):
    """7 steps per epoch: a memory of half an epoch is 3.5 updates, momentum 1 - 1/3.5 = 0.714285..., printed 0.7143
    (PyTorch: 0.2857). A model rebuilt with the printed value gets no 'too slow' advice (it did, by 1e-5)."""
    d = decompose("accuracy", {"T": 0.9, "Td": 0.9, "P": 0.88, "E": 0.87})
    remedies = KerasRemedies() if convention == "keras" else TorchRemedies()
    ctx = Context(framework=convention, remedies=remedies, samples=336, batch_size=48, momenta=[pasted] * 3,
                  convention=convention, steps_per_epoch=7, epochs=4)
    numbers = next(f.numbers for f in build_report({"accuracy": d}, None, ctx).findings if f.numbers and "too_slow" in f.numbers)
    assert numbers["advised_momentum"] == pasted and not numbers["too_slow"]
    slower = Context(framework=convention, remedies=remedies, samples=336, batch_size=48,
                     momenta=[0.99 if convention == "keras" else 0.01] * 3, convention=convention, steps_per_epoch=7, epochs=4)
    numbers = next(f.numbers for f in build_report({"accuracy": d}, None, slower).findings if f.numbers and "too_slow" in f.numbers)
    assert numbers["too_slow"]

