r"""Softmax cross-entropy (``cross_entropy``) and negative log-likelihood (``nll``), as torch's (class weights,
``ignore_index``, label smoothing, ``mean`` denominator) but 0 with zero gradients where every target is
ignored (torch: NaN). The class-index helpers here serve the softmax focal loss (:mod:`.focal`) too.
"""
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _autograd
from ._base import ElementwiseLoss
from ._params import CLASS_DIM_PARAM, CLASS_WEIGHT_PARAM, IGNORE_INDEX_PARAM, LABEL_SMOOTHING_PARAM, REDUCTION_PARAM
from ._registry import LossSpec, register
from ._stable import log_softmax, logsumexp
from ._reduction import (
    as_float, check_range, check_reduction, check_same_shape, compute_dtype, elementwise_statistics, reduce_elementwise,
    float_hyperparameter, hyperparameter_in, in_dtype, int_hyperparameter, is_tracing, label_map_hint,
    normalize_class_dim, optional_vector, class_setting, power, sample_or_element_weights, summed_statistics,
    sums_only, torch_reduction, unless_ignored, vector_argument, weight_summed_statistics,
)


def index_tensor(targets: Tensor, shape: List[int], dim: int, probabilities_allowed: bool) -> Tensor:
    r"""Class-index ``targets`` as int64: ``shape`` without its class dimension ``dim``, integers (or
    integer-valued floats); their range ``[0, C)`` or ``ignore_index`` is :func:`check_class_range`'s."""
    expected = shape[:dim] + shape[dim + 1:]
    if list(targets.shape) != expected:
        alternative = " or class probabilities of shape {}".format(shape) if probabilities_allowed else ""
        raise ValueError(
            "targets of shape {} do not match predictions of shape {}: expected class indices of shape {} "
            "(the predictions without class dim {}){}".format(list(targets.shape), shape, expected, dim, alternative)
        )
    if targets.dtype == torch.bool or targets.is_complex():
        raise ValueError("targets must be integer class indices, got dtype {}".format(targets.dtype))
    if targets.is_floating_point() and not is_tracing() and targets.numel() > 0:
        if bool((~torch.isfinite(targets) | (targets != torch.floor(targets))).any()):
            raise ValueError("targets must be integer class indices, got non-integer values of dtype {}".format(targets.dtype))
    return targets.to(torch.int64)


def check_class_range(
    kept_indices: Tensor, indices: Tensor, valid: Tensor, ignore_index: Tensor, num_classes: int
) -> None:
    r"""``ValueError`` unless every non-ignored index is in ``[0, C)``; a host check, never while exporting.
    ``kept_indices`` has 0 for the ignored ``indices`` (one ``aminmax`` pass in the common case)."""
    if is_tracing() or indices.numel() == 0:
        return
    smallest, largest = torch.aminmax(kept_indices)
    if int(smallest.item()) < 0 or int(largest.item()) >= num_classes:
        out_of_range = valid & ((indices < 0) | (indices >= num_classes))
        if bool(out_of_range.any()):
            _raise_out_of_range(indices, out_of_range, ignore_index, num_classes)


def _raise_out_of_range(indices: Tensor, out_of_range: Tensor, ignore_index: Tensor, num_classes: int) -> None:
    raise ValueError(
        "targets must be class indices in [0, {}) or ignore_index ({}), got {}".format(
            num_classes, int(ignore_index), int(indices[out_of_range][0])
        )
    )


def class_index_mask(
    targets: Tensor, ignore_index: Tensor, shape: List[int], dim: int, probabilities_allowed: bool
) -> Tuple[Tensor, Tensor]:
    r"""``(target_mask, valid)`` of class-index ``targets`` (:func:`index_tensor`, range-checked on the host
    outside export): ``valid`` is False at ``ignore_index``; ``target_mask`` (bool, ``shape``) is True at the
    target class, by comparison with ``arange(C)`` (not ``one_hot``: the class count stays symbolic in ONNX)."""
    indices = index_tensor(targets, shape, dim, probabilities_allowed)
    valid = indices != ignore_index
    num_classes = shape[dim]
    if not is_tracing():
        check_class_range(torch.where(valid, indices, 0), indices, valid, ignore_index, num_classes)
    view = [1] * len(shape)
    view[dim] = num_classes
    classes = torch.arange(num_classes, device=targets.device).reshape(view)
    return indices.unsqueeze(dim) == classes, valid


def select_class(values: Tensor, target_mask: Tensor, dim: int) -> Tensor:
    r"""``values`` at each element's target class (0 where none): ``torch.where``, as a product with the mask
    would turn a ``-inf`` log-probability of another class into ``0 · inf = NaN``."""
    return torch.where(target_mask, values, torch.zeros_like(values)).sum(dim)


def index_weights(
    weights: Optional[Tensor], class_weight: Optional[Tensor], target_mask: Tensor, valid: Tensor, dim: int,
    dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    r"""``(w, d, sample_weight)`` of class-index targets: ``d``, the ``mean`` denominator, is the target's class
    weight (1 without) and 0 where ignored, as torch; ``w = weights · d``; ``sample_weight`` is ``weights``
    shaped for the elementwise shape (or ``None``). ``class_weight`` is shaped along ``dim`` (:func:`class_setting`)."""
    valid_weight = valid.to(dtype)
    if class_weight is None:
        denominator = valid_weight
    else:
        denominator = select_class(class_weight, target_mask, dim) * valid_weight
    sample_weight: Optional[Tensor] = None
    if weights is not None:
        sample_weight = sample_or_element_weights(weights, list(valid.shape)).to(dtype)
        return denominator * sample_weight, denominator, sample_weight
    return denominator, denominator, sample_weight


def class_vector_along(class_weight: Tensor, shape: List[int], dim: int) -> Optional[Tensor]:
    r"""The ``(C,)`` vector of a per-class weight shaped by :func:`class_setting` along ``dim``; ``None`` when it
    also varies along another dimension (given shaped to broadcast), for the general class-mask form."""
    num_classes = shape[dim]
    if class_weight.dim() == 0:
        return class_weight.expand([num_classes])
    padded = [1] * (len(shape) - class_weight.dim()) + list(class_weight.shape)
    for index in range(len(padded)):
        if index != dim and padded[index] != 1:
            return None
    return class_weight.reshape([-1]).expand([num_classes])


def eager_index_targets(
    targets: Tensor, ignore_index: Tensor, shape: List[int], dim: int, probabilities_allowed: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""``(indices, valid)`` of class-index ``targets`` outside export. One ``aminmax`` read on the host serves
    the range check and tells whether any target can equal ``ignore_index``: if none can, ``valid`` is ``None``
    (no mask); else ``valid`` is as in :func:`class_index_mask` and the indices are 0 where ignored."""
    indices = index_tensor(targets, shape, dim, probabilities_allowed)
    num_classes = shape[dim]
    if indices.numel() == 0:
        return indices, None
    smallest, largest = torch.aminmax(indices)
    low = int(smallest.item())
    high = int(largest.item())
    ignored = int(ignore_index)
    in_range = low >= 0 and high < num_classes
    if ignored < low or ignored > high:
        if not in_range:
            _raise_out_of_range(indices, (indices < 0) | (indices >= num_classes), ignore_index, num_classes)
        return indices, None
    valid = indices != ignore_index
    safe_indices = torch.where(valid, indices, 0)
    if not in_range:
        # The values outside [0, C) may all be ignore_index: check the others.
        check_class_range(safe_indices, indices, valid, ignore_index, num_classes)
    return safe_indices, valid


def _ignored_as(indices: Tensor, valid: Optional[Tensor], ignored: int) -> Tensor:
    r"""The class indices of :func:`eager_index_targets` for torch's losses: ``ignored`` where not ``valid``."""
    if valid is None:
        return indices
    return torch.where(valid, indices, ignored)


def _contiguous(vector: Optional[Tensor]) -> Optional[Tensor]:
    r"""A ``(C,)`` class vector (maybe expanded from one value) as torch's losses take it."""
    if vector is None:
        return None
    return vector.contiguous()


def nll_summed_statistics(
    log_p: Tensor, indices: Tensor, class_vector: Optional[Tensor], ignore_index: int
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The statistics (:func:`~._reduction.weight_summed_statistics`) of ``Σ a_y·(-log p_y)`` and ``Σ a_y`` over
    log-probabilities ``(N, C, *)`` (classes along dim 1) at class ``indices`` ``(N, *)`` but those equal to
    ``ignore_index``, ``a`` the ``(C,)`` ``class_vector`` (``None``: 1), outside export: torch's nll kernels return
    the weight sum beside the loss sum (:func:`torch.nn.functional.nll_loss` drops it), so the targets' weights
    need no pass of their own. The shapes are ``nll_loss``'s: ``(N, C)`` rows, images ``(N, C, H, W)``, and
    ``(N, C, 1, S)`` for any other spatial rank."""
    # torch's Reduction::Sum.
    sum_reduction = 2
    weight = _contiguous(class_vector)
    if log_p.dim() <= 2:
        loss_sum, weight_sum = torch.ops.aten.nll_loss_forward(log_p, indices, weight, sum_reduction, ignore_index)
    elif log_p.dim() == 4:
        # The kernel's loops run faster over the two spatial dimensions than over one of their product.
        loss_sum, weight_sum = torch.ops.aten.nll_loss2d_forward(log_p, indices, weight, sum_reduction, ignore_index)
    else:
        batch, num_classes = log_p.shape[0], log_p.shape[1]
        positions = 1
        for size in log_p.shape[2:]:
            positions *= size
        loss_sum, weight_sum = torch.ops.aten.nll_loss2d_forward(
            log_p.reshape(batch, num_classes, 1, positions), indices.reshape(batch, 1, positions), weight,
            sum_reduction, ignore_index,
        )
    return weight_summed_statistics(loss_sum, weight_sum, list(indices.shape))


def kernel_checks_targets(x: Tensor) -> bool:
    r"""Whether :func:`kernel_checked_nll_statistics` may run on ``x``: torch's CPU nll kernels check each class
    index and raise (a CUDA kernel would assert), in eager Python (TorchScript has no ``try``)."""
    return x.device.type == "cpu" and not torch.jit.is_scripting()


@torch.jit.unused
def kernel_checked_nll_statistics(
    log_p: Tensor, targets: Tensor, ignore_index: Tensor, class_vector: Optional[Tensor], shape: List[int],
    probabilities_allowed: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r""":func:`nll_summed_statistics` with no pass over the targets of our own, where
    :func:`kernel_checks_targets`: the kernel skips ``ignore_index`` and stops at the first class index outside
    ``[0, C)``; its ``IndexError`` becomes :func:`eager_index_targets`' ``ValueError``, which names that index."""
    indices = index_tensor(targets, shape, 1, probabilities_allowed)
    try:
        return nll_summed_statistics(log_p, indices, class_vector, int(ignore_index))
    except IndexError:
        eager_index_targets(targets, ignore_index, shape, 1, probabilities_allowed)
        raise


# Where torch's cross-entropy on rows (N, C) is faster than the statistics (docs/benchmarks.md, "Cross-entropy on
# rows"): its log_softmax over the last dimension is several times slower on rows shorter than a vector register
# (16 float32 with AVX-512; a machine with narrower vectors is fast from fewer classes, which keep the
# statistics); below a few thousand elements the statistics' fixed cost is the larger, more so with the backward.
FUSED_ROWS_MIN_CLASSES = 16
FUSED_ROWS_MAX_ELEMENTS = 6144
FUSED_ROWS_MAX_ELEMENTS_DIFFERENTIABLE = 12288


def fused_cross_entropy_suits_rows(shape: List[int], differentiable: bool) -> bool:
    r"""Whether :func:`fused_class_index_loss` takes cross-entropy on predictions of ``shape`` with fewer than
    three dimensions: rows ``(N, C)`` of many classes or few elements, with or without the backward pass
    (``differentiable``)."""
    if len(shape) != 2:
        return False
    most = FUSED_ROWS_MAX_ELEMENTS_DIFFERENTIABLE if differentiable else FUSED_ROWS_MAX_ELEMENTS
    return shape[1] >= FUSED_ROWS_MIN_CLASSES or shape[0] * shape[1] <= most


@torch.jit.unused
def fused_class_index_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor], ignore_index: int,
    label_smoothing: float, reduction: str, class_dim: int, logits: bool,
) -> Optional[Tensor]:
    r"""``Loss.fused_reduction`` of cross-entropy (``logits``) and nll in eager Python on the CPU:
    :func:`torch.nn.functional.cross_entropy` or :func:`~torch.nn.functional.nll_loss` with its own reduction,
    whose ``mean`` divides by :math:`\sum a_y` as ours (:func:`~._reduction.torch_reduction`).

    ``None`` for call-time ``weights``, label smoothing, classes not along dim 1, cross-entropy on rows ``(N, C)``
    of few classes beyond a few thousand elements (:func:`fused_cross_entropy_suits_rows`: torch's
    ``log_softmax`` over a short last dimension is several times slower than the statistics' target term), class
    weights that are not a ``(C,)`` vector, and targets that are not int64 class indices of the
    expected shape; and where torch's result is not ours, which the statistics then compute: a NaN ``mean``
    (every target ignored, where ours is 0, or NaN inputs), a class index out of range (the statistics' error
    names it), and, under autograd, cross-entropy with ignored targets (the statistics mask their logits, whose
    NaN would reach torch's gradient)."""
    how = torch_reduction(reduction, True, predictions.numel())
    if how == "" or weights is not None or label_smoothing != 0.0 or predictions.device.type != "cpu":
        return None
    shape = list(predictions.shape)
    if normalize_class_dim(class_dim, len(shape)) != 1 or targets.dtype != torch.int64:
        return None
    differentiable = torch.is_grad_enabled() and predictions.requires_grad
    if logits and len(shape) < 3 and not fused_cross_entropy_suits_rows(shape, differentiable):
        return None
    if list(targets.shape) != shape[:1] + shape[2:]:
        return None
    dtype = compute_dtype(predictions.dtype)
    weight: Optional[Tensor] = None
    if class_weight is not None:
        if class_weight.dim() != 1 or class_weight.numel() != shape[1]:
            return None
        weight = in_dtype(class_weight, dtype).contiguous()
    # Contiguous: the result must not depend on the memory layout.
    x = in_dtype(predictions, dtype).contiguous()
    if logits and differentiable and targets.numel() > 0:
        smallest, largest = torch.aminmax(targets)
        if int(smallest.item()) <= ignore_index <= int(largest.item()) and bool((targets == ignore_index).any()):
            return None
    try:
        if logits:
            loss = F.cross_entropy(x, targets, weight, ignore_index=ignore_index, reduction=how)
        else:
            loss = F.nll_loss(x, targets, weight, ignore_index=ignore_index, reduction=how)
    except IndexError:
        return None
    if how == "mean" and math.isnan(loss.item()):
        return None
    return in_dtype(loss, predictions.dtype)


def eager_target_nll(
    x: Tensor, lse: Tensor, indices: Tensor, valid: Optional[Tensor], dim: int, keep_lse: bool
) -> Tensor:
    r"""The target's :math:`-\log p_y = \operatorname{lse}(x) - x_y` (0 where ignored) outside export: one
    gather instead of a ``log_softmax``, a class mask and a masked sum. ``lse`` is the contiguous ``x``'s
    :func:`~._stable.logsumexp`, updated in place unless autograd records ``x`` or ``keep_lse``."""
    target_logit = torch.gather(x, dim, indices.unsqueeze(dim)).squeeze(dim)
    if torch.is_grad_enabled() and x.requires_grad:
        # torch.logsumexp (the autograd form) is m + log(Σ exp(x - m)) >= m >= x_y: no clamp needed.
        nll = lse - target_logit
    else:
        nll = torch.sub(lse, target_logit) if keep_lse else lse.sub_(target_logit)
        # The unshifted logsumexp may round an ulp below a dominant x_y: -log p_y >= 0 (which the
        # focal base 1 - p_y = -expm1(-nll) relies on).
        nll = nll.clamp_(min=0.0)
    if valid is None:
        return nll
    return torch.where(valid, nll, 0.0)


def eager_index_weights(
    weights: Optional[Tensor], class_vector: Optional[Tensor], indices: Tensor, valid: Optional[Tensor],
    dtype: torch.dtype,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    r"""``(w, d, sample_weight)`` as :func:`index_weights` from :func:`eager_index_targets` and the ``(C,)``
    ``class_vector``; ``None`` is 1 per element: ``d`` without class weights or ignored targets, ``w`` if also
    without ``weights``."""
    denominator: Optional[Tensor] = None
    if class_vector is not None:
        # index_select, not class_vector[indices]: advanced indexing is several times slower.
        denominator = class_vector.index_select(0, indices.reshape(-1)).reshape(indices.shape)
        if valid is not None:
            denominator = torch.where(valid, denominator, 0.0)
    elif valid is not None:
        denominator = valid.to(dtype)
    if weights is None:
        return denominator, denominator, None
    sample_weight = sample_or_element_weights(weights, list(indices.shape)).to(dtype)
    if denominator is None:
        return sample_weight, denominator, sample_weight
    return denominator * sample_weight, denominator, sample_weight


def probability_target_statistics(
    class_losses: Tensor, targets: Tensor, weights: Optional[Tensor], epsilon: Tensor, weight_c: Optional[Tensor],
    dim: int, dtype: torch.dtype, per_sample: bool, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics of a softmax loss on probability targets ``q``: ``Σ_c q̃_c · w_c · class_losses_c`` with
    ``q̃ = (1 - ε) q + ε / C`` and ``class_losses`` ``-log p_c`` or the focal term; ``mean`` divides by the
    element count ``N·d1..dk``, as torch for probability targets. An element counts for each class ``c`` in
    the class totals by its target probability ``q_c`` (one-hot targets: as its class index would)."""
    probabilities = as_float(targets, dtype, "targets")
    smoothed = (1.0 - epsilon) * probabilities + smoothing_share(epsilon, class_losses.shape[dim])
    terms = smoothed * class_losses
    if weight_c is not None:
        terms = terms * weight_c
    loss = terms.sum(dim)
    sample_weight: Optional[Tensor] = None
    if weights is not None:
        sample_weight = sample_or_element_weights(weights, list(loss.shape)).to(dtype)
        loss = loss * sample_weight
    return elementwise_statistics(loss, sample_weight, None, per_sample, per_class, dim, probabilities)


def smoothing_share(epsilon: Tensor, num_classes: int) -> Tensor:
    r"""``ε / C``, each class's share of the label smoothing ``ε`` (a hyperparameter: a Python number in eager
    Python). Without classes there is nothing to share, and no division by zero: ``ε`` itself."""
    return epsilon / max(num_classes, 1)


def _smallest_normal(dtype: torch.dtype) -> float:
    # torch.finfo is not scriptable; these are finfo(float32 / float64).tiny.
    if dtype == torch.float64:
        return 2.2250738585072014e-308
    return 1.1754943508222875e-38


def modulating_factor(one_minus_p: Tensor, gamma: Tensor) -> Tensor:
    r"""``(1 - p)^γ`` with finite gradients for every ``γ >= 0``: the derivative ``γ (1 - p)^(γ-1)`` is infinite
    at ``1 - p = 0`` for ``γ < 1`` (``0 · inf`` for ``γ = 0``), so the base is clamped at the dtype's smallest
    normal number, which changes the value by at most ``tiny^γ`` and stops the backward pass there."""
    return power(torch.clamp(one_minus_p, min=_smallest_normal(one_minus_p.dtype)), gamma)


def check_gamma(gamma: Tensor) -> None:
    # The bound is float64's largest number: inf is rejected.
    check_range(gamma, "gamma", 1.7976931348623157e308, "a finite number >= 0")


def class_weights(
    alpha: Optional[Tensor], balance_index: Optional[Tensor], class_weight: Optional[Tensor], shape: List[int], dim: int,
    dtype: torch.dtype,
) -> Optional[Tensor]:
    r"""The per-class weight :math:`a_c = \alpha_c\, w_c` of a softmax loss, along ``dim``: ``alpha`` is ``None``
    (cross-entropy's :math:`a_c = w_c`), a per-class vector, or a 0-d :math:`\alpha` for class ``balance_index``
    and :math:`1 - \alpha` for the others (the focal loss's)."""
    combined: Optional[Tensor] = None
    if alpha is not None:
        if alpha.dim() == 0:
            if balance_index is None:
                raise ValueError("a scalar alpha needs a balance_index")
            num_classes = shape[dim]
            if not is_tracing():
                value = float(alpha)
                if value < 0.0 or value > 1.0:
                    raise ValueError("a scalar alpha must be in [0, 1], got {}".format(value))
                balance = int(balance_index)
                if balance < 0 or balance >= num_classes:
                    raise ValueError("balance_index must be a class in [0, {}), got {}".format(num_classes, balance))
            view = [1] * len(shape)
            view[dim] = num_classes
            classes = torch.arange(num_classes, device=alpha.device).reshape(view)
            scalar_alpha = alpha.to(dtype)
            combined = torch.where(classes == balance_index, scalar_alpha, 1.0 - scalar_alpha)
        else:
            combined = class_setting(alpha.to(dtype), shape, dim, "alpha")
    if class_weight is not None:
        weight_c = class_setting(class_weight.to(dtype), shape, dim, "class_weight")
        combined = weight_c if combined is None else combined * weight_c
    return combined


def class_terms(nll: Tensor, gamma: Optional[Tensor]) -> Tensor:
    r""":math:`f(p)` from :math:`-\log p`: itself for cross-entropy (``gamma`` ``None``), or the focal
    :math:`(1 - p)^\gamma (-\log p)`, with :math:`1 - p = -\operatorname{expm1}(\log p)` accurate as p -> 1."""
    if gamma is None:
        return nll
    return modulating_factor(-torch.expm1(-nll), gamma) * nll


def softmax_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], gamma: Optional[Tensor], alpha: Optional[Tensor],
    balance_index: Optional[Tensor], class_weight: Optional[Tensor], ignore_index: Tensor, label_smoothing: Tensor,
    class_dim: int, per_sample: bool, values: bool = True, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The one kernel of the softmax losses: cross-entropy (``gamma`` ``None``) and the focal loss.

    With :math:`f` of :func:`class_terms` and the per-class weight :math:`a_c` of
    :func:`class_weights`, an element with class index :math:`y` has
    :math:`\ell = (1 - \varepsilon)\, a_y f(p_y) + \frac{\varepsilon}{C} \sum_c a_c f(p_c)` and
    :math:`d = a_y` (both 0 where ignored); one with class probabilities :math:`t` has
    :math:`\ell = \sum_c q_c a_c f(p_c)`, :math:`q = (1 - \varepsilon) t + \varepsilon / C`, :math:`d = 1`.
    Hyperparameters are 0-d tensors (Python numbers in eager Python); targets of the predictions' rank are class
    probabilities, else indices.
    """
    dtype = compute_dtype(predictions.dtype)
    x = predictions.to(dtype)
    shape = list(x.shape)
    dim = normalize_class_dim(class_dim, len(shape))
    if gamma is not None:
        check_gamma(gamma)
    check_range(label_smoothing, "label_smoothing", 1.0, "in [0, 1]")
    epsilon = hyperparameter_in(label_smoothing, dtype)
    weight_c = class_weights(alpha, balance_index, class_weight, shape, dim, dtype)
    if targets.dim() == len(shape):
        # Probability targets: torch ignores ignore_index here and its mean divides by N·d1..dk.
        check_same_shape(predictions, targets, dim, label_map_hint())
        return probability_target_statistics(
            class_terms(-log_softmax(x, dim), gamma), targets, weights, epsilon, weight_c, dim, dtype, per_sample,
            per_class,
        )
    if not is_tracing():
        class_vector: Optional[Tensor] = None
        if weight_c is not None:
            class_vector = class_vector_along(weight_c, shape, dim)
        if weight_c is None or class_vector is not None:
            return _eager_index_statistics(
                x, targets, weights, gamma, weight_c, class_vector, ignore_index, epsilon, shape, dim, dtype, per_sample,
                values, per_class,
            )
    target_mask, valid = class_index_mask(targets, ignore_index, shape, dim, True)
    weight, denominator, sample_weight = index_weights(weights, weight_c, target_mask, valid, dim, dtype)
    log_p = log_softmax(unless_ignored(x, valid.unsqueeze(dim)), dim)
    target_term = class_terms(-select_class(log_p, target_mask, dim), gamma)
    # The smoothing term reads every class; with label_smoothing = 0 it is masked out before use,
    # so a -inf logit of a non-target class stays finite (as in torch) in value and gradient.
    if is_tracing():
        smoothed = torch.where(epsilon > 0, log_p, torch.zeros_like(log_p))
    else:
        smoothed = log_p if float(epsilon) > 0 else torch.zeros_like(log_p)
    smoothing_terms = class_terms(-smoothed, gamma)
    if weight_c is not None:
        smoothing_terms = smoothing_terms * weight_c
    # denominator = a_y (0 where ignored): the class weight of the target, as in torch.
    loss = (1.0 - epsilon) * denominator * target_term + smoothing_share(epsilon, shape[dim]) * smoothing_terms.sum(dim)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if sample_weight is not None:
        loss = loss * sample_weight
    membership: Optional[Tensor] = None
    if per_class:
        membership = (target_mask & valid.unsqueeze(dim)).to(dtype)
    return elementwise_statistics(loss, weight, denominator, per_sample, per_class, dim, membership)


def _eager_index_statistics(
    x: Tensor, targets: Tensor, weights: Optional[Tensor], gamma: Optional[Tensor], weight_c: Optional[Tensor],
    class_vector: Optional[Tensor], ignore_index: Tensor, epsilon: Tensor, shape: List[int], dim: int,
    dtype: torch.dtype, per_sample: bool, values: bool, per_class: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The class-index branch of :func:`softmax_statistics` outside export, same formula.

    Cross-entropy's totals alone (:func:`sums_only`, no call-time ``weights``) with the classes along an inner
    dimension are summed by torch's kernels, which keep no values (on rows the target term below is the
    faster): :func:`nll_summed_statistics` of the ``log_softmax`` (the sums of
    :func:`torch.nn.functional.cross_entropy`), or that function itself with label smoothing.

    Only :math:`-\log p_y` (and the target's focal term from it) is computed unless
    ``label_smoothing > 0`` (read on the host): in eager Python by
    :func:`~._autograd.softmax_target_term` (its closed-form backward when autograd records ``x``),
    in TorchScript and with smoothing from :func:`~._stable.logsumexp` and a gather. No mask is built
    when no target is ignored, and the temporaries of the elementwise shape are updated in place
    unless autograd records ``x``.
    """
    smoothing_value = float(epsilon)
    smoothing = smoothing_value > 0.0
    fused_sums = gamma is None and weights is None and dim == 1 and len(shape) > 2 and sums_only(
        values, per_sample or per_class
    )
    recording = torch.is_grad_enabled() and x.requires_grad
    # Without autograd an ignored position's logits (NaN, inf) reach no sum: no mask is needed.
    if fused_sums and not smoothing and kernel_checks_targets(x) and not recording:
        return kernel_checked_nll_statistics(
            torch.log_softmax(x.contiguous(), 1), targets, ignore_index, class_vector, shape, True
        )
    indices, valid = eager_index_targets(targets, ignore_index, shape, dim, True)
    x = unless_ignored(x, None if valid is None else valid.unsqueeze(dim)).contiguous()
    if fused_sums:
        kernel_indices = _ignored_as(indices, valid, -1)
        if not smoothing:
            return nll_summed_statistics(torch.log_softmax(x, 1), kernel_indices, class_vector, -1)
        loss_sum = F.cross_entropy(
            x, kernel_indices, _contiguous(class_vector), ignore_index=-1, reduction="sum",
            label_smoothing=smoothing_value,
        )
        weight, denominator, _ = eager_index_weights(None, class_vector, indices, valid, dtype)
        return summed_statistics(loss_sum, weight, denominator, list(indices.shape))
    weight, denominator, sample_weight = eager_index_weights(weights, class_vector, indices, valid, dtype)
    lse = x  # read only with smoothing, which the closed-form branch excludes
    if not smoothing and not torch.jit.is_scripting():
        loss = _autograd.softmax_target_term(x, indices, dim, None if gamma is None else float(gamma))
    else:
        lse = logsumexp(x, dim)
        target_nll = eager_target_nll(x, lse, indices, valid, dim, smoothing)
        loss = target_nll
        if gamma is not None:
            if recording:
                loss = modulating_factor(-torch.expm1(-target_nll), gamma).mul_(target_nll)
            else:
                # No clamp at the smallest normal (it is there for the gradient): target_nll >= 0, so the
                # base is >= 0, and a base below it means -log p_y below it too, a product of ~0 either way.
                loss = torch.neg(target_nll).expm1_().neg_().pow_(float(gamma)).mul_(target_nll)
    # denominator = a_y (0 where ignored, None for 1): ignored elements give 0 without a mask.
    if denominator is not None:
        loss = loss * denominator if recording else loss.mul_(denominator)
    if smoothing:
        smoothing_terms = class_terms(lse.unsqueeze(dim) - x, gamma)
        if weight_c is not None:
            smoothing_terms = smoothing_terms * weight_c
        loss = (1.0 - epsilon) * loss + smoothing_share(epsilon, shape[dim]) * smoothing_terms.sum(dim)
        if valid is not None:
            loss = torch.where(valid, loss, 0.0)
    if sample_weight is not None:
        loss = loss.mul_(sample_weight)
    return index_statistics(loss, weight, denominator, per_sample, per_class, indices, valid, shape, dim, dtype)


def index_membership(indices: Tensor, valid: Optional[Tensor], shape: List[int], dim: int, dtype: torch.dtype) -> Tensor:
    r"""The class membership of class-index targets for :func:`~._reduction.class_totals`: the one-hot of each
    element's class along ``dim`` of ``shape`` (the predictions'), nothing where not ``valid``."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    one_hot = indices.unsqueeze(dim) == torch.arange(shape[dim], device=indices.device).reshape(view)
    if valid is not None:
        one_hot = one_hot & valid.unsqueeze(dim)
    return one_hot.to(dtype)


def index_statistics(
    loss: Tensor, weight: Optional[Tensor], denominator: Optional[Tensor], per_sample: bool, per_class: bool,
    indices: Tensor, valid: Optional[Tensor], shape: List[int], dim: int, dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor]:
    r""":func:`~._reduction.elementwise_statistics` of a class-index loss outside export: each element counts
    for its target class (:func:`index_membership`) in the class totals."""
    membership: Optional[Tensor] = None
    if per_class:
        membership = index_membership(indices, valid, shape, dim, dtype)
    return elementwise_statistics(loss, weight, denominator, per_sample, per_class, dim, membership)


def cross_entropy_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor],
    ignore_index: Tensor, label_smoothing: Tensor, class_dim: int, per_sample: bool, values: bool = True,
    per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`cross_entropy_loss`: :func:`softmax_statistics` without ``gamma``
    and ``alpha``. ``ignore_index`` (int64) and ``label_smoothing`` are 0-d tensors."""
    return softmax_statistics(
        predictions, targets, weights, None, None, None, class_weight, ignore_index, label_smoothing, class_dim,
        per_sample, values, per_class,
    )


def cross_entropy_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Softmax cross-entropy from logits, with class weights, ``ignore_index`` and label smoothing.

    With :math:`\log p_c = \operatorname{log\_softmax}(x)_c` over the class dimension, class weights
    :math:`w_c`, smoothing :math:`\varepsilon` and :math:`C` classes, an element with class index
    :math:`y` has

    .. math::
        \ell = (1 - \varepsilon)\, w_y\,(-\log p_y)
               + \frac{\varepsilon}{C} \sum_c w_c\,(-\log p_c),
        \qquad d = w_y

    (:math:`\ell = d = 0` where :math:`y` is ``ignore_index``), and an element with class
    probabilities :math:`t_c` has

    .. math::
        \ell = -\sum_c w_c\, q_c \log p_c, \quad q_c = (1 - \varepsilon)\, t_c + \varepsilon / C,
        \qquad d = 1.

    Predictions are logits ``(N, C, *)``, classes along ``class_dim`` (``-1`` for channels-last); targets class
    indices ``(N, *)`` (integer-valued floats too) in ``[0, C)`` or ``ignore_index``, or class probabilities of the
    predictions' shape; :math:`\varepsilon \in [0, 1]`. ``weights`` (``(N,)`` or broadcastable to ``(N, *)``) multiply
    :math:`\ell` and :math:`w` = weights × :math:`d` but not :math:`d`: ``mean`` is :math:`\sum \ell / \sum d`
    (torch's), ``weighted_mean`` :math:`\sum \ell / \sum w`. Equals :func:`torch.nn.functional.cross_entropy` wherever
    torch's result is finite, and is 0 (zero gradients) where every target is ignored.
    """
    check_reduction(reduction)
    class_weight = vector_argument(class_weight)
    if not torch.jit.is_scripting():
        fused = fused_class_index_loss(
            predictions, targets, weights, class_weight, ignore_index, label_smoothing, reduction, class_dim, True
        )
        if fused is not None:
            return fused
    values, totals, _ = cross_entropy_statistics(
        predictions, targets, weights, class_weight, int_hyperparameter(ignore_index, predictions),
        float_hyperparameter(label_smoothing, predictions), class_dim, False, reduction == "none",
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


def nll_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor],
    ignore_index: Tensor, class_dim: int, per_sample: bool, values: bool = True, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`nll_loss`; ``ignore_index`` is a 0-d int64 tensor. Its totals alone
    (:func:`sums_only`, no call-time ``weights``, classes along dim 1) are :func:`nll_summed_statistics`."""
    dtype = compute_dtype(predictions.dtype)
    log_p = predictions.to(dtype)
    shape = list(log_p.shape)
    dim = normalize_class_dim(class_dim, len(shape))
    weight_c: Optional[Tensor] = None
    if class_weight is not None:
        weight_c = class_setting(class_weight.to(dtype), shape, dim, "class_weight")
    class_vector: Optional[Tensor] = None
    if weight_c is not None and not is_tracing():
        class_vector = class_vector_along(weight_c, shape, dim)
    valid: Optional[Tensor] = None
    membership: Optional[Tensor] = None
    if not is_tracing() and (weight_c is None or class_vector is not None):
        # One gather of the target's entry instead of a class mask and a masked sum over the classes.
        fused_sums = weights is None and dim == 1 and sums_only(values, per_sample or per_class)
        # nll's gradient reads no log-probability: an ignored position needs no mask, with autograd too.
        if fused_sums and kernel_checks_targets(log_p):
            return kernel_checked_nll_statistics(log_p, targets, ignore_index, class_vector, shape, False)
        indices, valid = eager_index_targets(targets, ignore_index, shape, dim, False)
        if fused_sums:
            return nll_summed_statistics(log_p, _ignored_as(indices, valid, -1), class_vector, -1)
        weight, denominator, sample_weight = eager_index_weights(weights, class_vector, indices, valid, dtype)
        target_log_p = torch.gather(log_p, dim, indices.unsqueeze(dim)).squeeze(dim)
        if per_class:
            membership = index_membership(indices, valid, shape, dim, dtype)
    else:
        target_mask, index_valid = class_index_mask(targets, ignore_index, shape, dim, False)
        valid = index_valid
        weight, denominator, sample_weight = index_weights(weights, weight_c, target_mask, index_valid, dim, dtype)
        target_log_p = select_class(log_p, target_mask, dim)
        if per_class:
            membership = (target_mask & index_valid.unsqueeze(dim)).to(dtype)
    # denominator = w_y (0 where ignored); torch.where keeps a -inf ignored entry out of the value.
    loss = target_log_p.neg() if denominator is None else denominator * -target_log_p
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    if sample_weight is not None:
        loss = loss * sample_weight
    return elementwise_statistics(loss, weight, denominator, per_sample, per_class, dim, membership)


def nll_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    ignore_index: int = -100, reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Negative log-likelihood of class indices under log-probabilities.

    .. math::
        \ell = -w_y\, x_y, \qquad d = w_y \qquad (\ell = d = 0 \text{ where } y = \text{ignore\_index})

    Predictions are log-probabilities ``(N, C, *)`` (not checked, as in torch); the rest, and ``mean`` =
    :math:`\sum \ell / \sum d`, as :func:`cross_entropy_loss`'s class indices. Equals
    :func:`torch.nn.functional.nll_loss`, and is 0 where every target is ignored.
    """
    check_reduction(reduction)
    class_weight = vector_argument(class_weight)
    if not torch.jit.is_scripting():
        fused = fused_class_index_loss(
            predictions, targets, weights, class_weight, ignore_index, 0.0, reduction, class_dim, False
        )
        if fused is not None:
            return fused
    values, totals, _ = nll_statistics(
        predictions, targets, weights, class_weight, int_hyperparameter(ignore_index, predictions),
        class_dim, False, reduction == "none",
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


class CrossEntropyLoss(ElementwiseLoss):
    r"""Module form of :func:`cross_entropy_loss`; ``class_weight`` is a buffer."""

    ignore_index: int
    label_smoothing: float

    def __init__(
        self, class_weight: Optional[Tensor] = None, ignore_index: int = -100, label_smoothing: float = 0.0,
        reduction: str = "mean", class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return cross_entropy_statistics(
            predictions, targets, weights, optional_vector(self.class_weight),
            int_hyperparameter(self.ignore_index, predictions), float_hyperparameter(self.label_smoothing, predictions),
            self.class_dim, per_sample, values, per_class,
        )

    def fused_reduction(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
        if torch.jit.is_scripting():
            return None
        return fused_class_index_loss(
            predictions, targets, weights, optional_vector(self.class_weight), self.ignore_index, self.label_smoothing,
            self.reduction, self.class_dim, True,
        )


class NLLLoss(ElementwiseLoss):
    r"""Module form of :func:`nll_loss`; ``class_weight`` is a buffer."""

    ignore_index: int

    def __init__(
        self, class_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
        class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.ignore_index = int(ignore_index)

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return nll_statistics(
            predictions, targets, weights, optional_vector(self.class_weight),
            int_hyperparameter(self.ignore_index, predictions), self.class_dim, per_sample, values, per_class,
        )

    def fused_reduction(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
        if torch.jit.is_scripting():
            return None
        return fused_class_index_loss(
            predictions, targets, weights, optional_vector(self.class_weight), self.ignore_index, 0.0, self.reduction,
            self.class_dim, False,
        )


def class_index_inputs(
    batch: int, num_classes: int, spatial: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
    params: Dict[str, Any],
) -> Tuple[Tensor, Tensor]:
    r"""Logits ``(N, C, *)`` and class indices ``(N, *)``, about 15% of them ``ignore_index``."""
    shape = (batch, num_classes) + tuple(spatial)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    target_shape = (batch,) + tuple(spatial)
    targets = torch.randint(0, num_classes, target_shape, generator=generator)
    ignored = torch.rand(target_shape, generator=generator) < 0.15
    targets = torch.where(ignored, torch.full_like(targets, params.get("ignore_index", -100)), targets)
    return logits.to(dtype), targets


def _log_probability_inputs(batch, num_classes, spatial, generator, dtype, params):
    logits, targets = class_index_inputs(batch, num_classes, spatial, generator, torch.float64, params)
    return torch.log_softmax(logits, 1).to(dtype), targets


# The input contract of the softmax losses (cross_entropy, focal).
SOFTMAX_CONTRACT = dict(
    predictions="logits", targets="class_indices_or_probabilities", prediction_shape="(N, C, *)",
    target_shape="(N, *) class indices, or (N, C, *) probabilities", make_inputs=class_index_inputs,
)

register(LossSpec(
    name="cross_entropy", family="cross_entropy",
    summary="softmax cross-entropy from logits with class indices or class probabilities", module=CrossEntropyLoss,
    function=cross_entropy_loss, **SOFTMAX_CONTRACT, statistics_kernel=cross_entropy_statistics,
    params=(CLASS_WEIGHT_PARAM, IGNORE_INDEX_PARAM, LABEL_SMOOTHING_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM),
    reference="torch.nn.functional.cross_entropy (0 instead of NaN when every target is ignored)",
    test_params=(
        {}, {"class_weight": torch.tensor([0.5, 2.0, 1.0])}, {"ignore_index": 1, "label_smoothing": 0.1},
        {"class_weight": torch.tensor([1.5, 0.0, 3.0]), "label_smoothing": 0.25},
    ),
    notes="Targets with the predictions' rank are class probabilities (their own exported graph, chosen "
    "by the targets' rank and dtype); ignore_index does not apply to them, as in torch.",
))

register(LossSpec(
    name="nll", family="cross_entropy", summary="negative log-likelihood of class indices under log-probabilities",
    module=NLLLoss, function=nll_loss, predictions="log_probabilities", targets="class_indices",
    prediction_shape="(N, C, *)", target_shape="(N, *)",
    params=(CLASS_WEIGHT_PARAM, IGNORE_INDEX_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM),
    make_inputs=_log_probability_inputs, statistics_kernel=nll_statistics,
    reference="torch.nn.functional.nll_loss (0 instead of NaN when every target is ignored)",
    test_params=({}, {"class_weight": torch.tensor([0.5, 2.0, 1.0]), "ignore_index": 2}),
))

__all__ = ["CrossEntropyLoss", "NLLLoss", "cross_entropy_loss", "nll_loss"]
