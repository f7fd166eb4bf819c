"""Code to paste, for PyTorch users."""

from __future__ import annotations

from typing import Sequence


def _vec(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


class TorchRemedies:
    api = "evalgap.torch"
    data = "train_loader"

    def recalibrate(self, include_frozen: bool = False) -> str:
        return f"import evalgap.torch\nevalgap.torch.recalibrate(model, train_loader{', include_frozen=True' if include_frozen else ''})"

    def before_validation(self) -> str:
        return "precise_bn = evalgap.torch.PreciseBN(train_loader); precise_bn(model, epoch)  # before each validation"

    def momentum(self, momentum: float) -> str:
        return ("for m in model.modules():  # every BatchNorm layer: a memory of at most half an epoch\n"
                f"    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm): m.momentum = {momentum}")

    def rescale(self, mean: Sequence[float], std: Sequence[float], *, axis: int = 1) -> str:
        """``x = (x - mean_c) / std_c`` per channel: axis 1 of an (N, C, ...) input, the one value of an (N,)
        input (what :meth:`InputScale.measure` measured); on x's device and dtype. A constant channel (std 0)
        is only centred. ``axis`` -1 with several channels: features on the last axis ((N, F), or (N, L, F)
        sequences into a Linear or an RNN)."""
        std = [s if s > 0 else 1.0 for s in std]
        if axis == -1 and len(mean) > 1:
            return (f"mean, std = torch.tensor({_vec(mean)}), torch.tensor({_vec(std)})  # per feature, measured on your data\n"
                    "x = (x - mean.to(x)) / std.to(x)  # features on the last axis")
        return (f"mean, std = torch.tensor({_vec(mean)}), torch.tensor({_vec(std)})  # per channel, measured on your data\n"
                "shape = (1, -1) + (1,) * (x.dim() - 2) if x.dim() > 1 else (-1,)  # channels on axis 1\n"
                "x = (x - mean.view(shape).to(x)) / std.view(shape).to(x)")

    def normalize(self, mean: Sequence[float], std: Sequence[float], *, axis: int = 1) -> str:
        return self.rescale(mean, std, axis=axis)

    def synchronized(self) -> str:
        return "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)"

    def monitor_fix(self) -> str:
        return "call evalgap.torch.recalibrate(model, train_loader) before validating"


REMEDIES = TorchRemedies()
