"""Shared helpers for the PyTorch tests: an independent float64 reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402


def reference_population_stats(model: nn.Module, batches, bn_train=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float64 copy of the model, BN layers in training mode (all, or those in ``bn_train``),
    everything else in eval mode; capture each BN input, concatenate, NumPy moments."""
    m64 = copy.deepcopy(model).double()
    m64.eval()
    captured: dict[str, list[np.ndarray]] = {}
    for name, mod in m64.named_modules():
        if isinstance(mod, _BatchNorm):
            if bn_train is None or name in bn_train:
                mod.train()
            mod.register_forward_pre_hook(lambda mod, inp, name=name: captured.setdefault(name, []).append(inp[0].detach().numpy()))
    with torch.no_grad():
        for x in batches:
            m64(x.double())
    out = {}
    for name, xs in captured.items():
        x = np.concatenate([np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) for a in xs])
        out[name] = (x.mean(axis=0), x.var(axis=0))
    return out


def assert_stats_close(bn: _BatchNorm, ref: tuple[np.ndarray, np.ndarray], rtol: float = 1e-5) -> None:
    mean, var = ref
    got_mean = bn.running_mean.double().numpy()
    got_var = bn.running_var.double().numpy()
    np.testing.assert_array_less(np.abs(got_mean - mean) / np.sqrt(var), rtol, err_msg="mean")
    np.testing.assert_allclose(got_var, var, rtol=rtol, err_msg="var")


def state_snapshot(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a test's process group."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

