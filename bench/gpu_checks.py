"""The PyTorch pass's fast paths on the device they are built for (run by ``bench/gpu.sh``).

The test suite runs on the CPU; this checks on a GPU (cuDNN's BatchNorm kernels, CUDA pooling):

- **direct = forward**: outputs and moments of the pass with the BN kernel called directly are
  bit for bit those of the pass through PyTorch's own ``_BatchNorm.forward`` (fp32, channels-last,
  bf16 autocast, a float16 model);
- **pooled on the device**: a flush pooled where it lies (``_pooled_snapshots``, the CUDA branch)
  gives the float64 statistics the host (NumPy) gives for the same captures, to 1e-12;
- **exact**: ``recalibrate`` on the device against the float64 NumPy moments of every BN input.

    python bench/gpu_checks.py [--device cuda] [--json FILE]

Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.dirname(__file__))
from _torch_resnet import resnet50  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap.engine import Batch  # noqa: E402
from evalgap.torch import moments  # noqa: E402
from evalgap.torch.adapter import TorchAdapter  # noqa: E402


class Shared(nn.Module):
    """BN1d/2d/3d and a layer called twice per batch on inputs of different sizes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, 1), nn.BatchNorm3d(8))
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16 * 16, 10), nn.BatchNorm1d(10))

    def forward(self, x):
        z = self.stem(x.unsqueeze(2).expand(-1, -1, 2, -1, -1)).flatten(1, 2)
        z = self.bn(self.conv(z))
        z = z + self.bn(z[:3] * 2 - 1).mean(0)
        return self.head(z)


def _pass(model, data, direct: bool):
    """Outputs and host moments of a pass, with the direct kernel call on or off, and how many BN calls
    went through PyTorch's ``_BatchNorm.forward``."""
    stock, forward = moments._STOCK_TYPES, _BatchNorm.forward
    calls = []
    _BatchNorm.forward = lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    if not direct:
        moments._STOCK_TYPES = ()
    try:
        adapter = TorchAdapter()
        adapter.device = data[0].device
        layers = adapter.layers(model)
        outs, caps = [], []
        with adapter.moments_pass(model, layers, [True] * len(layers)) as run:
            for x in data:
                c, out = run(Batch(x, raw=x, size=len(x)))
                outs.append(out.float().cpu())
                host = adapter.host_captures(c)
                caps.append(np.concatenate([host.count, host.mean, host.var]))
        return outs, caps, len(calls)
    finally:
        moments._STOCK_TYPES, _BatchNorm.forward = stock, forward


def _pooled_both_ways(model, data):
    """One flush of a pass pooled by ``host_captures`` where its snapshots lie and again after moving
    them to the CPU (the NumPy branch): (count, mean, var) both ways, or None when it is not pooled."""
    adapter = TorchAdapter()
    adapter.device = data[0].device
    layers = adapter.layers(model)
    with adapter.moments_pass(model, layers, [True] * len(layers)) as run:
        caps = [c for x in data for c in run(Batch(x, raw=x, size=len(x)))[0]]
    if not all(type(c[2]) is moments._Snapshot for c in caps):
        return None, None
    moved: dict[int, moments._Snapshot] = {}
    for c in caps:
        v = c[2]
        moved.setdefault(id(v), moments._Snapshot(v.block.cpu(), v.layout, v.single))
    on_host = [(i, n, moved[id(v)], u) for i, n, v, u in caps]
    a, b = adapter.host_captures(caps), adapter.host_captures(on_host)
    if len(a.index) == len(caps):  # not pooled: one capture per call
        return None, None
    return (a.count, a.mean, a.var), (b.count, b.mean, b.var)


def _reference(model, data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each BN input's moments over all batches, in float64 NumPy: the inputs captured from a copy of the
    model run as the pass runs it (BN on batch statistics, everything else in eval mode), on the same
    device in the same precision (a float64 copy of a deep network reaches its last layers through
    different rounding, so it would measure the forward, not the statistics)."""
    side = copy.deepcopy(model).eval()
    seen: dict[str, list[np.ndarray]] = {}
    for name, mod in side.named_modules():
        if isinstance(mod, _BatchNorm):
            mod.train()
            mod.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, []).append(inp[0].detach().double().cpu().numpy()))
    with torch.no_grad():
        for x in data:
            side(x)
    out = {}
    for name, xs in seen.items():
        values = np.concatenate([np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) for a in xs])
        out[name] = (values.mean(0), values.var(0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    device = torch.device(args.device)
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    g = torch.Generator().manual_seed(0)
    s = args.image_size
    settings = [
        ("shared layer, fp32", Shared, [torch.randn(8, 3, 16, 16, generator=g) * 30 + 100 for _ in range(3)], None, None),
        ("resnet50, fp32", resnet50, [torch.randn(4, 3, s, s, generator=g) * 50 + 120 for _ in range(3)], None, None),
        ("resnet50, channels-last", resnet50, [torch.randn(4, 3, s, s, generator=g) * 50 + 120 for _ in range(3)], torch.channels_last, None),
        ("resnet50, bf16 autocast", resnet50, [torch.randn(4, 3, s, s, generator=g) * 50 + 120 for _ in range(3)], None, "bf16"),
        ("resnet50, float16 model", resnet50, [torch.randn(4, 3, s, s, generator=g) for _ in range(3)], None, "half"),
    ]
    for name, build, data, fmt, precision in settings:
        if precision == "half" and device.type == "cpu":
            continue  # CPU float16 convolutions are slow and not what this checks
        torch.manual_seed(0)
        model = build().to(device).train()
        data = [x.to(device) for x in data]
        if fmt is not None:
            model = model.to(memory_format=fmt)
            data = [x.to(memory_format=fmt) for x in data]
        if precision == "half":
            model, data = model.half(), [x.half() for x in data]
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            direct, through = _pass(model, data, True), _pass(model, data, False)
        same_out = all(torch.equal(a, b) for a, b in zip(direct[0], through[0]))
        same_caps = all(np.array_equal(a, b) for a, b in zip(direct[1], through[1]))
        check(f"direct = forward ({name})", same_out and same_caps and direct[2] == 0 < through[2],
              f"outputs {'identical' if same_out else 'differ'}, moments {'identical' if same_caps else 'differ'}; "
              f"calls through PyTorch's forward {direct[2]} (direct) and {through[2]}")
        if precision is None and fmt is None:
            taken = []
            pooled = moments._pooled_snapshots
            moments._pooled_snapshots = lambda *a: taken.append(pooled(*a) is not None) or pooled(*a)
            try:
                on_device = copy.deepcopy(model)
                eg.recalibrate(on_device, data, progress=False)
            finally:
                moments._pooled_snapshots = pooled
            ref = _reference(model, data)
            worst = 0.0
            for bn_name, (mean, var) in ref.items():
                bn = on_device.get_submodule(bn_name)
                worst = max(worst, float(np.max(np.abs(bn.running_var.double().cpu().numpy() / var - 1))),
                            float(np.max(np.abs(bn.running_mean.double().cpu().numpy() - mean) / np.sqrt(var))))
            check(f"exact ({name})", worst < 1e-4, f"largest relative error against float64 {worst:.2e}; pooled flushes {taken}")
            pooled_dev, pooled_host = _pooled_both_ways(model, data)
            if pooled_dev is not None:
                (n_d, mean_d, var_d), (n_h, mean_h, var_h) = pooled_dev, pooled_host
                scale = np.sqrt(np.maximum(var_h, 1e-300))  # means relative to the spread (a mean near 0 has no relative precision)
                gap = max(float(np.max(np.abs(n_d - n_h))), float(np.max(np.abs(mean_d - mean_h) / scale)),
                          float(np.max(np.abs(var_d - var_h) / np.maximum(var_h, 1e-300))))
                check(f"pooled on the {device.type} = on the host ({name})", gap < 1e-12,
                      f"the same captures pooled both ways, largest relative difference {gap:.1e}")
    failed = [c for c in checks if not c["ok"]]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": where, "torch": torch.__version__, "checks": checks}, fh, indent=2)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
