r"""Numerically stable building blocks that stay stable after export: ``F.logsigmoid`` is stable in eager
mode and TorchScript, but the ONNX exporter lowers it to ``Log(Sigmoid(x))``, ``-inf`` for ``x = -1e4``.
:func:`logsumexp` and :func:`log_softmax` are torch's formulas, with a faster eager form for inference.
"""
import torch
from torch import Tensor

from ._reduction import is_tracing


def log_sigmoid(x: Tensor) -> Tensor:
    r"""``log σ(x) = min(x, 0) - log1p(exp(-|x|))``: finite, with finite gradients, for any finite x."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-torch.abs(x)))


def logsumexp(x: Tensor, dim: int) -> Tensor:
    r"""``log Σ_c exp(x_c)`` over ``dim`` (removed), for ``x`` of shape ``(N, C, *)``.

    .. math::
        \operatorname{lse}(x) = m + \log \sum_c \exp(x_c - m)

    :func:`torch.logsumexp` while exporting or when autograd records ``x``; otherwise (inference) ``x`` is read
    once on the host for its range: inside ``[-40, 40]`` every ``exp(x_c)`` is normal and their sum cannot
    overflow, so ``m = 0`` and the shift's two full-size passes are skipped; outside (logits of ±1e4) ``m`` is
    the row maximum, 0 where not finite; the class sum is :func:`_class_sum`'s. The same value within its
    rounding, by which (only) it may fall below ``max_c x_c``; torch's form never does.
    """
    num_classes = x.shape[dim]
    if is_tracing() or num_classes == 0 or x.numel() == 0 or (torch.is_grad_enabled() and x.requires_grad):
        return torch.logsumexp(x, dim)
    # The vectorised and strided kernels may round differently, and the value must not depend
    # on the memory layout.
    x = x.contiguous()
    dim = dim + x.dim() if dim < 0 else dim
    smallest, largest = torch.aminmax(x)
    if float(smallest.item()) >= -40.0 and float(largest.item()) <= 40.0:
        return _class_sum(torch.exp(x), dim).log_()
    shift = torch.amax(x, dim).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return _class_sum(torch.sub(x, shift.unsqueeze(dim)).exp_(), dim).log_().add_(shift)


def _class_sum(x: Tensor, dim: int) -> Tensor:
    r"""``x.sum(dim)`` for a contiguous ``x``; a matrix-vector product when ``dim`` is the last.

    The product costs a few more ops per call, so it starts paying at about 8192 elements.
    """
    if dim != x.dim() - 1 or x.numel() < 8192:
        return x.sum(dim)
    num_classes = x.shape[dim]
    ones = torch.ones([num_classes], dtype=x.dtype, device=x.device)
    return torch.mv(x.reshape([-1, num_classes]), ones).reshape(x.shape[:dim])


def log_softmax(x: Tensor, dim: int) -> Tensor:
    r"""``log p_c = x_c - \operatorname{lse}(x)`` over ``dim``; :func:`torch.log_softmax` while exporting."""
    if is_tracing():
        return torch.log_softmax(x, dim)
    return x - logsumexp(x, dim).unsqueeze(dim)
