"""The seed's symptom in miniature, in PyTorch, on the embedded digits.

A small ResNet-style BatchNorm network trained on raw 0..255 pixels with Adam, few steps
per epoch (1797 images, batch 120: 15 steps) and BatchNorm momentum 0.01 (PyTorch's
convention; Keras's 0.99), validated on the training data itself, as the seed did.
Evaluation-mode accuracy lags far behind; :func:`evalgap.torch.recalibrate` closes the gap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..torch import recalibrate


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=momentum)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, momentum=momentum))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def small_resnet(classes: int = 10, momentum: float = 0.01, width: int = 16) -> nn.Module:
    """Stem conv + BN, two residual blocks (stride 2), global pooling, linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width, momentum=momentum),
        nn.ReLU(),
        _Block(width, 2 * width, 2, momentum),
        _Block(2 * width, 4 * width, 2, momentum),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC images to float32 NCHW (raw 0..255 values kept), int64 labels."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
    return x, torch.from_numpy(labels).long()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in evaluation mode: BN uses its running statistics.

    The model's modes are restored afterwards.
    """
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            loss += float(nn.functional.cross_entropy(logits, y[i : i + batch_size], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    finally:
        model.train(was)
    return loss / len(x), correct / len(x)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    precise_val_loss: float
    precise_val_accuracy: float


def train_with_same_validation(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 8,
    batch_size: int = 120,
    momentum: float = 0.01,
    seed: int = 0,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> tuple[nn.Module, list[EpochLog]]:
    """Train :func:`small_resnet` with Adam; validate on the training data after each epoch.

    ``val_*`` use the moving statistics (what a framework's validation reports);
    ``precise_val_*`` use exact population statistics computed on a side copy, so the
    training trajectory is untouched.
    """
    torch.manual_seed(seed)
    x, y = to_tensors(images, labels)
    model = small_resnet(int(labels.max()) + 1, momentum)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(seed)
    logs = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
        val_loss, val_acc = evaluate(model, x, y, batch_size)
        side = copy.deepcopy(model)
        loader = [x[order[i : i + batch_size]] for i in range(0, len(x), batch_size)]
        recalibrate(side, loader, progress=False)
        p_loss, p_acc = evaluate(side, x, y, batch_size)
        log = EpochLog(epoch, total_loss / seen, correct / seen, val_loss, val_acc, p_loss, p_acc)
        logs.append(log)
        if on_epoch is not None:
            on_epoch(log)
    return model, logs
