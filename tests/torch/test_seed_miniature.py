"""The seed's symptom in miniature, and recalibration closing it (PyTorch)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
from torch import nn  # noqa: E402

import evalgap.torch as eg  # noqa: E402
from evalgap.data import load_digits_rgb  # noqa: E402
from evalgap.seed.torch_demo import evaluate, to_tensors, train_with_same_validation  # noqa: E402


@torch.no_grad()
def training_mode_accuracy(model, x, y, batch_size):
    """BN with batch statistics, dropout off, on a copy (no running-stat side effects)."""
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    n = len(x) - len(x) % batch_size
    correct = sum(int((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, n, batch_size))
    return correct / n


def test_eval_accuracy_far_below_training_mode_then_within_one_point():
    images, labels = load_digits_rgb(16)
    model, logs = train_with_same_validation(images, labels, epochs=3, batch_size=120, momentum=0.01)
    x, y = to_tensors(images, labels)
    # the same shuffled batches the user trains with
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    x, y = x[order], y[order]
    train_acc = training_mode_accuracy(model, x, y, 120)
    _, eval_acc = evaluate(model, x, y, 120)
    assert train_acc > 0.8
    assert train_acc - eval_acc > 0.3, (train_acc, eval_acc)  # the symptom
    assert logs[-1].accuracy - logs[-1].val_accuracy > 0.3  # as fit-style logs report it

    eg.recalibrate(model, [x[i : i + 120] for i in range(0, len(x), 120)], progress=False)
    _, fixed_acc = evaluate(model, x, y, 120)
    assert abs(train_acc - fixed_acc) <= 0.01, (train_acc, fixed_acc)
