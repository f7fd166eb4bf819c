"""Shapes and outputs from everyday PyTorch code that broke the diagnosis, each against an independent reference:
sequences padded per batch, sequence-first inputs, dataclass outputs, soft labels, misnamed fit values, a map-style
Dataset without a batch size, a metric that is not one number, PackedSequence batches, features-last inputs a
convolution reads after a transpose."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap import DataError  # noqa: E402

from ._reference import modes, reference_population_stats, state_snapshot  # noqa: E402


def eval_loss(model, batches, loss=nn.functional.cross_entropy, prediction=lambda out: out) -> float:
    """The per-sample mean of the loss in eval mode, as an evaluation loop computes it (float64 sums)."""
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for x, y in batches:
            total += float(loss(prediction(model(x)), y).double()) * len(y)
            count += len(y)
    return total / count


class _Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.head = nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):  # (N, C, L), L differs from batch to batch
        return self.head(self.bn(x).mean(2))


def test_sequences_padded_per_batch_are_diagnosed():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 4, n) * 30 + 100, torch.randint(0, 3, (8,))) for n in (5, 9, 3)]
    model = _Conv1d().train()
    before, before_modes = state_snapshot(model), modes(model)
    report = eg.diagnose(model, batches, progress=False)
    assert state_snapshot(model) == before and modes(model) == before_modes
    assert report.decompositions["loss"].values["E"] == pytest.approx(eval_loss(model, batches), rel=1e-6)
    model.train()
    positions = np.concatenate([x.double().numpy().transpose(0, 2, 1).reshape(-1, 4) for x, _ in batches])  # every position of every sample
    scale = report.finding("input_scale").numbers  # far from standard: mean about 100, std about 30
    np.testing.assert_allclose(scale["mean"], positions.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scale["std"], positions.std(0), rtol=1e-6)


class _SequenceFirst(nn.Module):
    """Token ids (T, N) -> (N, 3), as a batch_first=False encoder takes them."""

    def __init__(self):
        super().__init__()
        self.embed, self.bn, self.head = nn.Embedding(20, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.bn(self.embed(tokens).mean(0)))


def test_sequence_first_inputs_count_their_samples_not_their_steps():
    torch.manual_seed(0)
    model = _SequenceFirst().train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 20, (7, n), generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (16, 16, 16, 5)]
    report = eg.diagnose(model, batches, progress=False)
    assert report.samples == 53
    assert report.decompositions["loss"].values["E"] == pytest.approx(eval_loss(model, batches), rel=1e-6)

    model.train()
    varied = [(torch.randint(0, 20, (t, 16), generator=g), torch.randint(0, 3, (16,), generator=g)) for t in (12, 7, 9, 12, 5)]
    inputs = [model.embed(x).mean(0).detach() for x, _ in varied]  # what the BN layer sees, per batch
    result = eg.recalibrate(model, varied, progress=False)
    assert result.batches == 5 and result.skipped_batches == 0  # no batch taken for ragged: each holds 16 sequences
    seen = torch.cat(inputs).double().numpy()
    np.testing.assert_allclose(model.bn.running_mean.double().numpy(), seen.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.bn.running_var.double().numpy(), seen.var(0), rtol=1e-5)


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    features: torch.Tensor


class _DataclassOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU()), nn.Linear(12, 4)

    def forward(self, x):
        h = self.body(x)
        return Out(self.head(h), h)


def test_dataclass_outputs_with_the_users_loss_and_with_the_defaults():
    torch.manual_seed(0)
    x, y = torch.randn(100, 6), torch.randint(0, 4, (100,))
    batches = [(x[i:i + 25], y[i:i + 25]) for i in range(0, 100, 25)]
    model = _DataclassOutput().train()
    mine = eg.diagnose(model, batches, loss_fn=lambda o, t: nn.functional.cross_entropy(o.logits, t),
                       metrics={"accuracy": lambda o, t: (o.logits.argmax(1) == t).float().mean()}, progress=False)
    reference = eval_loss(model, batches, prediction=lambda o: o.logits)
    assert mine.decompositions["loss"].values["E"] == pytest.approx(reference, rel=1e-6)
    defaults = eg.diagnose(model.train(), batches, progress=False)  # cross-entropy on the dataclass's logits
    assert defaults.decompositions["loss"].values["E"] == pytest.approx(reference, rel=1e-6)
    ref = reference_population_stats(model.train(), [b[0] for b in batches])
    result = eg.recalibrate(model, batches, training_metrics=True, progress=False)
    np.testing.assert_allclose(model.body[1].running_var.double().numpy(), ref["body.1"][1], rtol=1e-5)
    assert set(result.training_metrics) == {"loss", "accuracy"}


def test_soft_labels_get_no_default_loss():
    """Rows of class probabilities (label smoothing) take cross-entropy as well as MSE: doubt, an error that says so.
    Float targets that are not probabilities stay a regression (MSE, checked against NumPy)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x = torch.randn(64, 5)
    soft = nn.functional.one_hot(torch.randint(0, 3, (64,)), 3).float() * 0.9 + 0.1 / 3
    with pytest.raises(DataError, match="class probabilities.*CrossEntropyLoss"):
        eg.diagnose(model, [(x[i:i + 16], soft[i:i + 16]) for i in range(0, 64, 16)], progress=False)
    target = torch.randn(64, 3) * 2
    batches = [(x[i:i + 16], target[i:i + 16]) for i in range(0, 64, 16)]
    report = eg.diagnose(model.train(), batches, progress=False)
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(b) for b, _ in batches]).double().numpy()
    assert report.decompositions["loss"].values["E"] == pytest.approx(((out - target.double().numpy()) ** 2).mean(), rel=1e-6)


def test_fit_values_under_names_diagnose_does_not_measure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    before = state_snapshot(model)
    with pytest.raises(DataError, match=r"fit_metric names 'acc', 'train_loss', none of which.*\(loss, accuracy\)"):
        eg.diagnose(model, batches, fit_metric={"acc": 0.9, "train_loss": 0.2}, progress=False)
    assert state_snapshot(model) == before
    report = eg.diagnose(model, batches, fit_metric={"accuracy": 0.9, "lr": 0.1}, progress=False)
    d = report.decompositions["accuracy"]
    assert d.values["F"] == 0.9 and d.terms["epoch_average"] == pytest.approx(0.9 - d.values["T"])
    assert any("lr not used" in note for note in report.notes), report.notes


def test_a_map_style_dataset_without_a_batch_size_is_refused_clearly():
    from torch.utils.data import TensorDataset

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    dataset = TensorDataset(torch.randn(32, 3), torch.randint(0, 4, (32,)))
    for call in (eg.diagnose, eg.recalibrate):
        with pytest.raises(DataError, match="map-style Dataset \\(TensorDataset\\) gives one sample at a time: pass batch_size="):
            call(model, dataset, progress=False)
    result = eg.recalibrate(model, dataset, batch_size=8, progress=False)
    assert result.batches == 4


class _PerClass:
    """A torchmetrics-like object whose compute() gives one value per class."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.hits, self.seen = torch.zeros(3), torch.zeros(3)

    def update(self, out, t):
        self.hits += torch.bincount(t[out.argmax(1) == t], minlength=3).float()
        self.seen += torch.bincount(t, minlength=3).float()

    def compute(self):
        return self.hits / self.seen.clamp(min=1)

    def to(self, device):
        return self


def test_a_metric_that_computes_several_values_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    with pytest.raises(DataError, match=r"metric 'per_class' \(_PerClass\) computed values of shape \(3,\), not one number"):
        eg.diagnose(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], metrics={"per_class": _PerClass()},
                    loss_fn=nn.CrossEntropyLoss(), progress=False)


class _Tokens(nn.Module):
    """(N, L, F) feature sequences into a Linear, BatchNorm1d over the projected channels (transposed)."""

    def __init__(self):
        super().__init__()
        self.proj, self.bn, self.head = nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.bn(self.proj(x).transpose(1, 2))  # (N, 8, L)
        return self.head(h.mean(2))


def test_feature_sequences_are_measured_and_normalized_per_feature():
    """A Linear first reads the last axis: the input scale is per feature (not per position on axis 1), and the
    code handed out normalizes that axis (float64 NumPy reference)."""
    rng = np.random.default_rng(0)
    centre, spread = np.array([500.0, -40.0, 7.0]), np.array([20.0, 3.0, 0.5])
    x = torch.from_numpy((rng.normal(size=(64, 5, 3)) * spread + centre).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 64))
    report = eg.diagnose(_Tokens(), [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], progress=False)
    found = report.finding("input_scale")
    x64 = x.double().numpy().reshape(-1, 3)
    np.testing.assert_allclose(found.numbers["mean"], x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(found.numbers["std"], x64.std(0), rtol=1e-6)
    space = {"x": x.clone(), "torch": torch}
    exec(found.remedy, space)
    out = space["x"].double().numpy().reshape(-1, 3)
    assert space["x"].shape == x.shape
    np.testing.assert_allclose(out.mean(0), 0.0, atol=2e-3)  # constants printed to 4 significant digits
    np.testing.assert_allclose(out.std(0), 1.0, atol=2e-3)


class _OwnNormalization(nn.Module):
    """Normalizes its own uint8 pixels in forward (ImageNet constants x 255), or only converts them (``scale=False``),
    or flattens them into an MLP (``flatten=True``): what the first layer receives decides the input-scale finding."""

    def __init__(self, scale: bool = True, flatten: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.scale, self.flatten = scale, flatten
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)
        first = nn.Linear(3 * 8 * 8, 8) if flatten else nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(first, nn.BatchNorm1d(8) if flatten else nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x.float()
        if self.scale:
            x = (x - self.mean) / self.std
        if self.flatten:
            return self.head(self.body(x.reshape(len(x), -1)))
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("scale,flatten", [(True, False), (False, False), (False, True)])
def test_input_scale_is_judged_on_what_the_first_layer_receives(scale, flatten):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(4)]
    report = eg.diagnose(_OwnNormalization(scale, flatten), data, loss_fn=nn.functional.cross_entropy, progress=False)
    found = report.finding("input_scale")
    if scale:  # normalized in forward: "raw [0, 255] pixels, divide by 255" would normalize twice
        assert found is None
        first = data[0][0].double()
        seen = (first - _OwnNormalization().mean.double()) / _OwnNormalization().std.double()
        note = next(n for n in report.notes if n.startswith("input scale not judged"))
        assert f"body.0 receives values in [{float(seen.min()):.3g}, {float(seen.max()):.3g}], the input [0, 255]" in note
    else:  # converted (and flattened): the first layer receives the raw pixels
        assert found is not None and "raw [0, 255]" in found.message
        assert not any(n.startswith("input scale not judged") for n in report.notes)


class _PackedGRU(nn.Module):
    """A GRU over a PackedSequence (a packing collate_fn's batches), BatchNorm on its last hidden state."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.bn, self.head = nn.GRU(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.bn.running_mean.normal_(0, 0.5)
        self.bn.running_var.uniform_(0.3, 3.0)

    def forward(self, packed):
        return self.head(torch.relu(self.bn(self.rnn(packed)[1][-1])))


def test_packed_sequence_batches_count_their_sequences_not_their_tokens():
    """A PackedSequence holds batch_sizes[0] sequences (its data holds their tokens): 8 batches of 12 sequences are
    96 samples, none ragged, and the statistics and E are those of every batch (float64 reference loops)."""
    from torch.nn.utils.rnn import pack_sequence

    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(8):
        lengths = torch.randint(2, 10, (12,), generator=g).tolist()
        seqs = [2.0 * torch.randn(n, 4, generator=g) for n in lengths]
        batches.append((pack_sequence(seqs, enforce_sorted=False), torch.randint(0, 3, (12,), generator=g)))
    assert len({int(p.data.shape[0]) for p, _ in batches}) > 1  # the token counts differ from batch to batch
    model = _PackedGRU().train()
    report = eg.diagnose(model, batches, progress=False)
    assert (report.samples, report.batch_size) == (96, 12)
    assert report.decompositions["loss"].values["E"] == pytest.approx(eval_loss(model, batches), rel=1e-6)

    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        seen = torch.cat([m64.rnn(p.double())[1][-1] for p, _ in batches]).numpy()  # what the BN layer sees
    model.train()
    result = eg.recalibrate(model, batches, progress=False)
    assert (result.samples, result.batches, result.skipped_batches) == (96, 8, 0)
    np.testing.assert_allclose(model.bn.running_mean.double().numpy(), seen.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn.running_var.double().numpy(), seen.var(0), rtol=1e-5)

    alone = eg.recalibrate(copy.deepcopy(model), [p for p, _ in batches], progress=False)  # batches of the input only
    assert (alone.samples, alone.skipped_batches) == (96, 0)


def test_packed_sequences_move_to_a_device_with_their_batch_sizes_on_the_cpu():
    """PackedSequence requires batch_sizes on the CPU: moved by its own to(), not part by part."""
    from torch.nn.utils.rnn import pack_sequence

    from evalgap.torch.data import to_device

    packed = pack_sequence([torch.randn(3, 2), torch.randn(1, 2)])
    moved = to_device((packed, torch.tensor([0, 1])), torch.device("meta"))
    assert moved[0].data.device.type == "meta" and moved[1].device.type == "meta"
    assert moved[0].batch_sizes.device.type == "cpu" and moved[0].batch_sizes.tolist() == packed.batch_sizes.tolist()


class _FeaturesLastConv(nn.Module):
    """(N, L, F) windows, features last, moved to channels first in forward for a Conv1d (or a BatchNorm1d) first."""

    def __init__(self, first: str, features: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Conv1d(features, 8, 3, padding=1) if first == "conv" else nn.BatchNorm1d(features)
        width = 8 if first == "conv" else features
        self.bn, self.head = nn.BatchNorm1d(width), nn.Linear(width, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.first(x.transpose(1, 2)))).mean(-1))


@pytest.mark.parametrize("first", ["conv", "batchnorm"])
def test_a_convolution_reading_the_last_axis_is_judged_per_feature(first):
    """A Conv1d / BatchNorm1d of F channels fed (N, L, F) transposed reads the features on the last axis: the input
    scale is per feature (not one value per time step on axis 1) and the code handed out normalizes that axis
    (float64 NumPy reference)."""
    rng = np.random.default_rng(1)
    centre, spread = np.array([500.0, 0.0, 3.0]), np.array([100.0, 1.0, 0.5])
    x = torch.from_numpy((rng.normal(size=(128, 24, 3)) * spread + centre).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 128))
    report = eg.diagnose(_FeaturesLastConv(first), (x, y), batch_size=32, progress=False)
    found = report.finding("input_scale")
    x64 = x.double().numpy().reshape(-1, 3)
    np.testing.assert_allclose(found.numbers["mean"], x64.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(found.numbers["std"], x64.std(0), rtol=1e-6)
    space = {"x": x.clone(), "torch": torch}
    exec(found.remedy, space)
    out = space["x"].double().numpy().reshape(-1, 3)
    np.testing.assert_allclose(out.mean(0), 0.0, atol=2e-3)  # constants printed to 4 significant digits
    np.testing.assert_allclose(out.std(0), 1.0, atol=2e-3)


def test_a_convolution_whose_channels_are_on_axis_1_stays_channels_first():
    """(N, C, L) with C == the Conv1d's in_channels: axis 1, even when L happens to equal C too."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy((rng.normal(size=(64, 3, 3)) * np.array([[50.0], [1.0], [0.1]]) + 20.0).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 64))
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    found = eg.diagnose(model, (x, y), batch_size=16, progress=False).finding("input_scale")
    x64 = np.moveaxis(x.double().numpy(), 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(found.numbers["std"], x64.std(0), rtol=1e-6)
