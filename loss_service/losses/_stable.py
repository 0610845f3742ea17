r"""Numerically stable building blocks that stay stable after export.

``torch.nn.functional.logsigmoid`` is stable in eager mode and TorchScript, but the ONNX exporter
lowers it to ``Log(Sigmoid(x))``, which is ``-inf`` for ``x = -1e4``. The forms here are written
with operations that every runtime evaluates stably.
"""
import torch
from torch import Tensor


def log_sigmoid(x: Tensor) -> Tensor:
    r"""``log σ(x) = min(x, 0) - log1p(exp(-|x|))``: finite, with finite gradients, for any finite x."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-torch.abs(x)))
