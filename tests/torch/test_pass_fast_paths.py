"""The PyTorch pass's fast paths. A stock BatchNorm layer's kernel is called directly: the same outputs
and statistics as PyTorch's own ``_BatchNorm.forward``, bit for bit, and PyTorch's forward for what that
does not cover. A flush whose batches each call every layer once is pooled on the device: exact for
batches of any sizes (float64 NumPy reference)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap.torch import moments  # noqa: E402
from evalgap.torch.adapter import TorchAdapter  # noqa: E402
from evalgap.engine import Batch  # noqa: E402

from ._reference import assert_stats_close, reference_population_stats  # noqa: E402


class Mixed(nn.Module):
    """BN1d/2d/3d, a layer called twice per batch on inputs of different sizes, channels-last convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4, momentum=0.01))
        self.conv = nn.Conv2d(8, 6, 3, padding=1).to(memory_format=torch.channels_last)
        self.bn = nn.BatchNorm2d(6, eps=1e-3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 10), nn.BatchNorm1d(10, momentum=None))

    def forward(self, x):
        z = self.stem(x.unsqueeze(2).expand(-1, -1, 2, -1, -1)).flatten(1, 2)
        z = self.bn(self.conv(z.contiguous(memory_format=torch.channels_last)))
        z = z + self.bn(z[:3] * 2 - 1).mean(0)  # the same layer again, on 3 samples
        return self.head(z)


def _pass_outputs(net: nn.Module, data: list) -> tuple[list, list]:
    adapter = TorchAdapter()
    layers = adapter.layers(net)
    outputs, moments_ = [], []
    with adapter.moments_pass(net, layers, [True] * len(layers)) as run:
        for x in data:
            captures, out = run(Batch(x, raw=x, size=len(x)))
            outputs.append(out.clone())
            host = adapter.host_captures(captures)
            moments_.append((host.index.copy(), host.count.copy(), host.mean.copy(), host.var.copy()))
    return outputs, moments_


def _assert_same_passes(one: tuple[list, list], other: tuple[list, list]) -> None:
    """Outputs and host moments of two passes, bit for bit."""
    for a, b in zip(one[0], other[0]):
        assert torch.equal(a, b)
    for a, b in zip(one[1], other[1]):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_the_direct_kernel_call_matches_pytorchs_forward_bit_for_bit(monkeypatch):
    torch.manual_seed(0)
    net = Mixed().train()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(8, 3, 8, 8, generator=g) * 30 + 100 for _ in range(5)]
    stock_calls = []
    forward = _BatchNorm.forward
    monkeypatch.setattr(_BatchNorm, "forward", lambda self, x: stock_calls.append(1) or forward(self, x))
    direct = _pass_outputs(net, data)
    assert stock_calls == []  # every call of the pass went to the kernel directly
    monkeypatch.setattr(moments, "_STOCK_TYPES", ())
    through_forward = _pass_outputs(net, data)
    assert len(stock_calls) == 4 * len(data)
    _assert_same_passes(direct, through_forward)
    ref = reference_population_stats(net, data)
    eg.recalibrate(net, data, progress=False)
    for name in ("stem.1", "bn", "head.2"):
        assert_stats_close(net.get_submodule(name), ref[name])


def _f_batch_norm_logger(seen: list, tag: str) -> type:
    """A tensor subclass whose ``__torch_function__`` notes ``tag`` for every ``F.batch_norm`` it sees."""

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is F.batch_norm:
                seen.append(tag)
            return super().__torch_function__(func, types, args, kwargs or {})

    return Logged


class _AB(nn.Module):
    """Two BatchNorm1d layers of 3 channels, ``a`` and ``b``; subclasses say how forward calls them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)


def _assert_a_then_b(net: nn.Module, data: list) -> None:
    """``net.a`` saw the data and ``net.b`` saw ``2 a(x) + 1`` (a's weight 1, bias 0): float64 NumPy reference."""
    xs = [d.double().numpy() for d in data]
    ys = [2 * (x - x.mean(0)) / np.sqrt(x.var(0) + net.a.eps) + 1 for x in xs]
    for bn, seen_by in ((net.a, np.concatenate(xs)), (net.b, np.concatenate(ys))):
        np.testing.assert_allclose(bn.running_mean.double().numpy(), seen_by.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), seen_by.var(0), rtol=1e-5)


def test_calls_the_direct_path_does_not_cover_go_through_pytorchs_forward():
    """A tensor subclass's ``__torch_function__`` sees ``F.batch_norm`` as PyTorch's forward calls it, and
    a keyword argument reaches that forward; the statistics stay exact (float64 NumPy reference)."""
    seen = []
    Logged = _f_batch_norm_logger(seen, "input")

    class Net(_AB):
        def forward(self, x):
            y = self.a(x.as_subclass(Logged)).as_subclass(torch.Tensor)
            return self.b(input=y * 2 + 1)

    torch.manual_seed(0)
    net = Net().train()
    data = [torch.randn(8, 3) * 2 + 5 for _ in range(4)]
    r = eg.recalibrate(net, data, progress=False)
    assert len(seen) == len(data) and r["a"].calls == r["b"].calls == len(data)
    _assert_a_then_b(net, data)


def test_a_flush_of_batches_of_different_sizes_is_pooled_exactly(monkeypatch):
    """Batches of 5, 9 and 2 samples at two image sizes (so every layer sees different counts per
    batch), bfloat16 and float32 layers, channels-last: pooled on the device, equal to the float64
    reference of every value each layer saw."""
    taken = []
    pooled = moments._pooled_snapshots
    monkeypatch.setattr(moments, "_pooled_snapshots", lambda *a: taken.append(pooled(*a) is not None) or pooled(*a))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
            self.bn = nn.BatchNorm2d(4)
            self.bn16 = nn.BatchNorm2d(4).to(torch.bfloat16)

        def forward(self, x):
            z = self.bn(self.conv(x.contiguous(memory_format=torch.channels_last)))
            return self.bn16((z * 3 - 2).to(torch.bfloat16))

    torch.manual_seed(0)
    net = Net().train()
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(n, 3, s, s, generator=g) * 20 + 60 for n, s in ((5, 8), (9, 6), (2, 8), (5, 6))]
    seen = {"bn": [], "bn16": []}
    hooks = [getattr(net, k).register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0].double().numpy())) for k in seen]
    eg.recalibrate(net, data, progress=False, drop_ragged=False)
    for h in hooks:
        h.remove()
    assert taken == [False]  # two blocks (float32 and bfloat16): not one grid; gathered on the host
    for name, xs in seen.items():
        x = np.concatenate([np.moveaxis(a, 1, -1).reshape(-1, 4) for a in xs])
        bn = getattr(net, name)
        tol = 1e-5 if name == "bn" else 1e-2  # bfloat16 buffers hold 3 significant digits
        np.testing.assert_allclose(bn.running_mean.double().numpy(), x.mean(0), rtol=tol)
        np.testing.assert_allclose(bn.running_var.double().numpy(), x.var(0), rtol=tol)

    net.bn16.float()
    seen = {"bn": [], "bn16": []}
    net.forward = lambda x: net.bn16(net.bn(net.conv(x.contiguous(memory_format=torch.channels_last))) * 3 - 2)
    hooks = [getattr(net, k).register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0].double().numpy())) for k in seen]
    eg.recalibrate(net, data, progress=False, drop_ragged=False)
    for h in hooks:
        h.remove()
    assert taken[1:] == [True]  # one float32 block: the flush is pooled where it lies
    for name, xs in seen.items():
        x = np.concatenate([np.moveaxis(a, 1, -1).reshape(-1, 4) for a in xs])
        bn = getattr(net, name)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), x.mean(0), rtol=1e-5)
        np.testing.assert_allclose(bn.running_var.double().numpy(), x.var(0), rtol=1e-5)


def test_a_pruned_or_affine_free_layer_is_normalized_as_pytorch_does():
    """``torch.nn.utils.prune`` replaces a layer's weight parameter by a plain attribute recomputed before
    every call; a layer without affine parameters has none: the pass uses what PyTorch's forward would
    (bit for bit against the pass through PyTorch's forward), and the statistics stay exact."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3)).train()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.uniform_(-1.0, 1.0)
    prune.l1_unstructured(net[1], "weight", amount=0.5)  # half of the weights zeroed: the next layer sees it
    data = [torch.randn(8, 4) * 3 + 2 for _ in range(3)]
    stock_calls = []
    forward = _BatchNorm.forward
    _BatchNorm.forward = lambda self, x: stock_calls.append(1) or forward(self, x)
    try:
        direct = _pass_outputs(net, data)
    finally:
        _BatchNorm.forward = forward
    assert stock_calls == []  # both layers took the direct call
    stock = moments._STOCK_TYPES
    moments._STOCK_TYPES = ()
    try:
        through_forward = _pass_outputs(net, data)
    finally:
        moments._STOCK_TYPES = stock
    _assert_same_passes(direct, through_forward)
    ref = reference_population_stats(net, data)
    eg.recalibrate(net, data, progress=False)
    assert_stats_close(net[3], ref["3"])


@pytest.mark.parametrize("equal", [True, False])
def test_pool_rows_on_tensors_is_the_float64_union(equal):
    """``stats.pool_rows`` as a GPU flush runs it (torch float64 tensors, Bessel-corrected variances), on
    the CPU here: the mean and biased variance of all the groups' values together (NumPy float64)."""
    from evalgap.stats import pool_rows

    rng = np.random.default_rng(0)
    sizes = [[6, 3], [6, 3], [6, 3]] if equal else [[6, 3], [2, 9], [4, 5]]
    groups = [[rng.normal(50 + 10 * b, 1 + c, size=n) for c, n in enumerate(row)] for b, row in enumerate(sizes)]
    counts = np.array(sizes, dtype=np.float64)
    means = np.array([[g.mean() for g in row] for row in groups])
    variances = np.array([[g.var(ddof=1) for g in row] for row in groups])
    given = counts[:1] if equal else counts
    n, mean, m2 = pool_rows(*(torch.from_numpy(a) for a in (given, means, variances)), correction=1)
    values = [np.concatenate([row[c] for row in groups]) for c in range(2)]
    np.testing.assert_allclose(n.numpy(), [v.size for v in values])
    np.testing.assert_allclose(mean.numpy(), [v.mean() for v in values], rtol=1e-13)
    np.testing.assert_allclose((m2 / n).numpy(), [v.var() for v in values], rtol=1e-12)


def test_torch_function_modes_and_overriding_parameters_see_f_batch_norm():
    """An active TorchFunctionMode, or a weight whose tensor overrides ``__torch_function__``, sees the
    ``F.batch_norm`` PyTorch's forward calls (the direct kernel call would hide it); statistics exact."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.batch_norm:
                seen.append("mode")
            return func(*args, **(kwargs or {}))

    Logged = _f_batch_norm_logger(seen, "weight")

    class Net(_AB):
        def forward(self, x):
            with Mode():
                y = self.a(x)
            return self.b(y * 2 + 1)

    torch.manual_seed(0)
    net = Net().train()
    net.b.weight = nn.Parameter(torch.ones(3).as_subclass(Logged))
    data = [torch.randn(8, 3) * 2 + 5 for _ in range(4)]
    eg.recalibrate(net, data, progress=False)
    assert seen.count("mode") == len(data) and seen.count("weight") == len(data)
    _assert_a_then_b(net, data)


def test_a_forward_through_functional_call_and_a_keyword_call_is_measured_exactly():
    """``torch.func.functional_call`` swaps every buffer entry for the call; a layer called with a keyword
    argument goes through PyTorch's forward, which then updates the swapped-in tensors: what they hold
    after the call is what the pass records."""
    from torch.func import functional_call

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(input=self.lin(x))

    torch.manual_seed(0)
    net = Net().train()
    data = [torch.randn(8, 4) * 3 + 1 for _ in range(4)]
    w, c = (p.detach().double().numpy() for p in (net.lin.weight, net.lin.bias))
    seen_by = np.concatenate([d.double().numpy() @ w.T + c for d in data])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    eg.recalibrate(net, data, progress=False, forward=lambda m, b: functional_call(m, state, (b,)))
    np.testing.assert_allclose(net.bn.running_mean.double().numpy(), seen_by.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.bn.running_var.double().numpy(), seen_by.var(0), rtol=1e-5)


def test_a_layer_that_only_sees_empty_inputs_stays_unreached_and_unwritten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x):
            rare = x[x[:, 0] > 1e6]  # never any row
            return self.b(rare).sum() + self.a(x).sum()

    torch.manual_seed(0)
    net = Net().train()
    before = net.b.running_var.clone()
    data = [torch.randn(8, 3) * 2 + 5 for _ in range(3)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = eg.recalibrate(net, data, progress=False)
    assert r["b"].status == "unreached" and torch.equal(net.b.running_var, before)
    assert [layer.name for layer in r.layers] == ["a", "b"]  # listed after the reached layers, though called first
    x = torch.cat(data).double().numpy()
    np.testing.assert_allclose(net.a.running_var.double().numpy(), x.var(0), rtol=1e-5)


def test_a_layer_with_empty_inputs_in_some_batches_is_exact():
    """Each batch calls every layer once, but one layer's input is empty in some batches: those calls
    weigh nothing (the slot still holds an earlier call's moments, which must not count)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.a(x).sum() + self.b(x[x[:, 0] > 4] * 3).sum()

    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 2, generator=g) + torch.tensor([5.0 if k % 2 else 0.0, 1.0]) for k in range(6)]
    net = Net().train()
    seen = []
    hook = net.b.register_forward_pre_hook(lambda m, a: seen.append(a[0].double().numpy()))
    eg.recalibrate(net, data, progress=False)
    hook.remove()
    assert any(len(s) == 0 for s in seen) and any(len(s) > 1 for s in seen)
    x = np.concatenate(seen)
    np.testing.assert_allclose(net.b.running_mean.double().numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(net.b.running_var.double().numpy(), x.var(0), rtol=1e-5)


def test_hooks_that_read_the_counter_or_set_the_momentum_see_the_layers_own_values():
    """A momentum warm-up hook reads ``num_batches_tracked`` and sets ``momentum``: during the pass it reads
    the layer's own count (a copy), its momentum does not reach the pass (set back to 1.0 before each
    call, for layers on PyTorch's forward too), and afterwards counter, momentum and hook are as they were."""

    class Sub(nn.BatchNorm1d):  # a subclass: the pass goes through its (PyTorch's) forward
        def forward(self, x):
            return super().forward(x)

    read = []

    def warm_up(bn, args):
        read.append(int(bn.num_batches_tracked))
        bn.momentum = 1.0 / (2 + int(bn.num_batches_tracked))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), Sub(4)).train()
    for bn in (net[1], net[2]):
        bn.num_batches_tracked.fill_(7)
        bn.register_forward_pre_hook(warm_up)
    momenta = (net[1].momentum, net[2].momentum)
    data = [torch.randn(8, 3) * 2 + 1 for _ in range(4)]
    ref = reference_population_stats(nn.Sequential(*[copy_module(m) for m in net]), data)
    read.clear()
    eg.recalibrate(net, data, progress=False)
    assert read[:2] == [7, 7]
    assert int(net[1].num_batches_tracked) == int(net[2].num_batches_tracked) == 7
    assert (net[1].momentum, net[2].momentum) == momenta
    assert_stats_close(net[1], ref["1"])
    assert_stats_close(net[2], ref["2"])


def copy_module(m: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(m)
    out._forward_pre_hooks.clear()
    return out


@pytest.mark.parametrize("change", ["eval", "momentum"])
def test_a_model_that_changes_a_layers_mode_or_momentum_in_forward_gets_a_clear_error(change):
    """The model's forward puts the layer in eval mode, or the layer's own forward changes its momentum
    before normalizing: the slot would not hold that call's batch moments. A ModelError names the layer
    and the model is unchanged."""
    from evalgap import ModelError

    class Drifting(nn.BatchNorm1d):
        def forward(self, x):
            self.momentum = 0.3
            return super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(3, 4), (Drifting(4) if change == "momentum" else nn.BatchNorm1d(4))

        def forward(self, x):
            if change == "eval":
                self.bn.eval()
            out = self.bn(self.lin(x))
            self.bn.train()
            return out

    torch.manual_seed(0)
    net = Net().train()
    net.bn.momentum = 0.1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kind = type(net.bn).__name__
    with pytest.raises(ModelError, match=rf"^bn \({kind}, 4 channels\) (is put in eval mode|changes its momentum)"):
        eg.recalibrate(net, [torch.randn(8, 3) for _ in range(3)], progress=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items()) and net.bn.momentum == 0.1
