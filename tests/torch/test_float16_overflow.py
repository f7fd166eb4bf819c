"""Population statistics that a float16 buffer cannot hold (above 65504) are refused, not written as inf."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap  # noqa: E402
import evalgap.torch as eg  # noqa: E402


def _half_model_and_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g) * 400  # variance about 1.6e5 per channel: more than float16's 65504
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).half()
    batches = [(x[i:i + 16].half(), torch.zeros(16, dtype=torch.long)) for i in range(0, 128, 16)]
    return model, batches, x


def test_statistics_beyond_float16_are_refused_and_nothing_is_written():
    model, batches, x = _half_model_and_batches()
    reference = np.var(torch.cat([b[0] for b in batches]).double().numpy(), axis=0)  # what the buffers would need
    assert reference.min() > 65504
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(evalgap.DataError, match="float16") as caught:
        eg.recalibrate(model, batches, progress=False)
    assert "nothing was written" in str(caught.value) and "float32" in str(caught.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_diagnose_says_why_p_is_not_finite():
    model, batches, _ = _half_model_and_batches()
    report = eg.diagnose(model, batches, loss_fn=lambda out, y: out.float().pow(2).mean(), progress=False)
    assert any("dtype cannot hold" in note and "float16" in note for note in report.notes)


def test_float32_buffers_take_the_same_statistics():
    model, batches, x = _half_model_and_batches()
    model.float()
    eg.recalibrate(model, [(b.float(), y) for b, y in batches], progress=False)
    reference = np.var(torch.cat([b[0] for b in batches]).double().numpy(), axis=0)
    np.testing.assert_allclose(model[0].running_var.double().numpy(), reference, rtol=1e-5)  # the biased population variance
