"""A metric that is NaN or infinite in some mode: the report says which modes, and claims nothing about the noise
threshold or the absence of a cause (NaN terms are never 'above the threshold', which says nothing about them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalgap.attribution import decompose
from evalgap.diagnosis import Context, build_report
from evalgap.recalibration import LayerRecalibration, Recalibration
from evalgap.torch.remedies import TorchRemedies

NAN = float("nan")


def _recal():
    layer = LayerRecalibration("bn1", "BatchNorm2d", "measured", 2, 1e-5, samples=64,
                               mean_before=np.array([0.3, 0.0]), var_before=np.array([1.0, 1.0]),
                               mean_after=np.array([1.5, 0.1]), var_after=np.array([1.0, 2.0]))
    return Recalibration("torch", [layer], batches=2, samples=64, batch_size=32)


def _ctx(**kw):
    return Context(framework="torch", remedies=TorchRemedies(), samples=64, batch_size=32, convention="torch", **kw)


def _messages(report) -> str:
    return str(report) + "\n".join(f.message for f in report.findings)


@pytest.mark.parametrize("values, modes", [
    ({"T": NAN, "Td": NAN, "P": NAN, "E": NAN}, "modes T, Td, P and E"),
    ({"T": 0.5, "Td": 0.5, "P": NAN, "E": 0.52}, "mode P"),  # the gap itself finite, two terms NaN
    ({"T": 0.5, "Td": 0.5, "P": 0.5, "E": float("inf")}, "mode E"),
])
def test_non_finite_modes_are_named_instead_of_noise_claims(values, modes):
    d = decompose("loss", values)
    report = build_report({"loss": d}, _recal(), _ctx(momenta=[0.01], steps_per_epoch=100, epochs=3))
    text = _messages(report)
    assert "No significant cause" not in text and "noise threshold" not in text and "nothing to fix" not in text
    assert report.headline().startswith(f"loss is not finite in {modes} (")
    assert "targets holding NaN or Inf that the loss does not leave out" in report.headline()
    assert f"No cause can be ranked: loss is not finite in {modes}." in str(report)
    assert f"cannot be measured: loss is not finite in {modes}" in report.finding("drift").message
    assert f"cannot be measured: loss is not finite in {modes}" in report.finding("ema").message  # momentum 0.01 too slow
    assert report.causes == []
    json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_finite_values_keep_the_noise_sentences():
    d = decompose("loss", {"T": 0.5, "Td": 0.5, "P": 0.501, "E": 0.502})
    report = build_report({"loss": d}, _recal(), _ctx())
    assert "No significant cause: every term is within 0.01." in str(report)
    assert "Its effect on the metric is within the noise threshold." in report.finding("drift").message
    assert "not finite" not in str(report)
