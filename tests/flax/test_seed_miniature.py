"""The seed's symptom in miniature in Flax NNX: raw 0..255 digits, momentum 0.99, few steps an epoch,
validation on the training data itself; diagnose names the cause, recalibrate closes the gap."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("flax")
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import evalgap.flax as eg  # noqa: E402
from evalgap.data import load_digits_rgb  # noqa: E402

BATCH = 120


class SmallNet(nnx.Module):
    """Conv-BN-relu x3 (strides 1, 2, 2), global pooling, linear head; BatchNorm momentum 0.99 (Flax's default)."""

    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")  # compiles faster than a truncated normal
        self.convs = nnx.List([nnx.Conv(c_in, c_out, (3, 3), strides=s, use_bias=False, kernel_init=init, rngs=rngs)
                               for c_in, c_out, s in ((3, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 2))])
        self.bns = nnx.List([nnx.BatchNorm(c, rngs=rngs) for c in (width, 2 * width, 2 * width)])
        self.head = nnx.Linear(2 * width, 10, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = nnx.relu(bn(conv(x)))
        return self.head(x.mean((1, 2)))


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def accuracy(model, batches, *, training_mode: bool) -> float:
    """An evaluation loop written here: Flax's own modes on a clone, per-sample accuracy."""
    m = nnx.clone(model)
    m.train() if training_mode else m.eval()
    run = nnx.jit(lambda m, x: m(x))
    correct = sum(int((np.argmax(np.asarray(run(m, x)), -1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def test_eval_accuracy_far_below_training_mode_then_within_two_points():
    images, labels = load_digits_rgb(16)
    x, y = images.astype(np.float32), labels  # raw 0..255 pixels
    model = nnx.jit(lambda: SmallNet(nnx.Rngs(0)))()  # one compiled initialization, not one per weight shape
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    for _ in range(3):  # 14 steps an epoch: the moving statistics stay far behind
        order = rng.permutation(len(x))
        for i in range(0, len(x) - BATCH + 1, BATCH):
            train_step(model, optimizer, x[order[i : i + BATCH]], y[order[i : i + BATCH]])
    order = rng.permutation(len(x))
    batches = [(x[order[i : i + BATCH]], y[order[i : i + BATCH]]) for i in range(0, len(x) - BATCH + 1, BATCH)]

    train_acc = accuracy(model, batches, training_mode=True)
    eval_acc = accuracy(model, batches, training_mode=False)
    assert train_acc > 0.8, train_acc
    assert train_acc - eval_acc > 0.3, (train_acc, eval_acc)  # the symptom

    report = eg.diagnose(model, batches, progress=False)
    assert report.causes[0][0] == "stale_moving_statistics", str(report)
    assert report.decompositions["accuracy"].values["E"] == pytest.approx(eval_acc, abs=1e-6)  # float32 batch means; one sample is 6e-4
    assert "evalgap.flax.recalibrate(model, train_data)" in str(report)

    eg.recalibrate(model, batches, progress=False)
    fixed_acc = accuracy(model, batches, training_mode=False)
    assert abs(train_acc - fixed_acc) <= 0.02, (train_acc, fixed_acc)
