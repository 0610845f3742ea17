r"""Hand-written backward passes for the eager kernels whose autograd graph is the cost.

Autograd records every elementwise step of a formula and replays each one backwards, saving its
inputs: a focal loss becomes some forty passes over memory and as many saved tensors. Here the
forward runs the kernel's formula without recording it, saves a handful of tensors, and the backward
is the closed-form derivative. These run only in eager mode outside tracing (not in TorchScript,
``torch.compile`` or export, which keep the formula in the kernel and autograd's derivative of it)
and only where ``python bench/bench_kernels.py --forms`` measures them at least 1.5x faster than the
formula (the table is in docs/benchmarks.md);
the parity tests compare both against the same references and gradients.
"""
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._stable import logsumexp


class BinaryFocal(torch.autograd.Function):
    r"""The sigmoid focal term :math:`\ell = \alpha_t\,q^\gamma\,\mathrm{CE}` of
    :func:`~loss_service.losses.focal.binary_focal_statistics`, with :math:`s = \sigma(x)`,
    :math:`\bar s = \sigma(-x)`, :math:`q = 1 - p_t = s\,(1 - t) + \bar s\,t`, the positive weight :math:`w_+`
    (1 without ``pos_weight``), :math:`a = w_+ t + 1 - t` and :math:`\mathrm{CE} = (1 - t)\,x - a \log s`.

    .. math::
        \frac{\partial \ell}{\partial x} = \alpha_t\,q^\gamma
            \Big[\gamma\,\frac{s\,\bar s}{q}\,(1 - 2t)\,\mathrm{CE} + a\,s - w_+ t\Big]

    since :math:`\partial q / \partial x = s\,\bar s\,(1 - 2t)` and
    :math:`\partial\,\mathrm{CE} / \partial x = a\,s - w_+ t` (:math:`s - t` without ``pos_weight``). For targets in
    ``[0, 1]``, :math:`q \ge \min(s, \bar s) \ge s\,\bar s`, so the ratio is at most 1; where :math:`q` underflows
    to 0 its numerator is 0 too and the ratio is taken as 0 (finite for every ``γ >= 0``).
    ``alpha < 0`` means :math:`\alpha_t = 1`. No gradient flows to the targets or ``pos_weight``.
    """

    @staticmethod
    def compute(
        x: Tensor, t: Tensor, alpha: float, gamma: float, positive_weight: Optional[Tensor]
    ) -> Tuple[Tensor, Tuple[Optional[Tensor], ...]]:
        r"""The loss, and what the backward reads: ``(t, s, s_bar, q, CE, alpha_t q^gamma, a, w_+ t)`` (the last
        two ``None`` without ``pos_weight``)."""
        log_s = F.logsigmoid(x)
        not_t = 1.0 - t
        scale: Optional[Tensor] = None
        weighted_t: Optional[Tensor] = None
        if positive_weight is None:
            cross_entropy = torch.addcmul(-log_s, not_t, x)
        else:
            weighted_t = positive_weight * t
            scale = not_t + weighted_t
            cross_entropy = torch.addcmul(not_t * x, scale, log_s, value=-1.0)
        s = log_s.exp()
        # σ(-x) = exp(log σ(x) - x), not 1 - σ(x), which cancels to 0 for x >> 0.
        s_bar = log_s.sub_(x).exp_()
        q = torch.addcmul(not_t.mul_(s), s_bar, t)
        focal_weight = q.pow(gamma)
        if alpha >= 0:
            focal_weight.mul_(t * (2.0 * alpha - 1.0) + (1.0 - alpha))
        return cross_entropy * focal_weight, (t, s, s_bar, q, cross_entropy, focal_weight, scale, weighted_t)

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: Tensor, alpha: float, gamma: float, positive_weight: Optional[Tensor]) -> Tensor:
        loss, saved = BinaryFocal.compute(x, t, alpha, gamma, positive_weight)
        ctx.save_for_backward(*saved)
        ctx.gamma = gamma
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None, None]:
        t, s, s_bar, q, cross_entropy, focal_weight, scale, weighted_t = ctx.saved_tensors
        ratio = (s * s_bar).div_(q.clamp_min(torch.finfo(q.dtype).tiny)).mul_(torch.rsub(t, 1.0, alpha=2.0))
        d_cross_entropy = s - t if scale is None else (s * scale).sub_(weighted_t)
        inner = torch.addcmul(d_cross_entropy, ratio, cross_entropy, value=ctx.gamma)
        return inner.mul_(focal_weight).mul_(grad), None, None, None, None


@torch.jit.unused
def binary_focal(x: Tensor, t: Tensor, alpha: float, gamma: float, positive_weight: Optional[Tensor]) -> Tensor:
    r""":class:`BinaryFocal` of logits ``x`` and targets ``t`` (same shape and dtype; ``positive_weight`` broadcast
    to them or ``None``); without autograd recording ``x``, the forward alone."""
    if _recording(x):
        return BinaryFocal.apply(x, t, alpha, gamma, positive_weight)
    return BinaryFocal.compute(x, t, alpha, gamma, positive_weight)[0]


def _recording(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class SoftmaxTargetTerm(torch.autograd.Function):
    r"""The target's term :math:`f(p_y)` of the softmax losses for class indices ``y`` (already valid
    classes), :math:`f(p) = -\log p` (cross-entropy, ``gamma`` ``None``) or
    :math:`(1 - p)^\gamma (-\log p)` (focal). With :math:`h = p\,f'(p)`,

    .. math::
        \frac{\partial f(p_y)}{\partial x_c} = h_y\,(\delta_{cy} - p_c),\qquad
        h = -1\ \text{(cross-entropy)},\quad
        h = -(1 - p)^\gamma \Big[\frac{\gamma\,p\,(-\log p)}{1 - p} + 1\Big]\ \text{(focal)},

    where :math:`(-\log p) / (1 - p) \to 1` as :math:`p \to 1` (the ratio is taken at
    :math:`1 - p` no smaller than the dtype's smallest normal number, where :math:`-\log p` is 0 in
    that dtype: finite for every ``γ >= 0``). The forward saves what :math:`\log p` is recomputed
    from (see :meth:`compute`); the backward is one exponential, one product and a scatter.
    """

    @staticmethod
    def compute(
        x: Tensor, index: Tensor, dim: int, gamma: Optional[float]
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        r"""``(f(p_y), log p_y, source, offset)`` for ``index`` of shape ``x`` without its classes but with
        ``dim``; :math:`\log p = source - offset` (``offset`` ``None``: 0). Classes along the last,
        short, dimension: one logsumexp and a gather (``source = x``, ``offset = lse``), as a log-softmax
        there is several times slower; along an inner dimension torch's log-softmax is the faster
        (``source = log p``)."""
        offset: Optional[Tensor] = None
        if dim == x.dim() - 1:
            offset = logsumexp(x, dim)
            source = x
            # The unshifted logsumexp may round an ulp below a dominant x_y: log p_y <= 0.
            log_p_y = torch.sub(x.gather(dim, index).squeeze(dim), offset).clamp_(max=0.0)
        else:
            source = torch.log_softmax(x, dim)
            log_p_y = source.gather(dim, index).squeeze(dim)
        term = log_p_y.neg()
        if gamma is not None:
            term = torch.expm1(log_p_y).neg_().pow_(gamma).mul_(term)
        return term, log_p_y, source, offset

    @staticmethod
    def forward(ctx: Any, x: Tensor, indices: Tensor, dim: int, gamma: Optional[float]) -> Tensor:
        index = indices.unsqueeze(dim)
        term, log_p_y, source, offset = SoftmaxTargetTerm.compute(x, index, dim, gamma)
        ctx.save_for_backward(index, log_p_y, source, source.new_empty(0) if offset is None else offset)
        ctx.dim, ctx.gamma, ctx.has_offset = dim, gamma, offset is not None
        return term

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
        index, log_p_y, source, offset = ctx.saved_tensors
        dim, gamma = ctx.dim, ctx.gamma
        if gamma is None:
            coefficient = grad.neg()
        else:
            one_minus_p = torch.expm1(log_p_y).neg_()
            ratio = log_p_y.neg().div_(one_minus_p.clamp_min(torch.finfo(one_minus_p.dtype).tiny))
            coefficient = ratio.mul_(log_p_y.exp()).mul_(gamma).add_(1.0).mul_(one_minus_p.pow_(gamma)).mul_(grad).neg_()
        coefficient = coefficient.unsqueeze(dim)
        probabilities = torch.sub(source, offset.unsqueeze(dim)).exp_() if ctx.has_offset else source.exp()
        return probabilities.mul_(coefficient.neg()).scatter_add_(dim, index, coefficient), None, None, None


@torch.jit.unused
def softmax_target_term(x: Tensor, indices: Tensor, dim: int, gamma: Optional[float]) -> Tensor:
    r""":class:`SoftmaxTargetTerm` of logits ``x`` and in-range class ``indices`` along ``dim``; without
    autograd recording ``x``, the forward alone."""
    if _recording(x):
        return SoftmaxTargetTerm.apply(x, indices, dim, gamma)
    return SoftmaxTargetTerm.compute(x, indices.unsqueeze(dim), dim, gamma)[0]


class ClassIndexOverlap(torch.autograd.Function):
    r"""The region losses' sums over the spatial positions :math:`s` of the softmax probabilities
    :math:`p = \operatorname{softmax}(x)` (over the classes, dim 1 of ``(N, C, S)`` logits) with class
    indices :math:`y` and pixel weights :math:`w`, in float64:

    .. math::
        TP_{nc} = \sum_s w\,p_c\,[y = c], \qquad P_{nc} = \sum_s w\,p_c^k \quad (k = 2 \text{ if squared, else } 1).

    With :math:`h_c = w\,(k\,p_c^{k-1}\,\bar g_{P,c} + [y = c]\,\bar g_{TP,c})` the gradient with respect to
    :math:`p`, the softmax's gives :math:`\partial / \partial x_c = p_c\,(h_c - \sum_j p_j h_j)`: one buffer of
    the logits' size and one product, where autograd keeps a buffer for each of the two sums' paths. The
    forward saves :math:`p` and the indices. No gradient flows to the weights.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, weight: Optional[Tensor], squared: bool) -> Tuple[Tensor, Tensor]:
        true_positive, predicted, probabilities = class_index_sums(x, index, weight, squared)
        ctx.save_for_backward(probabilities, index, probabilities.new_empty(0) if weight is None else weight)
        ctx.squared, ctx.weighted = squared, weight is not None
        return true_positive, predicted

    @staticmethod
    def backward(ctx: Any, grad_tp: Tensor, grad_p: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
        probabilities, index, weight = ctx.saved_tensors
        dtype = probabilities.dtype
        per_class = grad_p.to(dtype).unsqueeze(2)
        if ctx.squared:
            h = probabilities * per_class.mul(2.0)
        else:
            h = per_class.expand(probabilities.shape).clone()
        h.scatter_add_(1, index, grad_tp.to(dtype).gather(1, index.squeeze(1)).unsqueeze(1))
        if ctx.weighted:
            h.mul_(weight)
        # torch's fused softmax backward: p ⊙ (h - Σ_c p h).
        return torch._softmax_backward_data(h, probabilities, 1, dtype), None, None, None


def class_index_sums(x: Tensor, index: Tensor, weight: Optional[Tensor], squared: bool) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``(TP, P, p)`` of :class:`ClassIndexOverlap` for logits ``x`` ``(N, C, S)``, class indices ``(N, 1, S)``
    and ``weight`` broadcastable to ``x`` (``None``: 1); scriptable, the form TorchScript and inference run."""
    probabilities = torch.softmax(x, 1)
    weighted = probabilities if weight is None else probabilities * weight
    # Summed in the compute dtype and cast, as _reduction.accumulate outside tracing.
    predicted = (weighted * probabilities if squared else weighted).sum(2).to(torch.float64)
    at_target = weighted.gather(1, index).squeeze(1).to(torch.float64)
    true_positive = torch.zeros([x.shape[0], x.shape[1]], dtype=torch.float64, device=x.device)
    return true_positive.scatter_add_(1, index.squeeze(1), at_target), predicted, probabilities


@torch.jit.unused
def class_index_overlap(x: Tensor, index: Tensor, weight: Optional[Tensor], squared: bool) -> Tuple[Tensor, Tensor]:
    r""":class:`ClassIndexOverlap`'s ``(TP, P)`` when autograd records ``x`` (and the weights need no gradient of
    their own); otherwise :func:`class_index_sums`, recorded by autograd as it is."""
    if _recording(x) and (weight is None or not weight.requires_grad):
        return ClassIndexOverlap.apply(x, index, weight, squared)
    true_positive, predicted, _ = class_index_sums(x, index, weight, squared)
    return true_positive, predicted


# exp(-100): below it torch's (and our) clamped log is the constant -100, whose derivative is 0.
_LOG_FLOOR = 3.720075976020836e-44


class BinaryCrossEntropy(torch.autograd.Function):
    r"""``bce``'s :math:`\ell = -[t \max(\log p, -100) + (1 - t) \max(\log(1 - p), -100)]` of probabilities.

    .. math::
        \frac{\partial \ell}{\partial p} = \frac{1 - t}{1 - p}\,[1 - p > e^{-100}] - \frac{t}{p}\,[p > e^{-100}]

    (the clamped logs are constant below :math:`e^{-100}`, so those terms have no gradient, as the
    formula's guarded form gives). No gradient flows to the targets.
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor, t: Tensor) -> Tensor:
        ctx.save_for_backward(p, t)
        return bce_values(p, t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None]:
        p, t = ctx.saved_tensors
        # Two temporaries of the predictions' size, each filled in place (the second is 1 - p, then t / p).
        not_p = torch.rsub(p, 1.0)
        negative = torch.rsub(t, 1.0).div_(not_p).masked_fill_((not_p > _LOG_FLOOR).logical_not_(), 0.0)
        positive = torch.div(t, p, out=not_p).masked_fill_((p > _LOG_FLOOR).logical_not_(), 0.0)
        return negative.sub_(positive).mul_(grad), None


def bce_values(p: Tensor, t: Tensor) -> Tensor:
    r"""The value of :class:`BinaryCrossEntropy` in 7 cheap passes (scriptable: TorchScript's inference
    form too). ``log 0 = -inf`` is clamped to -100 directly and ``-[(1 - t) a + t b]`` is one ``lerp``,
    exact at ``t`` in {0, 1}. Contiguous inputs: the result must not depend on the memory layout."""
    log_p = torch.log(p).clamp_(min=-100.0)
    # log(1 - p) then the lerp in that one buffer: two temporaries of the predictions' size at most.
    return torch.neg(p).log1p_().clamp_(min=-100.0).lerp_(log_p, t).neg_()


@torch.jit.unused
def binary_cross_entropy(p: Tensor, t: Tensor) -> Tensor:
    r""":class:`BinaryCrossEntropy` of contiguous probabilities ``p`` and targets ``t``."""
    return BinaryCrossEntropy.apply(p, t)
