"""The Lightning tests' shared data: 96 samples of 6 features, 3 classes from two thresholds."""

from __future__ import annotations

import pytest

N, D, C = 96, 6, 3


@pytest.fixture(scope="module")
def ds():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g) * 3 + 2
    y = (x[:, 0] > 2).long() + (x[:, 1] > 2).long()
    return torch.utils.data.TensorDataset(x, y)
