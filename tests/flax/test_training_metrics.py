"""``evalgap.flax.recalibrate(..., training_metrics=True)``: the pass's own outputs (BN on batch statistics,
the frozen layer on its moving statistics, dropout off) scored with the default or the user's loss and
metrics, against the float64 NumPy forward of ``_reference`` (every sample once, the ragged batch too)."""

from __future__ import annotations

import numpy as np
import pytest

from ._reference import far_batches, forward, linen_model, linen_weights, nnx_model, nnx_weights

import evalgap  # noqa: E402
import evalgap.flax as eg  # noqa: E402


def _expected(w, batches) -> tuple[np.ndarray, np.ndarray]:
    z = np.concatenate([forward(w, x, batch={"bn1", "bn3"}) for x, _ in batches])
    return z, np.concatenate([y for _, y in batches])


def _cross_entropy(z: np.ndarray, y: np.ndarray) -> float:
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_default_loss_and_accuracy_of_the_pass_outputs(kind):
    batches = far_batches(3) + far_batches(1, size=5, seed=9)  # a ragged last batch: scored, left out of the statistics
    if kind == "nnx":
        model = nnx_model()
        z, y = _expected(nnx_weights(model), batches)
        result = eg.recalibrate(model, batches, training_metrics=True, progress=False)
    else:
        module, variables = linen_model()
        z, y = _expected(linen_weights(variables), batches)
        result, _ = eg.recalibrate((module, variables), batches, training_metrics=True, progress=False)
    assert set(result.training_metrics) == {"loss", "accuracy"}
    assert result.training_metrics["loss"] == pytest.approx(_cross_entropy(z, y), rel=1e-4)
    assert result.training_metrics["accuracy"] == pytest.approx((z.argmax(1) == y).mean(), abs=1e-9)
    assert result.samples == 48 and result.skipped_samples == 5


def test_the_users_loss_and_options_without_training_metrics():
    model = nnx_model()
    batches = far_batches(3)
    z, _ = _expected(nnx_weights(model), batches)
    result = eg.recalibrate(model, batches, training_metrics=True, progress=False,
                            loss_fn=lambda out, y: out.max(-1).mean(), metrics={"top": lambda out, y: out.max(-1)})
    assert set(result.training_metrics) == {"loss", "top"}
    assert result.training_metrics["loss"] == pytest.approx(z.max(1).mean(), rel=1e-4)
    assert result.training_metrics["top"] == pytest.approx(z.max(1).mean(), rel=1e-4)
    with pytest.raises(evalgap.DataError, match="training_metrics=True"):
        eg.recalibrate(model, batches, metrics={"top": lambda out, y: out.max(-1)}, progress=False)
