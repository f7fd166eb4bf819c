"""`evalgap diagnose --torch-model module:factory --weights file.pt`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from evalgap.cli import main  # noqa: E402


def make_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4, momentum=0.001), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_torch_model_from_factory_and_weights(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 64)
    x = (rng.normal(0, 20, (64, 8, 8, 3)) + 60 * y[:, None, None, None]).clip(0, 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.manual_seed(0)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()
    for _ in range(30):
        loss = nn.functional.cross_entropy(net(xt), torch.from_numpy(y).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    spec = f"{__name__}:make_net"
    code = main(["diagnose", "--torch-model", spec, "--weights", str(tmp_path / "w.pt"), "--npz", str(tmp_path / "d.npz"),
                 "--batch-size", "16", "-q", "--json", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["framework"] == "torch" and report["causes"][0]["term"] == "stale_moving_statistics"
    # weights that do not match the factory: exit 2, named
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    assert main(["diagnose", "--torch-model", spec, "--weights", str(tmp_path / "bad.pt"), "--npz", str(tmp_path / "d.npz")]) == 2
    assert "do not match" in capsys.readouterr().err
    assert main(["diagnose", "--torch-model", "no_such_module:f", "--npz", str(tmp_path / "d.npz")]) == 2
