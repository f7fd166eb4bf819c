"""Code to paste, for Flax users (NNX first; the Linen form where it differs)."""

from __future__ import annotations

from typing import Sequence


def _vec(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


class FlaxRemedies:
    api = "evalgap.flax"
    data = "train_data"

    def recalibrate(self, include_frozen: bool = False) -> str:
        extra = ", include_frozen=True" if include_frozen else ""
        return (f"import evalgap.flax\nevalgap.flax.recalibrate(model, train_data{extra})  "
                f"# Linen: result, variables = evalgap.flax.recalibrate((module, variables), train_data{extra})")

    def before_validation(self) -> str:
        return "precise_bn = evalgap.flax.PreciseBN(train_data); precise_bn(model, epoch)  # before each validation"

    def momentum(self, momentum: float) -> str:
        return f"nnx.BatchNorm(C, momentum={momentum}, rngs=rngs)  # or nn.BatchNorm(momentum={momentum}); memory of at most half an epoch"

    def rescale(self, mean: Sequence[float], std: Sequence[float], *, axis: int = -1) -> str:
        return f"x = x / 255.0  # or {self.normalize(mean, std, axis=axis)}"

    def normalize(self, mean: Sequence[float], std: Sequence[float], *, axis: int = -1) -> str:
        if axis == -1:
            return f"x = (x - jnp.array({_vec(mean)})) / jnp.array({_vec(std)})  # channels last, before the model"
        shape = "(1, -1) + (1,) * (x.ndim - 2)"  # channels on axis 1
        return f"x = (x - jnp.array({_vec(mean)}).reshape({shape})) / jnp.array({_vec(std)}).reshape({shape})  # before the model"

    def synchronized(self) -> str:
        return "nnx.BatchNorm(C, axis_name='data', rngs=rngs)  # under pmap/shard_map; jit over sharded batches already normalizes the global batch"

    def monitor_fix(self) -> str:
        return "call evalgap.flax.recalibrate(model, train_data) before validating"


REMEDIES = FlaxRemedies()
