"""evalgap.torch.recalibrate against an independent float64 reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap import DataError, ModelError, Recalibration, RecalibrationError  # noqa: E402

from ._reference import assert_stats_close, modes, reference_population_stats, state_snapshot  # noqa: E402


def mixed_model() -> nn.Module:
    """BN1d/2d/3d, nested Sequentials, dropout, and a frozen BN."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4, momentum=0.01), nn.ReLU())
            self.body = nn.Sequential(
                nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5)),
                nn.Conv2d(6, 6, 3, padding=1),
                nn.BatchNorm2d(6),  # frozen below
                nn.ReLU(),
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 10), nn.BatchNorm1d(10, momentum=None), nn.Dropout(0.3), nn.Linear(10, 3))

        def forward(self, x):
            z = self.stem(x.unsqueeze(2).expand(-1, -1, 2, -1, -1))  # (N, 4, 2, H, W)
            z = z.flatten(1, 2)  # (N, 8, H, W)
            return self.head(self.body(z))

    net = Net()
    net.train()
    net.body[2].eval()  # frozen: eval mode during training
    return net


def far_batches(n=6, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=g) * 40 + 120 for _ in range(n)]


def test_exact_population_statistics_and_nothing_else_changes():
    net = mixed_model()
    data = far_batches()
    bn_names = [n for n, _ in eg.find_batchnorms(net)]
    ref = reference_population_stats(net, data, bn_train=[n for n in bn_names if n != "body.2"])
    before_state, before_modes = state_snapshot(net), modes(net)
    momenta = {n: m.momentum for n, m in eg.find_batchnorms(net)}
    buffers = {n: (b, b._version) for n, b in net.named_buffers()}  # the tensor objects and their in-place write counters

    result = eg.recalibrate(net, data, progress=False)

    assert isinstance(result, Recalibration)
    named = dict(eg.find_batchnorms(net))
    for name in ("stem.1", "body.0.1", "head.2"):
        assert_stats_close(named[name], ref[name])
        assert result[name].status == "recalibrated" and result[name].samples == 96
    # frozen layer: untouched, but listed with the statistics it would get
    assert result["body.2"].status == "frozen"
    np.testing.assert_allclose(result["body.2"].mean_after, ref["body.2"][0], rtol=1e-5, atol=1e-5 * np.sqrt(ref["body.2"][1]).max())
    # every other byte of state identical, modes and momenta as before
    after = state_snapshot(net)
    changed = {k for k in before_state if before_state[k] != after[k]}
    assert changed == {f"{n}.{b}" for n in ("stem.1", "body.0.1", "head.2") for b in ("running_mean", "running_var")}
    assert modes(net) == before_modes
    assert {n: m.momentum for n, m in eg.find_batchnorms(net)} == momenta
    # the same tensors, each recalibrated one written once (the result), none written by the pass
    assert all(b is dict(net.named_buffers())[n] for n, (b, _) in buffers.items())
    assert {n: b._version - v for n, (b, v) in buffers.items() if b._version != v} == {k: 1 for k in changed}
    # forward order in the result, drift reported
    assert [layer.name for layer in result.layers] == ["stem.1", "body.0.1", "body.2", "head.2"]
    assert result.max_drift > 1.0 and "stem.1" in str(result)


def test_include_frozen_recalibrates_it_too():
    net = mixed_model()
    data = far_batches()
    ref = reference_population_stats(net, data)  # all BN in training mode
    eg.recalibrate(net, data, include_frozen=True, progress=False)
    assert_stats_close(dict(eg.find_batchnorms(net))["body.2"], ref["body.2"])
    assert not net.body[2].training  # still frozen afterwards


def test_population_variance_not_mean_of_batch_variances():
    # batches drawn in class order: each batch has a different mean; the mean of batch
    # variances (torch.optim.swa_utils.update_bn) misses the spread of the batch means
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(2))
    data = [torch.randn(4, 2) + 10 * k for k in range(5)]
    eg.recalibrate(net, data, progress=False)
    x = torch.cat(data).double().numpy()
    np.testing.assert_allclose(net[0].running_var.double().numpy(), x.var(0), rtol=1e-6)
    other = nn.Sequential(nn.BatchNorm1d(2))
    torch.optim.swa_utils.update_bn(data, other)
    assert (other[0].running_var < 0.2 * net[0].running_var).all()


def test_equal_to_fvcore_on_the_same_batches():
    fvcore_bn = pytest.importorskip("fvcore.nn.precise_bn")
    net = mixed_model()
    net.body[2].train()  # fvcore recalibrates every BN in training mode
    data = [b / 255.0 for b in far_batches(n=8, size=32)]  # fvcore's E[x^2]-E[x]^2 needs centred-ish data
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    eg.recalibrate(ours, data, progress=False)
    theirs.eval()
    for m in theirs.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    fvcore_bn.update_bn_stats(theirs, data, num_iters=len(data))
    for (name, a), (_, b) in zip(eg.find_batchnorms(ours), eg.find_batchnorms(theirs)):
        np.testing.assert_allclose(a.running_mean.numpy(), b.running_mean.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(a.running_var.numpy(), b.running_var.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_update_bn_underestimates_variance_at_small_batch_sizes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))
    data = [torch.randn(2, 5) for _ in range(200)]  # batch size 2
    ours = copy.deepcopy(net)
    eg.recalibrate(ours, data, progress=False)
    ref = reference_population_stats(net, data)["1"]
    assert_stats_close(ours[1], ref)
    swa = copy.deepcopy(net)
    torch.optim.swa_utils.update_bn(data, swa)
    # mean of unbiased batch variances of pairs is unbiased for the variance... but the
    # biased batch variance (what BN normalizes with) averages to half of it at n=2
    biased_avg = np.mean([np.var((net[0](x)).detach().double().numpy(), axis=0) for x in data], axis=0)
    np.testing.assert_allclose(biased_avg, 0.5 * ref[1], rtol=0.25)
    assert np.all(np.abs(swa[1].running_var.double().numpy() / ref[1] - 1) < 0.35)
    assert np.all(np.abs(ours[1].running_var.double().numpy() / ref[1] - 1) < 1e-5)


def test_batch_formats_custom_forward_and_max_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    xs = [torch.randn(8, 3) * 5 + 3 for _ in range(4)]
    ref = reference_population_stats(net, xs[:3])["1"]
    for data, kwargs in [
        ([(x, torch.zeros(8)) for x in xs], {}),
        ([{"image": x, "label": torch.zeros(8)} for x in xs], {}),
        ([{"inp": x} for x in xs], {"forward": lambda model, batch: model(batch["inp"])}),
        (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs)), batch_size=8), {}),
    ]:
        m = copy.deepcopy(net)
        r = eg.recalibrate(m, data, max_batches=3, progress=False, **kwargs)
        assert r.batches == 3 and r.samples == 24 and r.batch_size == 8
        assert_stats_close(m[1], ref)


def test_a_loader_over_an_iterable_dataset_without_length():
    """DataLoader has __len__, which raises TypeError over an IterableDataset without one: no total, still exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    xs = [torch.randn(8, 3) * 5 + 3 for _ in range(3)]
    ys = [torch.randint(0, 2, (8,)) for _ in range(3)]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for x, y in zip(xs, ys):
                yield from zip(x, y)

    loader = torch.utils.data.DataLoader(Stream(), batch_size=8)
    ref = reference_population_stats(net, xs)["1"]
    net.eval()
    with torch.no_grad():
        out = net(torch.cat(xs))
    expected = nn.functional.cross_entropy(out, torch.cat(ys)).item()
    report = eg.diagnose(net, loader, progress=False)
    assert report.probe["samples"] == 24 and report.decompositions["loss"].values["E"] == pytest.approx(expected, rel=1e-5)
    r = eg.recalibrate(net, loader, progress=False)
    assert r.batches == 3 and r.samples == 24
    assert_stats_close(net[1], ref)


def test_ragged_last_batch_is_left_out_and_counted():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(3))
    x = torch.randn(21, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    r = eg.recalibrate(net, loader, progress=False)
    assert (r.batches, r.samples, r.skipped_batches, r.skipped_samples) == (2, 16, 1, 5)
    np.testing.assert_allclose(net[0].running_var.double().numpy(), x[:16].double().numpy().var(0), rtol=1e-5)


def test_shared_and_unreached_layers_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.unused = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(x) + self.bn(2 * x + 7)

    net = Net().train()
    data = [torch.randn(8, 3) for _ in range(3)]
    before_unused = state_snapshot(net.unused)
    r = eg.recalibrate(net, data, progress=False)
    assert r["bn"].shared and r["bn"].calls_per_batch == 2 and r["bn"].calls == 6
    assert r["unused"].status == "unreached" and state_snapshot(net.unused) == before_unused
    pooled = torch.cat([torch.cat([x, 2 * x + 7]) for x in data]).double().numpy()
    np.testing.assert_allclose(net.bn.running_var.double().numpy(), pooled.var(0), rtol=1e-5)
    assert any("shared" in n for n in r.notes) and any("no data reached" in n for n in r.notes)


def test_lazy_sync_and_subclasses():
    class MyBN(nn.BatchNorm1d):
        pass

    torch.manual_seed(0)
    net = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d(), nn.Linear(4, 4), nn.SyncBatchNorm(4), MyBN(4))
    data = [torch.randn(8, 5) * 3 for _ in range(3)]
    net(data[0])  # materialize the lazy layers
    ref = reference_population_stats(net, data)
    eg.recalibrate(net, data, progress=False)
    for name in ("1", "3", "4"):
        assert_stats_close(net[int(name)], ref[name])


def test_uninitialized_lazy_layers_are_materialized_by_the_pass():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.LazyBatchNorm1d())
    data = [torch.randn(8, 5) * 3 for _ in range(3)]
    r = eg.recalibrate(net, data, progress=False)
    h = torch.cat([net[0](x) for x in data]).detach().double().numpy()
    np.testing.assert_allclose(net[1].running_var.double().numpy(), h.var(0), rtol=1e-5)
    assert r.layers[0].status == "recalibrated"


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at", [0, 2, 4])
def test_failure_or_interrupt_restores_everything(exc, at):
    net = mixed_model()
    data = far_batches()
    before_state, before_modes = state_snapshot(net), modes(net)

    def gen():
        for i, b in enumerate(data):
            if i == at:
                raise exc("stop")
            yield b

    buffers = {n: (b, b._version) for n, b in net.named_buffers()}
    expected = KeyboardInterrupt if exc is KeyboardInterrupt else RecalibrationError
    with pytest.raises(expected) as info:
        eg.recalibrate(net, gen(), progress=False)
    # the pass never wrote the model's own tensors: the same objects are back, unwritten
    assert all(b is dict(net.named_buffers())[n] and b._version == v for n, (b, v) in buffers.items())
    if expected is RecalibrationError:
        where = "reading the first batch failed" if at == 0 else f"failed while reading batch {at} of the data"
        assert f"{where} (Boom: stop)" in str(info.value)  # the batch the data failed on
        assert "restored" in str(info.value)
    assert state_snapshot(net) == before_state
    assert modes(net) == before_modes
    assert net.head[2].momentum is None and net.stem[1].momentum == 0.01


def test_model_error_restores_and_names_the_batch():
    net = mixed_model()
    before = state_snapshot(net)
    data = far_batches(n=3) + [torch.randn(16, 5, 8, 8)]  # wrong channel count in batch 3
    with pytest.raises(RecalibrationError, match="batch 3"):
        eg.recalibrate(net, data, progress=False)
    assert state_snapshot(net) == before


def test_clear_errors():
    with pytest.raises(ModelError, match="no BatchNorm"):
        eg.recalibrate(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), [torch.randn(4, 2)], progress=False)
    with pytest.raises(DataError, match="no batch"):
        eg.recalibrate(nn.Sequential(nn.BatchNorm1d(2)), [], progress=False)
    with pytest.raises(ModelError, match="track_running_stats=False"):
        eg.recalibrate(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(4, 2)], progress=False)
    net = nn.Sequential(nn.BatchNorm1d(2))
    before = state_snapshot(net)
    with pytest.raises(RecalibrationError, match="batch size"):
        eg.recalibrate(net, [torch.randn(1, 2)], progress=False)
    assert state_snapshot(net) == before


def test_non_finite_inputs_name_the_first_layer_and_restore():
    net = mixed_model()
    data = far_batches(n=3)
    data[1] = data[1].clone()
    data[1][0, 0, 0, 0] = float("nan")
    before = state_snapshot(net)
    with pytest.raises(DataError, match="stem.1 received NaN or Inf.*the inputs"):
        eg.recalibrate(net, data, progress=False)
    assert state_snapshot(net) == before


def test_every_layer_frozen_changes_nothing_and_says_so():
    net = mixed_model()
    for _, bn in eg.find_batchnorms(net):
        bn.eval()
    before = state_snapshot(net)
    result = eg.recalibrate(net, far_batches(n=2), progress=False)
    assert state_snapshot(net) == before
    assert {layer.status for layer in result.layers} == {"frozen"} and not result.recalibrated
    assert any("include_frozen=True" in n for n in result.notes)


def test_calls_of_different_sizes_and_counts_per_batch_pool_exactly():
    """A layer called three times per batch on inputs of different sizes, one called once or twice
    depending on the data, and a frozen one in between: each layer's statistics are those of every
    input it saw, pooled (float64 NumPy reference)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.f, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x):
            out = self.a(x) + self.f(x)
            out = out + self.a(2 * x + 1).sum() + self.a(x[:3] - 4).sum()
            if x[0, 0] > 0:
                out = out + self.b(3 * x).sum()
            return out + self.b(x[:5] * 0.5).sum()

    torch.manual_seed(0)
    net = Net().train()
    net.f.eval()  # frozen
    data = [torch.randn(8, 3) * 2 + 1 for _ in range(6)]
    data[0][0, 0], data[1][0, 0] = 1.0, -1.0  # both branches taken
    r = eg.recalibrate(net, data, progress=False)
    seen_a = np.concatenate([np.concatenate([x, 2 * x + 1, x[:3] - 4]) for x in (d.double().numpy() for d in data)])
    seen_b = np.concatenate([np.concatenate(([3 * x] if x[0, 0] > 0 else []) + [x[:5] * 0.5]) for x in (d.double().numpy() for d in data)])
    np.testing.assert_allclose(net.a.running_mean.double().numpy(), seen_a.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.a.running_var.double().numpy(), seen_a.var(0), rtol=1e-5)
    np.testing.assert_allclose(net.b.running_mean.double().numpy(), seen_b.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.b.running_var.double().numpy(), seen_b.var(0), rtol=1e-5)
    assert r["a"].calls == 18 and r["a"].calls_per_batch == 3 and r["b"].calls_per_batch == 2
    assert r["f"].status == "frozen"
    np.testing.assert_allclose(r["f"].var_after, np.concatenate([d.double().numpy() for d in data]).var(0), rtol=1e-5)
    assert [layer.name for layer in r.layers] == ["a", "f", "b"]


def test_many_batches_of_a_plain_stack_are_pooled_where_they_lie_exactly(monkeypatch):
    """40 batches (past one 32-batch flush) of a model whose layers each run once per batch, in
    order: each flush is pooled on the device, and the statistics are the float64 reference."""
    from evalgap.torch import moments

    taken = []
    pooled = moments._pooled_snapshots
    monkeypatch.setattr(moments, "_pooled_snapshots", lambda *a: taken.append(pooled(*a) is not None) or pooled(*a))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3)).train()
    data = [torch.randn(8, 5) * 4 + 3 for _ in range(40)]
    ref = reference_population_stats(net, data)
    eg.recalibrate(net, data, progress=False)
    assert taken == [True, True]  # two flushes, both without a gather
    for name in ("1", "4"):
        assert_stats_close(net[int(name)], ref[name])


def test_layers_of_different_dtypes_keep_separate_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3).double()

        def forward(self, x):
            return self.a(x).sum() + self.b(x.double() * 2 - 1).sum()

    torch.manual_seed(0)
    net = Net().train()
    data = [torch.randn(8, 3) * 3 + 5 for _ in range(35)]
    eg.recalibrate(net, data, progress=False)
    x = torch.cat(data).double().numpy()
    np.testing.assert_allclose(net.a.running_var.double().numpy(), x.var(0), rtol=1e-5)
    np.testing.assert_allclose(net.b.running_mean.numpy(), (2 * x - 1).mean(0), rtol=1e-12)
    np.testing.assert_allclose(net.b.running_var.numpy(), (2 * x - 1).var(0), rtol=1e-12)  # float64 all the way
    assert net.b.running_var.dtype == torch.float64


def test_a_subclass_that_replaces_its_buffers_is_still_measured():
    class Replacing(nn.BatchNorm1d):
        """Updates the running statistics out of place (new tensors), as some custom layers do."""

        def forward(self, x):
            if not self.training:
                return super().forward(x)
            m, v = x.mean(0), x.var(0, unbiased=True)
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * m
            self.running_var = (1 - self.momentum) * self.running_var + self.momentum * v
            return (x - m) / torch.sqrt(x.var(0, unbiased=False) + self.eps)

    torch.manual_seed(0)
    net = nn.Sequential(Replacing(3)).train()
    data = [torch.randn(8, 3) * 2 + 4 for _ in range(5)]
    eg.recalibrate(net, data, progress=False)
    x = torch.cat(data).double().numpy()
    np.testing.assert_allclose(net[0].running_mean.double().numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(net[0].running_var.double().numpy(), x.var(0), rtol=1e-5)


def test_a_call_that_raises_inside_the_model_leaves_no_record():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            try:
                self.bn(x[:1])  # one value per channel: BatchNorm raises, the model carries on
            except ValueError:
                pass
            return self.bn(x)

    torch.manual_seed(0)
    net = Net().train()
    data = [torch.randn(8, 3) + 2 for _ in range(4)]
    r = eg.recalibrate(net, data, progress=False)
    x = torch.cat(data).double().numpy()
    np.testing.assert_allclose(net.bn.running_var.double().numpy(), x.var(0), rtol=1e-5)
    assert r["bn"].calls == 4


def test_a_compiled_model_is_recalibrated_through_its_eager_module():
    """``torch.compile(model)`` wraps the module (``OptimizedModule``); evalgap runs the eager module inside
    (shared parameters and buffers), so the compiled model gets the population statistics, the layer names are
    the user's (no ``_orig_mod.`` prefix), and nothing is left patched."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=0.01), nn.ReLU(), nn.Linear(8, 3))
    data = [torch.randn(16, 5) * 3 + 7 for _ in range(4)]
    ref = reference_population_stats(net, data)
    compiled = torch.compile(net, backend="eager")
    r = eg.recalibrate(compiled, data, progress=False)
    assert [layer.name for layer in r.layers] == ["1"]
    assert_stats_close(net[1], ref["1"])
    assert "forward" not in net[1].__dict__ and net.training
    report = eg.diagnose(compiled, [(x, torch.zeros(16, dtype=torch.long)) for x in data], progress=False)
    assert [layer.name for layer in report.recalibration.layers] == ["1"]


def test_written_values_are_the_float64_result_rounded_once_per_buffer_dtype():
    """float32 buffers hold the float64 population statistics rounded once (host cast), float16 and float64
    ones torch's cast of the same values; each (device, dtype) group is written in one foreach copy."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.BatchNorm1d(5), nn.BatchNorm1d(5).half(), nn.BatchNorm1d(5).double()

        def forward(self, x):
            return self.a(x).sum() + self.b(x.half() / 8).sum() + self.c(x.double() * 3).sum()

    torch.manual_seed(0)
    net = Net().train()
    data = [torch.randn(16, 5) * 7 + 40 for _ in range(6)]
    calls = []
    real = torch._foreach_copy_
    try:
        torch._foreach_copy_ = lambda targets, sources: (calls.append([(t.dtype, s.dtype) for t, s in zip(targets, sources)]), real(targets, sources))[1]
        result = eg.recalibrate(net, data, progress=False)
    finally:
        torch._foreach_copy_ = real
    for name, dtype in (("a", torch.float32), ("b", torch.float16), ("c", torch.float64)):
        bn, entry = getattr(net, name), result[name]
        for buffer, value in ((bn.running_mean, entry.mean_after), (bn.running_var, entry.var_after)):
            assert buffer.dtype == dtype and torch.equal(buffer, torch.from_numpy(np.asarray(value, dtype=np.float64)).to(dtype))
    x = torch.cat(data).double().numpy()
    np.testing.assert_allclose(result["a"].var_after, x.var(0), rtol=1e-5)  # the values themselves: the population's
    assert sorted(map(str, calls)) == sorted(map(str, [[(torch.float32, torch.float32)] * 2, [(torch.float16, torch.float64)] * 2,
                                                       [(torch.float64, torch.float64)] * 2]))


def test_a_write_of_the_wrong_size_names_the_layer_and_changes_nothing():
    from evalgap.torch.adapter import TorchAdapter

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    adapter = TorchAdapter()
    layers = adapter.layers(net)
    before = state_snapshot(net)
    with pytest.raises(ModelError, match=r"3 has 2 channels, got 4 values.*unchanged"):
        adapter.write(layers, [(np.ones(4), np.ones(4)), (np.ones(4), np.ones(2))])
    assert state_snapshot(net) == before


def test_the_summary_counts_the_drift_it_corrected_not_the_frozen_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 5), nn.BatchNorm1d(5)).train()
    net[1].eval()  # frozen, with statistics far from its inputs
    data = [torch.randn(16, 4) * 30 + 50 for _ in range(4)]
    result = eg.recalibrate(net, data, progress=False)
    frozen, fixed = result["1"], result["3"]
    assert frozen.status == "frozen" and fixed.status == "recalibrated"
    assert frozen.drift.worst > fixed.drift.worst > 0  # the frozen layer drifts most
    line = result.summary()
    assert f"largest drift corrected {fixed.drift.worst:.3g}" in line
    assert f"frozen 1 drifts {frozen.drift.worst:.3g}, left alone" in line


def test_an_ema_copy_that_never_trains_is_recalibrated_not_frozen():
    """An EMA copy as training loops keep one: deepcopy(model).eval() with requires_grad_(False) on every parameter.
    Nothing in it trains, so neither its mode nor requires_grad marks a layer frozen (every layer was frozen and
    nothing was written): its statistics are the float64 population statistics of every BN input. A model fine-tuned
    around BN layers whose parameters alone are frozen (in eval mode) keeps them frozen."""
    net = mixed_model()
    net.body[2].train()
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    data = far_batches()
    ref = reference_population_stats(ema, data)

    result = eg.recalibrate(ema, data, progress=False)

    assert {layer.status for layer in result.layers} == {"recalibrated"}
    for name, bn in eg.find_batchnorms(ema):
        assert_stats_close(bn, ref[name])
    tuned = copy.deepcopy(net).eval()
    for p in tuned.body[2].parameters():  # fine-tuning the rest around a frozen BN
        p.requires_grad_(False)
    assert eg.recalibrate(tuned, data, progress=False)["body.2"].status == "frozen"
