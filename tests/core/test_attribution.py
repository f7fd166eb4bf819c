"""The gap decomposition and the report, on hand-made numbers (no framework)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evalgap.attribution import decompose, higher_is_better, is_fraction
from evalgap.diagnosis import Context, InputScale, build_report
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
    assert [k for k, _ in report.causes] == ["stale_moving_statistics", "epoch_average"]
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
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert "mean_before" not in data["layers"][0]
    text = str(report)
    assert "stale_moving_statistics" in text and "fix: evalgap.keras.recalibrate" in text
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
