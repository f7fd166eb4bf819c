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
