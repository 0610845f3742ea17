r"""Numerically stable building blocks that stay stable after export.

``torch.nn.functional.logsigmoid`` is stable in eager mode and TorchScript, but the ONNX exporter
lowers it to ``Log(Sigmoid(x))``, which is ``-inf`` for ``x = -1e4``. The forms here are written
with operations that every runtime evaluates stably.

:func:`logsumexp` and :func:`log_softmax` are the same formulas as torch's, with a faster eager
path for the few-class case (see :func:`logsumexp`).
"""
import torch
from torch import Tensor

from ._reduction import is_exporting


def log_sigmoid(x: Tensor) -> Tensor:
    r"""``log σ(x) = min(x, 0) - log1p(exp(-|x|))``: finite, with finite gradients, for any finite x."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-torch.abs(x)))


def logsumexp(x: Tensor, dim: int) -> Tensor:
    r"""``log Σ_c exp(x_c)`` over ``dim`` (removed), for ``x`` of shape ``(N, C, *)``.

    .. math::
        \operatorname{lse}(x) = m + \log \sum_c \exp(x_c - m), \qquad m = \max_c x_c

    For ``C <= 16`` outside export, ``m`` and the sum are accumulated over the ``C`` class slices
    (elementwise ops over the other dimensions) instead of a reduction over a short dimension. ``m``
    is detached (the value does not depend on it) so that the gradient is exactly the softmax, and
    a non-finite ``m`` (a row of ``-inf``) is replaced by 0, as torch does. Otherwise, and while
    exporting, this is :func:`torch.logsumexp`.
    """
    num_classes = x.shape[dim]
    # Up to 16 classes one slice at a time: torch's reduction kernels are ~3x slower when the
    # reduced dimension is that short (and TorchScript cannot read a module-level constant).
    if is_exporting() or num_classes == 0 or num_classes > 16:
        return torch.logsumexp(x, dim)
    columns = torch.unbind(x, dim)
    largest = columns[0]
    for column in columns[1:]:
        largest = torch.maximum(largest, column)
    # A row of -inf (or +inf) would give inf - inf = NaN below; torch.logsumexp uses 0 there too.
    largest = torch.nan_to_num(largest.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    total = torch.exp(columns[0] - largest)
    for column in columns[1:]:
        total = total + torch.exp(column - largest)
    return largest + torch.log(total)


def log_softmax(x: Tensor, dim: int) -> Tensor:
    r"""``log p_c = x_c - \operatorname{lse}(x)`` over ``dim``; :func:`torch.log_softmax` while exporting."""
    if is_exporting():
        return torch.log_softmax(x, dim)
    return x - logsumexp(x, dim).unsqueeze(dim)
