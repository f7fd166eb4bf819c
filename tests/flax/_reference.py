"""Shared helpers for the Flax tests: the test models (NNX and Linen, same architecture) and an
independent float64 NumPy reference of their forward pass and BatchNorm population statistics.

The reference never calls Flax or evalgap: it runs the network in NumPy float64 from the
model's weights (convolution by explicit windows), each BatchNorm on batch statistics (or on
its moving statistics when frozen), dropout off, and takes each BatchNorm input's moments over
the concatenation of all batches.
"""

from __future__ import annotations

from functools import lru_cache, partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

BN = ("bn1", "bn2", "bn3")
CLASSES = 5
#: He-normal without truncation: XLA compiles a truncated normal slowly on the CPU, once per shape.
INIT = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


# ---- the models ------------------------------------------------------------------------
class NnxCNN(nnx.Module):
    """conv-BN-relu, conv-BN(frozen)-relu, dropout, mean pool, dense-BN; channels last."""

    def __init__(self, rngs: nnx.Rngs, *, frozen: bool = True, momentum: float = 0.99):
        self.c1 = nnx.Conv(3, 6, (3, 3), kernel_init=INIT, rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, momentum=momentum, rngs=rngs)
        self.c2 = nnx.Conv(6, 6, (3, 3), kernel_init=INIT, rngs=rngs)
        self.bn2 = nnx.BatchNorm(6, use_running_average=frozen, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc = nnx.Linear(6, CLASSES, kernel_init=INIT, rngs=rngs)
        self.bn3 = nnx.BatchNorm(CLASSES, momentum=momentum, epsilon=1e-3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.c1(x)))
        x = nnx.relu(self.bn2(self.c2(x)))
        x = self.drop(x.mean((1, 2)))
        return self.bn3(self.fc(x))


class LinenCNN(nn.Module):
    """The same network in Linen, with a ``train`` flag."""

    frozen: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(nn.Conv(6, (3, 3), kernel_init=INIT, name="c1")(x)))
        x = nn.Conv(6, (3, 3), kernel_init=INIT, name="c2")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=self.frozen or not train, momentum=0.9, name="bn2")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x.mean((1, 2)))
        return nn.BatchNorm(use_running_average=not train, epsilon=1e-3, name="bn3")(nn.Dense(CLASSES, kernel_init=INIT, name="fc")(x))


class CallArgs(nnx.Module):
    """An ``NnxCNN``'s layers with their modes as call arguments and a ``train`` flag: bn2 frozen at the call site
    (a frozen backbone, whatever its attribute), bn1 and bn3 ``use_running_average=not train``; no dropout (``forward``)."""

    def __init__(self, net: NnxCNN):
        self.net = net

    def __call__(self, x, train: bool = False):
        n = self.net
        x = nnx.relu(n.bn1(n.c1(x), use_running_average=not train))
        x = nnx.relu(n.bn2(n.c2(x), use_running_average=True))
        return n.bn3(n.fc(x.mean((1, 2))), use_running_average=not train)


def far_batches(n: int = 5, size: int = 16, seed: int = 1, hw: int = 8):
    """Inputs far from zero (N(100, 30)) with integer labels."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(100.0, 30.0, (size, hw, hw, 3)).astype(np.float32), rng.integers(0, CLASSES, size)) for _ in range(n)]


@partial(nnx.jit, static_argnames=("frozen", "momentum"))
def _nnx_build(key, frozen: bool = True, momentum: float = 0.99) -> NnxCNN:
    return NnxCNN(nnx.Rngs(key), frozen=frozen, momentum=momentum)  # compiled once: eager initializers compile per shape


def nnx_model(seed: int = 0, **kw) -> NnxCNN:
    model = _nnx_build(jax.random.key(seed), **kw)
    _perturb_nnx(model)
    return model


def _perturb_nnx(model: NnxCNN) -> None:
    """Non-trivial moving statistics and BN parameters, as after some training."""
    rng = np.random.default_rng(7)
    for name in BN:
        bn = getattr(model, name)
        c = bn.num_features
        bn.mean[...] = jnp.asarray(rng.normal(0, 2, c), jnp.float32)
        bn.var[...] = jnp.asarray(rng.uniform(0.5, 3, c), jnp.float32)
        bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
        bn.bias[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)


@lru_cache(maxsize=None)
def _linen_init(seed: int, frozen: bool):
    module = LinenCNN(frozen=frozen)
    return jax.jit(module.init)(jax.random.key(seed), far_batches(1)[0][0])


def linen_model(seed: int = 0, frozen: bool = True):
    module = LinenCNN(frozen=frozen)
    variables = _linen_init(seed, frozen)
    rng = np.random.default_rng(7)
    stats = {k: dict(v) for k, v in variables["batch_stats"].items()}
    params = {k: dict(v) for k, v in variables["params"].items()}
    for name in BN:
        c = stats[name]["mean"].shape[0]
        stats[name]["mean"] = jnp.asarray(rng.normal(0, 2, c), jnp.float32)
        stats[name]["var"] = jnp.asarray(rng.uniform(0.5, 3, c), jnp.float32)
        params[name]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
        params[name]["bias"] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
    return module, {"params": params, "batch_stats": stats}


# ---- weights as NumPy float64 ----------------------------------------------------------
def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def nnx_weights(model: NnxCNN) -> dict:
    w = {name: {"kernel": _f64(getattr(model, name).kernel[...]), "bias": _f64(getattr(model, name).bias[...])} for name in ("c1", "c2", "fc")}
    for name in BN:
        bn = getattr(model, name)
        w[name] = {k: _f64(getattr(bn, k)[...]) for k in ("scale", "bias", "mean", "var")} | {"eps": bn.epsilon}
    return w


def linen_weights(variables) -> dict:
    p, s = variables["params"], variables["batch_stats"]
    w = {name: {"kernel": _f64(p[name]["kernel"]), "bias": _f64(p[name]["bias"])} for name in ("c1", "c2", "fc")}
    for name, eps in zip(BN, (1e-5, 1e-5, 1e-3)):
        w[name] = {"scale": _f64(p[name]["scale"]), "bias": _f64(p[name]["bias"]), "mean": _f64(s[name]["mean"]),
                   "var": _f64(s[name]["var"]), "eps": eps}
    return w


# ---- the float64 forward ---------------------------------------------------------------
def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NHWC x HWIO, stride 1, 'SAME' zero padding, by explicit windows."""
    kh, kw = kernel.shape[:2]
    xp = np.pad(x, ((0, 0), (kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[3],))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i : i + x.shape[1], j : j + x.shape[2], :] @ kernel[i, j]
    return out + bias


def batchnorm(x: np.ndarray, p: dict, batch: bool) -> np.ndarray:
    axes = tuple(range(x.ndim - 1))
    mean, var = (x.mean(axes), x.var(axes)) if batch else (p["mean"], p["var"])
    return (x - mean) / np.sqrt(var + p["eps"]) * p["scale"] + p["bias"]


def forward(w: dict, x: np.ndarray, *, batch: set[str], record: dict | None = None) -> np.ndarray:
    """The network in float64; BN layers in ``batch`` on batch statistics, the others on their moving statistics."""

    def bn(name, h):
        if record is not None:
            record.setdefault(name, []).append(h.reshape(-1, h.shape[-1]))
        return batchnorm(h, w[name], name in batch)

    h = np.maximum(bn("bn1", conv_same(x.astype(np.float64), w["c1"]["kernel"], w["c1"]["bias"])), 0)
    h = np.maximum(bn("bn2", conv_same(h, w["c2"]["kernel"], w["c2"]["bias"])), 0)
    h = h.mean((1, 2)) @ w["fc"]["kernel"] + w["fc"]["bias"]
    return bn("bn3", h)


def population(w: dict, batches, *, batch: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each BN input's mean and biased variance over all batches (BN in ``batch`` on batch statistics)."""
    record: dict = {}
    for x, *_ in batches:
        forward(w, x, batch=batch, record=record)
    return {name: (np.concatenate(xs).mean(0), np.concatenate(xs).var(0)) for name, xs in record.items()}


def assert_stats_close(mean, var, ref: tuple[np.ndarray, np.ndarray], rtol: float = 1e-5, name: str = "") -> None:
    mean, var = _f64(mean), _f64(var)
    np.testing.assert_array_less(np.abs(mean - ref[0]) / np.sqrt(ref[1]), rtol, err_msg=f"{name} mean")
    np.testing.assert_allclose(var, ref[1], rtol=rtol, err_msg=f"{name} var")


# ---- snapshots -------------------------------------------------------------------------
def snapshot(tree) -> dict[str, bytes]:
    """Every leaf of a pytree (an NNX state, Linen variables) as bytes, by path."""
    def raw(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.asarray(jax.device_get(leaf)).tobytes()

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): raw(leaf) for path, leaf in leaves}


def nnx_snapshot(model) -> dict[str, bytes]:
    state = nnx.state(model)
    out = snapshot(state)
    for path, m in nnx.iter_modules(model):
        for attr in ("use_running_average", "deterministic", "momentum", "axis_name", "use_fast_variance"):
            if hasattr(m, attr):
                out[f"{path}.{attr}"] = repr(getattr(m, attr)).encode()
        out[f"{path}.class"] = type(m).__name__.encode()
    return out


def changed(before: dict[str, bytes], after: dict[str, bytes]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
