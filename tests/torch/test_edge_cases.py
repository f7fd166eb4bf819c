"""Cases users hit that a first implementation got wrong: attached hooks, ragged tails, odd inputs, RNG."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap  # noqa: E402
import evalgap.torch as eg  # noqa: E402
from evalgap import DataError, EvalgapError, RecalibrationError  # noqa: E402

from ._reference import modes, state_snapshot  # noqa: E402


def net(dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=0.01), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(8, 3))


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * 3 + 20
    return x, torch.randint(0, 3, (n,), generator=g)


def batches(x, y, size=16):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def trained(model, x, y, steps=5):
    opt = torch.optim.SGD(model.parameters(), 0.05)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_an_attached_precise_bn_neither_fires_inside_diagnose_nor_changes_modes():
    x, y = data()
    model = net(dropout=0.5)
    hook = eg.PreciseBN(batches(x, y), verbose=0).attach(model)
    trained(model, x, y)  # training steps after attach: model.eval() would fire it
    before, before_modes = state_snapshot(model), modes(model)
    report = eg.diagnose(model, batches(x, y), progress=False)
    assert hook.last is None and state_snapshot(model) == before and modes(model) == before_modes
    # T ran in training mode (dropout on): it differs from Td
    assert report.decompositions["loss"].values["T"] != report.decompositions["loss"].values["Td"]
    monitor = eg.GapMonitor(batches(x, y), verbose=0)
    logs = monitor(model, 0)
    assert hook.last is None and state_snapshot(model) == before and logs["gap_bn_stale"] != 0.0
    model.eval()  # the user's own switch still fires it
    assert hook.last is not None


def test_a_users_own_forward_on_a_bn_layer_survives_the_pass():
    x, y = data()
    model = trained(net(), x, y)
    bn = model[1]
    calls = []

    def forward(inp, _orig=bn.forward):
        calls.append(1)
        return _orig(inp)

    bn.forward = forward
    eg.recalibrate(model, batches(x, y), progress=False)
    assert bn.__dict__.get("forward") is forward and calls  # still there, and it ran in the pass


def test_a_last_batch_of_one_sample_is_left_out_of_every_mode_and_said():
    x, y = data(65)
    model = trained(net(), x, y)
    r = eg.recalibrate(model, batches(x, y, 32), progress=False)
    assert r.skipped_samples == 1
    report = eg.diagnose(model, batches(x, y, 32), progress=False)
    assert report.probe["samples"] == 64 and any("batch of one sample" in n for n in report.notes)
    arrays = eg.diagnose(model, (x, y), batch_size=32, progress=False)
    assert arrays.probe["samples"] == 64


def test_a_last_batch_of_one_sample_stays_in_every_mode_when_the_model_takes_it():
    """BatchNorm2d sees H*W values per channel: training mode takes one sample, so E is the user's loop over all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).double()
    model[1].running_mean.fill_(0.5)
    model[1].running_var.fill_(3.0)
    x, y = torch.randn(22, 3, 5, 5, dtype=torch.float64), torch.randint(0, 3, (22,))
    model.eval()
    with torch.no_grad():  # the evaluation loop: a mean over all 22 samples
        out = model(x)
    expected = nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).double().mean().item()
    before = state_snapshot(model)
    for given in (batches(x, y, 7), (x, y)):  # 3 batches of 7 and one of 1, as a list and as arrays
        report = eg.diagnose(model, given, batch_size=7, shuffle=False, progress=False)
        values = {name: report.decompositions[name].values for name in ("loss", "accuracy")}
        assert report.probe["samples"] == 22 and not any("one sample" in n for n in report.notes)
        assert values["loss"]["E"] == pytest.approx(expected[0], rel=1e-12)
        assert values["accuracy"]["E"] == pytest.approx(expected[1], rel=1e-6)  # counted in float32
    assert state_snapshot(model) == before


def test_frozen_layers_the_model_learned_around_get_no_fix_that_would_hurt():
    """A BatchNorm frozen from the start (eval mode in every step): the weights fit its stored statistics, so
    recalibrating it loses accuracy; the report says so and prints no include_frozen fix."""
    x, y = data(96)
    model = net()
    opt = torch.optim.SGD(model.parameters(), 0.05)
    for _ in range(60):
        model.train()
        model[1].eval()  # frozen
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = eg.diagnose(model, batches(x, y), progress=False)
    frozen = report.finding("frozen")
    assert frozen.numbers["effect"] < 0 and frozen.remedy is None, str(report)
    assert "Keep them frozen" in frozen.message and frozen.severity == "info"


def test_a_lazy_layer_is_not_materialized_on_a_last_batch_of_one_sample():
    """Trying that batch in training mode would materialize a lazy layer's buffers from one sample: it is left out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x, y = torch.randn(17, 3, 6, 6) * 3 + 2, torch.randint(0, 3, (17,))
    report = eg.diagnose(model, batches(x, y, 8), progress=False)
    assert report.probe["samples"] == 16
    assert torch.equal(model[1].running_mean, torch.zeros(4)) and torch.equal(model[1].running_var, torch.ones(4))


class Decorated(nn.Module):
    @torch.no_grad()
    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=self.training)


class Plain(nn.Module):
    def forward(self, x):
        return x


def _drop_head(module, x):  # a helper that reads the flag of the module it is given
    return nn.functional.dropout(x, 0.5, training=module.training)


def _through(module, x):  # a second level of helpers
    return _drop_head(module, x)


class HelperHead(nn.Module):
    def forward(self, x):
        return _through(self, torch.relu(x))


@torch.no_grad()
def _decorated_drop(module, x):  # a helper under a decorator (functools.wraps)
    return nn.functional.dropout(x, 0.5, training=module.training)


class DecoratedHelperHead(nn.Module):
    def forward(self, x):
        return _decorated_drop(self, x)


def _closure_head():
    def drop(module, x):
        return nn.functional.dropout(x, 0.5, training=module.training)

    class ClosureHead(nn.Module):
        def forward(self, x):
            return drop(self, x)  # a helper held in the closure, not a global

    return ClosureHead()


def _chain(n: int):
    """A chain of n plain helpers, the last one reading the flag."""
    namespace: dict = {"nn": nn}
    exec("def f0(m, x):\n    return nn.functional.dropout(x, 0.5, training=m.training)\n", namespace)
    for i in range(1, n):
        exec(f"def f{i}(m, x):\n    return f{i - 1}(m, x)\n", namespace)

    class Chained(nn.Module):
        def forward(self, x):
            return top(self, x)

    top = namespace[f"f{n - 1}"]
    return Chained()


class OddAttribute(nn.Module):
    ops = torch.classes.my_ops  # looking up any attribute of it raises RuntimeError

    def forward(self, x):
        return x


def test_code_that_reads_the_training_flag_is_found_or_said_unknown():
    """mode_dependent decides whether diagnose compares T and Td: a miss makes T = Td silently, so what cannot be
    read is None (the comparison runs), never []."""
    from evalgap.torch.layers import mode_dependent

    hooked = nn.Sequential(nn.Linear(2, 2))
    hooked.register_forward_hook(lambda module, inputs, out: out * 2 if module.training else out)
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), Decorated())) == ["1"]  # through @torch.no_grad()
    assert mode_dependent(hooked) == ["Sequential"]
    assert mode_dependent(nn.Sequential(torch.jit.script(Plain()))) is None
    assert mode_dependent(nn.Sequential(OddAttribute(), nn.BatchNorm1d(2))) == []
    assert mode_dependent(net()) == [] and mode_dependent(net(dropout=0.5)) == []  # Dropout: training_only already
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), HelperHead())) == ["1"]  # helper(self, x), two levels down
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), DecoratedHelperHead())) == ["1"]  # under @torch.no_grad()
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), _closure_head())) == ["1"]  # held in a closure
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), _chain(10))) == ["1"]
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), _chain(400))) is None  # too deep to follow: not known, checked


def test_dropout_in_a_helper_function_is_measured_in_training_mode():
    """T of a model whose dropout sits in a module-level helper: the training-mode loop's loss, not Td's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), HelperHead(), nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    data = batches(x, y, 16)
    torch.manual_seed(3)
    report = eg.diagnose(model, data, progress=False)
    torch.manual_seed(3)  # the same draws, in the user's own training-mode loop
    side = copy.deepcopy(model).train()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(side(a), b, reduction="sum").item() for a, b in data]
    values = report.decompositions["loss"].values
    assert values["T"] == pytest.approx(sum(losses) / 64, rel=1e-5)
    assert values["T"] != pytest.approx(values["Td"], rel=1e-3), str(report)


def test_a_last_sample_is_kept_without_batchnorm_and_other_errors_are_named_by_the_pass():
    x, y = data(9)
    report = eg.diagnose(nn.Sequential(nn.Linear(6, 3)), batches(x, y, 4), progress=False)
    assert report.probe["samples"] == 9 and not any("one sample" in n for n in report.notes)
    with pytest.raises(RecalibrationError, match="evaluation mode pass failed at batch 0"):
        eg.diagnose(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), batches(x, y, 4), progress=False)


def test_a_failing_pass_is_an_evalgap_error_naming_the_pass():
    x, y = data()
    model = trained(net(), x, y)
    before = state_snapshot(model)
    wrong = [(torch.randn(16, 5), torch.zeros(16, dtype=torch.long))]  # 5 features for a Linear(6, ...)
    with pytest.raises(RecalibrationError, match="evaluation mode pass failed at batch 0"):
        eg.diagnose(model, wrong, progress=False)
    two_per_sample = lambda o, t: torch.stack([nn.functional.cross_entropy(o, t, reduction="none")] * 2, 1)  # noqa: E731
    with pytest.raises(EvalgapError, match=r"loss_fn gave values of shape \(16, 2\) for a batch of 16 samples"):
        eg.diagnose(model, batches(x, y), loss_fn=two_per_sample, progress=False)
    assert state_snapshot(model) == before


def test_a_failing_recalibration_names_the_batch_it_failed_at_and_whether_reading_it_failed():
    x, y = data()
    model = trained(net(), x, y)
    before = state_snapshot(model)
    good = batches(x, y)

    def loader_failing_on_batch_2():
        yield from good[:2]
        raise OSError("corrupt file")

    with pytest.raises(RecalibrationError, match=r"failed while reading batch 2 of the data \(OSError: corrupt file\)"):
        eg.recalibrate(model, loader_failing_on_batch_2(), progress=False)
    wrong_at_1 = [good[0], (torch.randn(16, 5), good[1][1])]  # 5 features for a Linear(6, ...)
    with pytest.raises(RecalibrationError, match="failed at batch 1 "):
        eg.recalibrate(model, wrong_at_1, progress=False)
    assert state_snapshot(model) == before


def test_dict_batches_without_a_target_key_name_the_keys_read():
    x, y = data()
    model = trained(net(), x, y)
    with pytest.raises(DataError, match=r"dicts with the keys 'image', 'mask'.*'label', .* or 'targets': rename yours"):
        eg.diagnose(model, [{"image": x[:16], "mask": y[:16]}], progress=False)


def test_one_fit_number_goes_to_the_primary_metric_asked_for():
    x, y = data()
    model = trained(net(), x, y)
    report = eg.diagnose(model, batches(x, y), fit_metric=0.25, primary="loss", progress=False)
    assert report.decompositions["loss"].values["F"] == 0.25 and "F" not in report.decompositions["accuracy"].values


def test_frozen_effect_is_what_the_pasted_remedy_does():
    x, y = data(96)
    model = trained(net(), x, y)
    with torch.no_grad():
        model[1].running_mean += 2 * model[1].running_var.sqrt()
    model.train()
    model[1].eval()  # frozen
    report = eg.diagnose(model, batches(x, y), progress=False)
    effect = report.finding("frozen").numbers["effect"]
    fixed = copy.deepcopy(model)
    eg.recalibrate(fixed, batches(x, y), include_frozen=True, progress=False)
    fixed.eval()
    with torch.no_grad():  # an independent evaluation loop after the remedy
        acc = np.mean([float((fixed(xb).argmax(1) == yb).float().mean()) for xb, yb in batches(x, y)])
    p = report.decompositions["accuracy"].values["P"]
    assert effect == pytest.approx(acc - p, abs=1e-6)


def test_reading_a_dataset_leaves_torch_rng_as_it_was():
    x, y = data()
    model = trained(net(), x, y)
    state = torch.random.get_rng_state()
    eg.recalibrate(model, torch.utils.data.TensorDataset(x, y), batch_size=16, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    eg.recalibrate(model, loader, max_batches=2, progress=False)  # stopped early: put back at once
    assert torch.equal(torch.random.get_rng_state(), state)


def test_arrays_without_batch_size_and_sample_weights_are_refused_with_the_fix():
    x, y = data()
    model = trained(net(), x, y)
    with pytest.raises(DataError, match="batch_size="):
        eg.recalibrate(model, (x, y), progress=False)
    with pytest.raises(DataError, match="sample weights"):
        eg.diagnose(model, (x, y, torch.ones(len(y))), batch_size=16, progress=False)


def test_bfloat16_models_are_diagnosed():
    x, y = data()
    model = trained(net(), x, y).to(torch.bfloat16)
    report = eg.diagnose(model, [(xb.to(torch.bfloat16), yb) for xb, yb in batches(x, y)], progress=False)
    assert report.finding("input_scale") is not None or report.samples == 64


@pytest.mark.parametrize("call", ["diagnose", "recalibrate"])
def test_data_of_one_sample_names_the_sample_count_and_loses_nothing(call):
    """A (1, C) batch has no batch variance; PyTorch refuses it in training mode. The error says the data need
    at least 2 samples (not only 'a larger batch size', which the user may have given), and the model is kept."""
    model = net()
    x, y = data(1)
    before, before_modes = state_snapshot(model), modes(model)
    with pytest.raises(RecalibrationError, match="at least 2 samples"):
        if call == "diagnose":
            eg.diagnose(model, (x, y), batch_size=8, progress=False)
        else:
            eg.recalibrate(model, [x], progress=False)
    assert state_snapshot(model) == before
    assert modes(model) == before_modes


class TwoInputs(nn.Module):
    """``forward(image, meta)``: batches come as ``((image, meta), y)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.head = nn.Linear(6, 8), nn.Linear(2, 8), nn.BatchNorm1d(8, momentum=0.01), nn.Linear(8, 3)

    def forward(self, image, meta, scale: float = 1.0):
        return self.head(torch.relu(self.bn(self.a(image) + scale * self.b(meta))))


def test_a_model_with_several_positional_inputs_gets_the_input_tuple_unpacked():
    torch.manual_seed(0)
    model = TwoInputs()
    g = torch.Generator().manual_seed(1)
    batches = [((torch.randn(16, 6, generator=g) * 3 + 5, torch.randn(16, 2, generator=g)), torch.randint(0, 3, (16,), generator=g))
               for _ in range(4)]
    with torch.no_grad():  # float64 reference: the BN layer's input over all the data
        h = torch.cat([model.a(i) + model.b(m) for (i, m), _ in batches]).double().numpy()
        model.eval()
        want_e = float(sum(nn.functional.cross_entropy(model(*xs), y, reduction="sum") for xs, y in batches)) / 64
    report = eg.diagnose(model, batches, progress=False)
    assert report.decompositions["loss"].values["E"] == pytest.approx(want_e, rel=1e-6)
    eg.recalibrate(model, batches, progress=False)
    np.testing.assert_allclose(model.bn.running_mean.double().numpy(), h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn.running_var.double().numpy(), h.var(0), rtol=1e-5)


class Pair(nn.Module):
    def forward(self, x):
        return x, x


def test_an_optional_second_input_in_a_tuple_gets_a_hint_to_unpack_it():
    """forward(self, x, meta=None): a tuple input is not unpacked (its first argument might take a tuple), so say how."""

    class Optional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(4)

        def forward(self, x, meta=None):
            return self.bn(self.a(x) if meta is None else self.a(x) + meta)

    batches = [((torch.randn(16, 6), torch.randn(16, 4)), torch.randint(0, 3, (16,))) for _ in range(2)]
    with pytest.raises(RecalibrationError, match=r"forward=lambda model, batch: model\(\*batch\[0\]\)"):
        eg.recalibrate(Optional(), batches, progress=False)
    r = eg.recalibrate(Optional(), batches, progress=False, forward=lambda model, batch: model(*batch[0]))
    assert r.batches == 2
    pairs = [(x, torch.randint(0, 4, (16,))) for (x, _), _ in batches]  # tensor inputs; a tuple output the loss refuses
    with pytest.raises(RecalibrationError, match="not tuple") as info:
        eg.diagnose(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), Pair()), pairs, loss_fn=nn.functional.cross_entropy,
                    progress=False)
    assert "forward=" not in str(info.value)  # the input is no tuple: no advice to unpack it


def test_several_inputs_in_a_flat_batch_get_a_hint_naming_both_ways():
    """``TensorDataset(image, meta, y)`` batches are flat: which elements are inputs cannot be told, so the
    error says how to pass them."""
    model = TwoInputs()
    flat = [(torch.randn(16, 6), torch.randn(16, 2), torch.randint(0, 3, (16,))) for _ in range(2)]
    with pytest.raises(RecalibrationError, match=r"\(\(input1, input2, \.\.\.\), target\).*forward=lambda"):
        eg.recalibrate(model, flat, progress=False)


def test_buffers_that_are_inference_tensors_are_a_clear_error_that_changes_nothing():
    from evalgap import ModelError

    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    before = net[1].running_var.clone()
    with pytest.raises(ModelError, match="inference tensors"):
        eg.recalibrate(net, [torch.randn(8, 4) for _ in range(3)], progress=False)
    assert torch.equal(net[1].running_var, before)


class _StepBN(nn.BatchNorm1d):
    """A BatchNorm subclass with buffers of its own that its training forward updates (a batch-renorm step counter,
    a running bound), in place and by reassignment."""

    def __init__(self, c):
        super().__init__(c, momentum=0.01)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("absmax", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.steps += 1
            self.absmax = torch.maximum(self.absmax, x.detach().abs().max())
        return super().forward(x)


def test_a_subclass_s_own_buffers_are_left_as_they_were():
    x, y = data()
    model = nn.Sequential(nn.Linear(6, 8), _StepBN(8), nn.ReLU(), nn.Linear(8, 3))
    trained(model, x, y, steps=3)
    before, steps = state_snapshot(model), int(model[1].steps)
    assert steps == 3
    eg.diagnose(model, batches(x, y), loss_fn=nn.functional.cross_entropy, progress=False)
    assert state_snapshot(model) == before  # the counter and the bound too (they moved by 4 batches per pass)
    result = eg.recalibrate(model, batches(x, y), progress=False)
    after = state_snapshot(model)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {"1.running_mean", "1.running_var"} and int(model[1].steps) == steps
    assert result.layers[0].status == "recalibrated"


class _Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(x + 30.0)


def test_bfloat16_statistics_are_exact_where_the_mean_is_large_against_the_spread():
    """bfloat16 buffers: each call's moments were kept in bfloat16 (3 significant digits) before the float64 merge,
    the variance up to 1% off (0.2523 for 0.2499) where the mean (30) is large against the spread (0.5)."""
    torch.manual_seed(5)
    model = _Shifted().to(torch.bfloat16)
    batches_ = [(torch.randn(64, 3) * 0.5).bfloat16() for _ in range(40)]
    seen = torch.cat([(b + 30.0).double() for b in batches_])  # the layer's inputs, exactly (bf16 values)
    mean, var = seen.mean(0).numpy(), seen.var(0, unbiased=False).numpy()
    result = eg.recalibrate(model, batches_, progress=False)
    np.testing.assert_allclose(result.layers[0].var_after, var, rtol=1e-6)
    np.testing.assert_allclose(result.layers[0].mean_after, mean, rtol=1e-7)
    assert torch.equal(model.bn.running_var, torch.from_numpy(var).bfloat16())  # the exact value, rounded once
    assert torch.equal(model.bn.running_mean, torch.from_numpy(mean).bfloat16())


class _KeepsBackboneInEval(nn.Module):
    """Detectron/DeepLab style: the model's own train() keeps a frozen backbone (BatchNorm and dropout) in eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            self.backbone[1].running_mean.fill_(0.5)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        self.backbone.requires_grad_(False)  # a side effect the probe of train() must put back
        return self

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_model_whose_train_keeps_layers_in_eval_mode_is_measured_as_it_trains(mode):
    x, y = data()
    model = _KeepsBackboneInEval()
    model.train() if mode == "train" else model.eval()
    model.backbone.requires_grad_(True)  # as the user left it: the probe must not change it
    before, modes_before = state_snapshot(model), modes(model)
    report = eg.diagnose(model, batches(x, y), loss_fn=nn.functional.cross_entropy, progress=False)
    reference = copy.deepcopy(model).train()  # the modes of the user's training loop
    with torch.no_grad():
        t = sum(float(nn.functional.cross_entropy(reference(xb), yb)) * len(yb) for xb, yb in batches(x, y)) / len(x)
    values = report.to_dict()["metrics"]["loss"]["values"]
    assert values["T"] == pytest.approx(t, rel=1e-6)  # the backbone's dropout off, its BatchNorm on its statistics
    assert report.to_dict()["metrics"]["loss"]["terms"]["training_only_layers"] == 0.0
    assert [layer.status for layer in eg.recalibrate(copy.deepcopy(model), batches(x, y), progress=False).layers] == ["frozen", "recalibrated"]
    assert state_snapshot(model) == before and modes(model) == modes_before
    assert all(p.requires_grad for p in model.parameters())


def test_instance_norm_with_running_statistics_is_named_as_the_gap_it_opens():
    """InstanceNorm2d(track_running_stats=True) normalizes each sample by its own statistics in training mode and by
    running averages in eval mode: it was called harmless ("LayerNorm/GroupNorm-style ... do not cause this gap") and
    its gap put down to dropout the model does not have."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(0.1)
    data_ = [(torch.randn(8, 3, 6, 6) * 2 + 1, torch.randint(0, 3, (8,))) for _ in range(5)]
    before = state_snapshot(model)
    report = eg.diagnose(model, data_, loss_fn=nn.functional.cross_entropy, progress=False)
    assert state_snapshot(model) == before

    def loss(m):
        with torch.no_grad():
            return sum(float(nn.functional.cross_entropy(m(x), y)) * len(y) for x, y in data_) / 40

    values = report.to_dict()["metrics"]["loss"]["values"]
    assert values["T"] == pytest.approx(loss(copy.deepcopy(model).train()), rel=1e-6)
    assert values["E"] == pytest.approx(loss(copy.deepcopy(model).eval()), rel=1e-6)
    found = report.finding("running_instance_norm")
    assert found is not None and found.numbers["layers"] == ["1"] and "track_running_stats=False" in found.message
    assert report.finding("other_normalization") is None
    assert "InstanceNorm layers with running statistics (1)" in report.finding("training_only_layers").message
    assert "does not come from normalization" not in report.finding("no_batchnorm").message
    with pytest.raises(evalgap.ModelError, match="track_running_stats=True"):
        eg.recalibrate(model, data_, progress=False)


class _LoRALinear(nn.Linear):
    """loralib's pattern: eval mode folds the low-rank update into the weight, train(True) takes it out again.
    Running train() on the user's model (to learn its training modes) changed its weights."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.lora_a, self.lora_b = nn.Parameter(torch.randn(2, n_in) * 0.3), nn.Parameter(torch.randn(n_out, 2) * 0.3)
        self.merged = False

    def train(self, mode=True):
        super().train(mode)
        with torch.no_grad():
            if mode and self.merged:
                self.weight -= self.lora_b @ self.lora_a
                self.merged = False
            elif not mode and not self.merged:
                self.weight += self.lora_b @ self.lora_a
                self.merged = True
        return self

    def forward(self, x):
        out = super().forward(x)
        return out if self.merged else out + x @ (self.lora_b @ self.lora_a).T


def test_a_train_override_with_side_effects_is_probed_on_a_copy():
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(_LoRALinear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()  # merged
    before, merged = state_snapshot(model), model[0].merged
    eg.diagnose(model, batches(x, y), loss_fn=nn.functional.cross_entropy, progress=False)
    assert state_snapshot(model) == before and model[0].merged is merged
    eg.recalibrate(model, batches(x, y), progress=False)
    after = state_snapshot(model)
    assert {k for k in before if after[k] != before[k]} == {"1.running_mean", "1.running_var"} and model[0].merged is merged


@pytest.mark.parametrize("call, kwargs, named", [
    ("recalibrate", {"batch_size": 16, "max_samples": 0}, "max_samples must be >= 1 (or None for all samples), got 0"),
    ("recalibrate", {"batch_size": 16, "max_samples": -5}, "max_samples must be >= 1 (or None for all samples), got -5"),
    ("recalibrate", {"batch_size": "16"}, "batch_size must be a whole number >= 1 (the training batch size; an int, NumPy integers are fine), got '16' of type str"),
    ("recalibrate", {"batch_size": 2.5}, "got 2.5 of type float"),
    ("recalibrate", {"batch_size": True}, "batch_size must be a whole number >= 1 (the training batch size; an int, NumPy integers are fine), got True of type bool"),
    ("recalibrate", {"batch_size": 0}, "batch_size must be >= 1 (the training batch size), got 0"),
    ("recalibrate", {"batch_size": 16, "max_batches": 1.5}, "max_batches must be a whole number >= 1 (or None for all batches; an int"),
    ("recalibrate", {"batch_size": 16, "max_batches": 0}, "max_batches must be >= 1 (or None for all batches), got 0"),
    ("recalibrate", {"batch_size": 16, "max_samples": np.float64(32)}, "max_samples must be a whole number >= 1"),
    ("diagnose", {"batch_size": 16, "max_samples": -1}, "max_samples must be >= 1 (or None for all samples), got -1"),
    ("diagnose", {"batch_size": 2.5}, "batch_size must be a whole number >= 1"),
    ("diagnose", {"batch_size": 16, "max_samples": "8"}, "max_samples must be a whole number >= 1"),
])
def test_counts_that_are_not_whole_numbers_of_at_least_1_are_refused_and_change_nothing(call, kwargs, named):
    """batch_size, max_batches, max_samples: a DataError naming the argument, the value and what to pass, before
    any pass (max_samples=0 wrote one batch's statistics; 2.5 became 2, True 1, max_batches=1.5 ran 2 batches)."""
    x, y = data()
    model = trained(net(), x, y)
    before, before_modes = state_snapshot(model), modes(model)
    with pytest.raises(DataError) as info:
        getattr(eg, call)(model, (x, y), progress=False, **kwargs)
    assert named in str(info.value) and "pass e.g. " in str(info.value), str(info.value)
    assert state_snapshot(model) == before and modes(model) == before_modes


def test_numpy_integer_counts_are_taken_as_ints():
    x, y = data()
    a, b = trained(net(), x, y), trained(net(), x, y)
    eg.recalibrate(a, (x, y), batch_size=16, max_samples=32, progress=False)
    eg.recalibrate(b, (x, y), batch_size=np.int64(16), max_samples=np.int32(32), progress=False)
    assert torch.equal(a[1].running_mean, b[1].running_mean) and torch.equal(a[1].running_var, b[1].running_var)
    result = eg.recalibrate(net(), batches(x, y), max_batches=np.int64(2), progress=False)
    assert result.batches == 2


def test_validation_data_that_fail_are_named_as_val_data():
    """val_data whose second batch (batch 1, counting from 0 as every pass error does) fails to load: the error names
    val_data (it said "batch 1 of the data", the training data's words), and the model is left as it was."""
    x, y = data()
    model = trained(net(dropout=0.2), x, y)
    before = state_snapshot(model)

    def failing():
        yield x[:16], y[:16]
        raise OSError("image 17 is truncated")

    with pytest.raises(RecalibrationError, match=r"evaluation mode pass over val_data failed while reading batch 1 of val_data"):
        eg.diagnose(model, batches(x, y), val_data=failing(), progress=False)
    assert state_snapshot(model) == before


@pytest.mark.parametrize("make", [
    lambda data: eg.PreciseBN(data, max_batches=2.5),
    lambda data: eg.PreciseBN(data, batch_size=0),
    lambda data: eg.PreciseBN(data, every=True),
    lambda data: eg.GapMonitor(data, max_samples=2.5),
    lambda data: eg.GapMonitor(data, batch_size=0),
], ids=["max_batches", "batch_size", "every", "gap_max_samples", "gap_batch_size"])
def test_callback_counts_are_checked_when_the_callback_is_made(make):
    """The loop helpers check their counts as recalibrate and diagnose do, at construction (2.5 or 0 was accepted and
    failed at the first epoch's end, or ran 3 batches)."""
    x, y = data()
    with pytest.raises(DataError, match="must be a whole number >= 1|must be >= 1"):
        make(batches(x, y))
