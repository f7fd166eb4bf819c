"""evalgap.torch.PreciseBN in a hand-written loop: called, or attached to model.eval()."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap.torch as eg  # noqa: E402

from ._reference import reference_population_stats  # noqa: E402


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.001), nn.ReLU(), nn.Linear(6, 2))
    data = [torch.randn(16, 4) * 5 + 20 for _ in range(4)]
    return model, data


def train_epoch(model, data):
    opt = torch.optim.SGD(model.parameters(), 1e-3)
    model.train()
    for x in data:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_called_every_second_epoch():
    model, data = setup()
    hook = eg.PreciseBN(data, every=2, verbose=0)
    results = []
    for epoch in range(4):
        train_epoch(model, data)
        results.append(hook(model, epoch))
    assert [r is not None for r in results] == [False, True, False, True]
    ref = reference_population_stats(model, data)["1"]
    np.testing.assert_allclose(model[1].running_var.double().numpy(), ref[1], rtol=1e-5)


def test_attached_fires_on_eval_after_training():
    model, data = setup()
    hook = eg.PreciseBN(data, verbose=0).attach(model)
    train_epoch(model, data)
    assert hook.last is None
    model.eval()  # training -> evaluation: recalibrates
    first = hook.last
    assert first is not None and first.batches == 4
    model.eval()  # already in eval mode: nothing
    assert hook.last is first
    ref = reference_population_stats(copy.deepcopy(model), data)["1"]
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), ref[0], rtol=1e-5, atol=1e-6)
    hook.detach()
    model.train()
    model.eval()
    assert hook.last is first and "train" not in model.__dict__


def test_attached_hook_leaves_frozen_layers_alone():
    model, data = setup()
    model = nn.Sequential(*model, nn.BatchNorm1d(2))
    hook = eg.PreciseBN(data, verbose=0).attach(model)
    train_epoch(model, data)
    model.train()
    model[4].eval()  # frozen
    before = model[4].running_var.clone()
    model.eval()
    assert [layer.status for layer in hook.last.layers] == ["recalibrated", "frozen"]
    assert torch.equal(model[4].running_var, before)


class Frozen(nn.Sequential):
    """A model class with its own train(), keeping its BatchNorm frozen."""

    def train(self, mode=True):
        super().train(mode)
        self[1].eval()
        return self


def test_copies_of_an_attached_model_switch_modes_plainly_and_pickle():
    """An EMA copy (deepcopy) or a saved model must not drive, or be driven by, the attached original."""
    import io

    model, data = setup()
    model = Frozen(*model)
    hook = eg.PreciseBN(data, verbose=0).attach(model)
    train_epoch(model, data)
    assert model.training and not model[1].training
    ema = copy.deepcopy(model)
    ema.train()
    ema(data[0])  # a training step on the copy
    ema.eval()
    assert not ema.training and model.training and hook.last is None  # the copy switched itself, and fired nothing
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.train()
    assert not loaded[1].training  # the class's own train() runs
    loaded.eval()
    assert hook.last is None and loaded.train.__func__ is Frozen.train
    train_epoch(model, data)
    model.eval()  # the original still fires, with its class's frozen layer left alone
    assert hook.last is not None and [layer.status for layer in hook.last.layers] == ["frozen"]


def test_generators_are_refused_with_the_reason():
    from evalgap import DataError

    with pytest.raises(DataError, match="re-iterable|DataLoader or a list"):
        eg.PreciseBN(x for x in [])


def test_attached_then_compiled_fires_on_the_compiled_models_eval():
    """``attach(model)`` then ``torch.compile(model)``: the wrapper's eval() sets the inner module's flag before it
    calls the inner module's train(False), which must still recalibrate (it never fired: stale statistics)."""
    model, data = setup()
    hook = eg.PreciseBN(data, verbose=0).attach(model)
    compiled = torch.compile(model, backend="eager")  # the same OptimizedModule wrapper, no code generation
    compiled.train()
    opt = torch.optim.SGD(model.parameters(), 1e-3)
    for x in data:  # training steps through the compiled wrapper (the pre-hook notes them on the inner module)
        loss = compiled(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    compiled.eval()
    assert hook.last is not None and hook.last.batches == 4
    ref = reference_population_stats(copy.deepcopy(model), data)["1"]
    np.testing.assert_allclose(model[1].running_var.double().numpy(), ref[1], rtol=1e-5)
    assert not model.training and not model[1].training


class _Augmented(torch.utils.data.Dataset):
    """Samples scaled by a draw from NumPy's or Python's global RNG, or from a generator the dataset holds."""

    def __init__(self, x, draw):
        self.x, self.draw = x, draw
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] * (1 + 0.1 * self.draw(self)), i


class _OwnGeneratorBatches(torch.utils.data.Sampler):
    """A batch sampler that shuffles with a generator of its own (bucketing samplers do)."""

    def __init__(self, n, size):
        self.n, self.size, self.generator = n, size, torch.Generator().manual_seed(3)

    def __len__(self):
        return self.n // self.size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        return iter([order[i:i + self.size] for i in range(0, self.n, self.size)])


def _loader(kind, x):
    draws = {"numpy": lambda ds: float(np.random.rand()), "python": lambda ds: __import__("random").random(),
             "dataset_rng": lambda ds: float(ds.rng.random())}
    if kind in draws:
        return torch.utils.data.DataLoader(_Augmented(x, draws[kind]), batch_size=8, shuffle=True)
    plain = _Augmented(x, lambda ds: 0.0)
    if kind == "batch_sampler":
        return torch.utils.data.DataLoader(plain, batch_sampler=_OwnGeneratorBatches(len(x), 8))
    sampler = torch.utils.data.RandomSampler(range(len(x)), generator=torch.Generator().manual_seed(3))
    batched = torch.utils.data.BatchSampler(sampler, 8, False)  # sampler=BatchSampler(...), batch_size=None
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(len(x))), sampler=batched, batch_size=None)


@pytest.mark.parametrize("kind", ["numpy", "python", "dataset_rng", "batch_sampler", "sampler_is_a_batch_sampler"])
def test_reading_the_loader_leaves_what_training_draws_next_as_without_precise_bn(kind):
    """Every random state the read draws from is put back: NumPy's and Python's global states, a generator
    the dataset, a custom batch sampler or a BatchSampler given as sampler= holds."""
    import random

    x = torch.randn(32, 4) * 5 + 20

    def run(with_precise_bn):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        model, loader = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)), _loader(kind, x)
        hook, opt, seen = eg.PreciseBN(loader, verbose=0), torch.optim.SGD(model.parameters(), 1e-3), []
        for epoch in range(2):
            model.train()
            for xb, ib in loader:
                seen.append((xb.sum().item(), ib.tolist()))
                loss = model(xb).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            if with_precise_bn:
                hook(model, epoch)
        return seen, model[0].weight.detach().clone()

    (seen, weight), (seen_with, weight_with) = run(False), run(True)
    assert seen_with == seen
    assert torch.equal(weight_with, weight)


def test_attached_after_the_graph_was_compiled_still_fires_on_eval():
    """A graph compiled before ``attach`` runs without the new forward pre-hook; the training steps it runs still
    move the BN layers' ``num_batches_tracked``, so ``eval()`` recalibrates (it never fired: stale statistics)."""

    class CompiledFirst(nn.Sequential):  # a class of its own: no graph of another test is reused
        pass

    torch._dynamo.reset()
    model, data = setup()
    model = CompiledFirst(*model)
    compiled = torch.compile(model, backend="eager")
    train_epoch(compiled, data)  # compiles the training graph, no hook yet
    hook = eg.PreciseBN(data, verbose=0).attach(model)
    train_epoch(compiled, data)  # the same graph: the pre-hook never runs
    compiled.eval()
    assert hook.last is not None and hook.last.batches == 4
    ref = reference_population_stats(copy.deepcopy(model), data)["1"]
    np.testing.assert_allclose(model[1].running_var.double().numpy(), ref[1], rtol=1e-5)
    first = hook.last
    compiled.train()
    compiled.eval()  # no training step since the pass: nothing
    assert hook.last is first


def test_loading_a_checkpoint_is_not_a_training_step():
    """``load_state_dict`` rewrites ``num_batches_tracked`` (a checkpoint, pretrained weights): ``eval()`` after it, with
    no training step, does not recalibrate (the counter moved, and it fired before the baseline evaluation)."""
    model, data = setup()
    trained = copy.deepcopy(model)
    train_epoch(trained, data)  # its counters are 4 ahead
    hook = eg.PreciseBN(data, verbose=0).attach(model)
    model.load_state_dict(trained.state_dict())
    model.eval()
    assert hook.last is None
    model.train()
    train_epoch(model, data)
    model.eval()
    assert hook.last is not None
