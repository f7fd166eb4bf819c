"""Dense and detection-style data: batches counted by their images, never by an image's channels or a box count;
targets that no default loss takes (NaN 'no label' values, 255 masks) refused with the loss that fits them.

References are independent: the user's own evaluation loop with the same loss (each batch weighted by its number of
images), float64 NumPy moments of each BatchNorm input over all images.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ._reference import reference_population_stats

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import evalgap  # noqa: E402
import evalgap.torch as eg  # noqa: E402
from evalgap.torch.data import batch_size_of  # noqa: E402


class Det(nn.Module):
    """A box regressor that takes a stacked batch or, as torchvision's detection models do, a list of images."""

    def __init__(self, anchors: int = 6):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.box, self.anchors = nn.Linear(8, anchors * 4), anchors

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            x = torch.stack(list(x))
        return self.box(self.f(x)).view(len(x), self.anchors, 4)


def box_loss(out, targets):
    """Per-image L1 loss of its boxes, averaged over the images (targets: one box tensor per image, or dicts)."""
    boxes = [t["boxes"] if isinstance(t, dict) else t for t in targets]
    return sum(nn.functional.l1_loss(out[i, : len(b)], b) for i, b in enumerate(boxes)) / len(boxes)


def own_loop(model, batches, train=False):
    """The user's loop: each batch's mean loss weighted by its number of images."""
    m = copy.deepcopy(model).train(train)
    total = n = 0
    with torch.no_grad():
        for images, targets in batches:
            k = len(images)
            total += float(box_loss(m(images), targets)) * k
            n += k
    return total / n


def _detection_data(n=60, first_boxes=3, seed=1):
    g = np.random.default_rng(seed)
    x = torch.tensor(g.normal(1, 2, (n, 3, 16, 16)).astype(np.float32))
    boxes = [torch.tensor(g.random((int(g.integers(1, 6)), 4)).astype(np.float32)) for _ in range(n)]
    boxes[0] = boxes[0][:1].repeat(first_boxes, 1)  # the first image holds as many boxes as the input has channels
    return x, boxes


def _stale_det():
    torch.manual_seed(0)
    model = Det()
    model.f[1].running_mean.fill_(0.5)  # stale statistics: E differs from Td
    return model.eval()


@pytest.mark.parametrize("form", ["list_of_images_box_tensors", "list_of_images_dicts", "stacked_images_box_tensors"])
def test_detection_batches_count_their_images(form):
    """60 images in batches of 8 (the last of 4): every mode weights a batch by its images, as the user's loop does."""
    x, boxes = _detection_data()
    model = _stale_det()
    batches = []
    for i in range(0, 60, 8):
        images = list(x[i:i + 8]) if form.startswith("list") else x[i:i + 8]
        targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes[i:i + 8]] \
            if form.endswith("dicts") else boxes[i:i + 8]
        batches.append((images, targets))
    report = eg.diagnose(model, batches, loss_fn=box_loss, metrics={}, progress=False)
    assert report.samples == 60 and report.batch_size == 8
    values = report.decompositions["loss"].values
    assert values["E"] == pytest.approx(own_loop(model, batches), rel=1e-6)
    assert values["Td"] == pytest.approx(own_loop(model, batches, train=True), rel=1e-6)


def test_recalibrate_keeps_a_batch_whose_first_image_holds_as_many_boxes_as_channels():
    """8 whole batches of 8; batch 2 (shifted, so leaving it out shows) starts with an image of 3 boxes: no batch is
    ragged, and the statistics are those of all 64 images."""
    g = np.random.default_rng(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.tensor(g.normal(1, 2, (64, 3, 16, 16)).astype(np.float32))
    x[16:24] += 5.0
    boxes = [torch.rand(int(g.choice([1, 2, 4, 5])), 4) for _ in range(64)]
    boxes[16] = torch.rand(3, 4)
    batches = [(x[i:i + 8], boxes[i:i + 8]) for i in range(0, 64, 8)]
    ref = reference_population_stats(model, [xb for xb, _ in batches])["1"]
    result = eg.recalibrate(model, batches, progress=False)
    assert result.samples == 64 and result.skipped_samples == 0 and result.skipped_batches == 0
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model[1].running_var.double().numpy(), ref[1], rtol=1e-5)


def test_batch_size_of_every_batch_form():
    """Each form against the number of samples it was built with."""
    img = [torch.randn(3, 16, 16) for _ in range(8)]
    varied = [torch.rand(k, 4) for k in (3, 1, 2, 5, 4, 1, 2, 3)]
    same = [torch.rand(2, 4) for _ in range(8)]  # every image with 2 boxes: neither 3 channels nor 16 rows
    x1, x2 = torch.randn(16, 6), torch.randn(16, 2)
    y, y2 = torch.randint(0, 3, (16,)), torch.randn(16, 4)
    seq = torch.randn(7, 16, 5)  # (T, N, F)
    cases = [
        ((img, varied), 8), ((img, same), 8), ((img, [{"boxes": b} for b in varied]), 8),
        ((img, torch.randint(0, 3, (8,))), 8), ((tuple(img), tuple(varied)), 8),
        ({"images": img, "targets": [{"boxes": b} for b in varied]}, 8),
        ((torch.stack(img), varied), 8), ((torch.stack(img), [torch.rand(3, 4) for _ in range(8)]), 8),
        (((x1, x2), y), 16), (((x1, x2), (y, y2)), 16), (((x1, x2), [y, y2]), 16), (((x1, x2),), 16),
        ((seq, y), 16), (((seq, torch.randn(16, 2)), y), 16), ((seq, (y, y2)), 16), ((seq, {"labels": y}), 16),
        ((torch.randn(16, 6), y), 16), (torch.randn(5, 3), 5),
    ]
    for batch, want in cases:
        assert batch_size_of(batch) == want, batch if not isinstance(batch, tuple) else [type(b).__name__ for b in batch]


def test_batch_size_of_a_list_of_images_whose_targets_shapes_also_read_as_batched_inputs():
    """2 images (3, 32, 32) with masks (32, 32), or with 3 boxes each, have the shapes of ((x1, x2), (y1, y2)) of 32
    (sequence-first) or 3 rows: counted so, as the docstring says; stacked images count 2 whatever the targets."""
    images = [torch.zeros(3, 32, 32) for _ in range(2)]
    masks, boxes = [torch.zeros(32, 32, dtype=torch.int64)] * 2, [torch.rand(3, 4)] * 2
    assert batch_size_of((images, masks)) == 32 and batch_size_of((images, boxes)) == 3  # shapes alone cannot tell
    assert batch_size_of((images, [{"boxes": b} for b in boxes])) == 2
    assert batch_size_of((torch.stack(images), masks)) == 2 and batch_size_of((torch.stack(images), boxes)) == 2
    assert batch_size_of((torch.zeros(4, 3, 32, 48), [torch.zeros(32, 48)] * 4)) == 4


# --- targets no default takes ------------------------------------------------------------------------------------
class Depth(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 1))

    def forward(self, x):
        return self.body(x)


def _depth_batches(nan_rows=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=g) * 2 + 1
    t = x[:, :1] * 0.5
    t[:, :, :nan_rows] = float("nan")  # no depth there: 64 of 256 pixels per image
    return [(x[i:i + 32], t[i:i + 32]) for i in (0, 32)]


def masked_mse(out, t):
    keep = t.isfinite()
    return nn.functional.mse_loss(out[keep], t[keep])


def test_nan_targets_get_no_default_loss_but_a_masking_loss_measures_them():
    torch.manual_seed(0)
    model = Depth().eval()
    batches = _depth_batches()
    with pytest.raises(evalgap.DataError, match=r"non-finite values \(NaN or Inf: 2048 of 8192 in the first batch\).*loss_fn"):
        eg.diagnose(model, batches, progress=False)
    report = eg.diagnose(model, batches, loss_fn=masked_mse, progress=False)  # regression has no default metric
    with torch.no_grad():
        want = sum(float(masked_mse(model(x), t)) * len(x) for x, t in batches) / 64
    assert report.decompositions["loss"].values["E"] == pytest.approx(want, rel=1e-6)


def test_a_loss_that_gives_nan_is_reported_as_not_finite_not_as_noise():
    """A user's loss that does not mask NaN targets: every mode NaN, and the report says so instead of 'no significant
    cause' or 'within the noise threshold'."""
    torch.manual_seed(0)
    model = Depth()
    model.body[1].running_mean.fill_(0.3)  # drifted statistics: a drift finding
    report = eg.diagnose(model.eval(), _depth_batches(), loss_fn=nn.MSELoss(), metrics={}, progress=False)
    text = str(report)
    assert "No significant cause" not in text and "noise threshold" not in text
    assert "loss is not finite in modes T, Td, P and E" in report.headline()
    assert "cannot be measured: loss is not finite in modes T, Td, P and E" in report.finding("drift").message


def _segmentation(marker):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (32, 8, 8), generator=g)
    y[:, :2] = marker
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    return model, [(x[i:i + 16], y[i:i + 16]) for i in (0, 16)]


@pytest.mark.parametrize("marker", [255, -100])
def test_masks_with_an_ignore_marker_name_the_loss_that_leaves_it_out(marker):
    model, batches = _segmentation(marker)
    with pytest.raises(evalgap.DataError, match=rf"check the label encoding.*CrossEntropyLoss\(ignore_index={marker}\)"):
        eg.diagnose(model, batches, progress=False)


def test_the_suggested_ignore_loss_and_metric_measure_the_masks():
    """The suggestion works as given: CrossEntropyLoss(ignore_index=255), torchmetrics' micro accuracy ignoring 255."""
    torchmetrics = pytest.importorskip("torchmetrics")
    model, batches = _segmentation(255)
    accuracy = torchmetrics.classification.MulticlassAccuracy(4, ignore_index=255, average="micro")
    report = eg.diagnose(model, batches, loss_fn=nn.CrossEntropyLoss(ignore_index=255), metrics={"accuracy": accuracy},
                         progress=False)
    with torch.no_grad():
        outs = [(model(x), y) for x, y in batches]
    keep = [y != 255 for _, y in outs]
    want_acc = sum(int(((o.argmax(1) == y) & k).sum()) for (o, y), k in zip(outs, keep)) / sum(int(k.sum()) for k in keep)
    want_loss = sum(float(nn.functional.cross_entropy(o, y, ignore_index=255)) * len(y) for o, y in outs) / 32
    assert report.decompositions["accuracy"].values["E"] == pytest.approx(want_acc, rel=1e-6)
    assert report.decompositions["loss"].values["E"] == pytest.approx(want_loss, rel=1e-6)


def test_labels_out_of_range_without_a_marker_keep_the_encoding_error():
    model, batches = _segmentation(7)  # one class too many: an encoding error, not an ignore marker
    with pytest.raises(evalgap.DataError, match="check the label encoding") as info:
        eg.diagnose(model, batches, progress=False)
    assert "ignore_index" not in str(info.value)
