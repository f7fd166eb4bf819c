"""The PyTorch input-normalization code a report hands out, run as pasted, against a float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap.diagnosis import InputScale  # noqa: E402
from evalgap.torch.remedies import REMEDIES  # noqa: E402


def _pasted(code: str, x: torch.Tensor) -> torch.Tensor:
    space = {"x": x, "torch": torch}
    exec(code, space)
    return space["x"]


def _four_digits(values) -> np.ndarray:
    return np.array([float(f"{v:.4g}") for v in values])  # the constants as the snippet prints them


@pytest.mark.parametrize("shape", [(64,), (64, 5), (16, 3, 4, 4), (8, 2, 3, 4, 5)], ids=["(N,)", "(N,F)", "(N,C,H,W)", "(N,C,D,H,W)"])
def test_normalization_as_pasted_matches_numpy(shape):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 40 + 120).astype(np.float32)
    axis = 1 if x.ndim >= 3 else -1  # the torch adapter's channel axis
    scale = InputScale.measure(x, axis)
    out = _pasted(REMEDIES.normalize(scale.mean, scale.std), torch.from_numpy(x.copy()))
    chan = [1] * x.ndim
    if x.ndim > 1:
        chan[1] = -1
    mean, std = _four_digits(scale.mean).reshape(chan), _four_digits(scale.std).reshape(chan)
    expected = (x.astype(np.float64) - mean) / std
    assert out.shape == x.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_constant_channel_is_only_centred():
    x = np.stack([np.full(32, 7.0), np.arange(32.0)], axis=1).astype(np.float32)
    scale = InputScale.measure(x, -1)
    out = _pasted(REMEDIES.normalize(scale.mean, scale.std), torch.from_numpy(x.copy())).numpy()
    assert np.all(out[:, 0] == 0.0) and np.isfinite(out).all()
    assert abs(out[:, 1].std() - 1.0) < 1e-3


class _Scalar(nn.Module):
    """A model of one scalar feature per sample: (N,) inputs."""

    def __init__(self):
        super().__init__()
        self.lift, self.bn, self.head = nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.lift(x[:, None])))).squeeze(1)


def test_one_dimensional_inputs_end_to_end():
    """diagnose on (N,) inputs far from standard: the handed-out code keeps the shape and standardizes."""
    torch.manual_seed(0)
    x = torch.randn(256, dtype=torch.float64).float() * 50 + 120
    y = (x > 120).float()
    report = eg.diagnose(_Scalar(), [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)], loss_fn=nn.BCEWithLogitsLoss(),
                         progress=False)
    found = report.finding("input_scale")
    assert found is not None, str(report)
    out = _pasted(found.remedy, x.clone())
    x64 = x.double().numpy()
    assert out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), (x64 - float(f"{x64.mean():.4g}")) / float(f"{x64.std():.4g}"), rtol=1e-5, atol=1e-5)
