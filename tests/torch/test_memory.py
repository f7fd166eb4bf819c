"""Memory stays bounded by about one batch plus per-channel state, however many batches."""

from __future__ import annotations

import resource

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap.torch as eg  # noqa: E402


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def test_many_batches_from_a_generator():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8))
    size = (64, 3, 32, 32)  # 0.79 MB a batch: 1500 batches would be 1.2 GB if anything kept them

    def batches(n):
        g = torch.Generator().manual_seed(1)
        for _ in range(n):
            yield torch.randn(*size, generator=g) * 10 + 5

    eg.recalibrate(net, batches(40), progress=False)  # warm-up: allocator pools, lazy imports
    before = _max_rss_mb()
    result = eg.recalibrate(net, batches(1500), progress=False)
    grown = _max_rss_mb() - before
    assert result.batches == 1500 and result.samples == 96000
    assert grown < 150, f"peak memory grew by {grown:.0f} MB over 1500 batches"
