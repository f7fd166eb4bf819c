"""Flax: targets no default loss takes. NaN 'no label' values are refused with how many and a masking loss to pass;
masks whose out-of-range labels are all 255 name a loss that leaves them out, and that loss measures them."""

from __future__ import annotations

import numpy as np
import pytest

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import evalgap  # noqa: E402
import evalgap.flax as eg  # noqa: E402


class Dense(nnx.Module):
    """A channels-last per-pixel head: (N, H, W, 3) -> (N, H, W, out)."""

    def __init__(self, out: int, rngs):
        self.c = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Conv(4, out, (1, 1), rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.c(x))))


def _inputs(n=32, hw=8):
    return np.random.default_rng(0).normal(1.0, 2.0, (n, hw, hw, 3)).astype(np.float32)


def _eval_outputs(model, data):
    m = nnx.clone(model)
    m.eval()
    return [(np.asarray(m(jnp.asarray(x)), np.float64), y) for x, y in data]


def test_nan_targets_get_no_default_but_a_masking_loss_measures_them():
    x = _inputs()
    t = x[..., :1] * 0.5
    t[:, :2] = np.nan  # no depth there: 16 of 64 pixels per image
    data = [(x[i:i + 16], t[i:i + 16]) for i in (0, 16)]
    model = Dense(1, nnx.Rngs(0))
    with pytest.raises(evalgap.DataError, match=r"non-finite values \(NaN or Inf: 256 of 1024 in the first batch\).*jnp\.isfinite"):
        eg.diagnose(model, data, progress=False)

    def masked(o, y):
        keep = jnp.isfinite(y)
        return jnp.where(keep, (o - jnp.nan_to_num(y)) ** 2, 0).sum() / keep.sum()

    report = eg.diagnose(model, data, loss_fn=masked, progress=False)
    want = sum(np.nanmean((o - y) ** 2) * len(y) for o, y in _eval_outputs(model, data)) / 32
    assert report.decompositions["loss"].values["E"] == pytest.approx(want, rel=1e-5)


def test_masks_of_255_name_a_loss_that_masks_them_and_it_measures_them():
    x = _inputs()
    y = (x[..., 0] > 1).astype(np.int32) + (x[..., 1] > 2)
    y[:, :2] = 255
    data = [(x[i:i + 16], y[i:i + 16]) for i in (0, 16)]
    model = Dense(3, nnx.Rngs(0))
    with pytest.raises(evalgap.DataError, match=r"check the label encoding.*all 255.*t != 255") as info:
        eg.diagnose(model, data, progress=False)
    assert "torch" not in str(info.value)

    def loss(o, t):
        return (optax.softmax_cross_entropy_with_integer_labels(o, jnp.where(t == 255, 0, t)) * (t != 255)).sum() / (t != 255).sum()

    def accuracy(o, t):
        return ((o.argmax(-1) == t) & (t != 255)).sum() / (t != 255).sum()

    report = eg.diagnose(model, data, loss_fn=loss, metrics={"accuracy": accuracy}, progress=False)
    pairs = _eval_outputs(model, data)
    keep = [t != 255 for _, t in pairs]
    want_acc = sum(((o.argmax(-1) == t) & k).sum() / k.sum() * len(t) for (o, t), k in zip(pairs, keep)) / 32
    logp = [jax.nn.log_softmax(o, -1) for o, _ in pairs]
    want_loss = sum(-(np.take_along_axis(np.asarray(lp), np.where(k, t, 0)[..., None], -1)[..., 0] * k).sum() / k.sum() * len(t)
                    for lp, (_, t), k in zip(logp, pairs, keep)) / 32
    assert report.decompositions["accuracy"].values["E"] == pytest.approx(want_acc, rel=1e-5)
    assert report.decompositions["loss"].values["E"] == pytest.approx(want_loss, rel=1e-5)
