r"""Focal losses (Lin et al. 2017): sigmoid ``binary_focal`` and softmax ``focal``.

Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017,
https://arxiv.org/abs/1708.02002. The focal term multiplies each element's cross-entropy by
:math:`(1 - p_t)^\gamma`, *per element*, so that well-classified elements are down-weighted one by
one (applying it to the batch-mean BCE, as one popular blog does, only rescales the batch loss).
"""
import math
import numbers
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._base import ElementwiseLoss
from ._params import (
    CLASS_DIM_PARAM,
    CLASS_WEIGHT_PARAM,
    GAMMA_PARAM,
    IGNORE_INDEX_PARAM,
    LABEL_SMOOTHING_PARAM,
    REDUCTION_PARAM,
)
from ._registry import LossSpec, ParamSpec, register
from ._reduction import (
    as_float,
    check_reduction,
    check_same_shape,
    compute_dtype,
    elementwise_reductions,
    elementwise_statistics,
    float_hyperparameter,
    int_hyperparameter,
    is_exporting,
    label_map_hint,
    normalize_class_dim,
    one_target_per_prediction_hint,
    optional_vector,
    per_class,
    power,
    sample_or_element_weights,
    select_reduction,
    vector_argument,
    vector_buffer,
)
from ._stable import log_sigmoid, log_softmax, logsumexp
from .cross_entropy import (
    check_label_smoothing,
    class_index_inputs,
    class_index_mask,
    class_vector_along,
    eager_index_targets,
    eager_index_weights,
    eager_target_nll,
    index_weights,
    probability_target_statistics,
    select_class,
)


def _smallest_normal(dtype: torch.dtype) -> float:
    # torch.finfo is not scriptable; these are finfo(float32 / float64).tiny.
    if dtype == torch.float64:
        return 2.2250738585072014e-308
    return 1.1754943508222875e-38


def _modulating_factor(one_minus_p: Tensor, gamma: Tensor) -> Tensor:
    r"""``(1 - p)^γ`` with finite gradients for every ``γ >= 0``.

    At ``1 - p = 0`` the derivative ``γ (1 - p)^(γ-1)`` is infinite for ``γ < 1`` (and ``0 · inf``
    for ``γ = 0``), so the base is clamped at the dtype's smallest normal number: the value changes
    by at most ``tiny^γ`` and the clamp's zero gradient stops the backward pass there.
    """
    return power(torch.clamp(one_minus_p, min=_smallest_normal(one_minus_p.dtype)), gamma)


def _check_gamma(gamma: Tensor) -> None:
    if not is_exporting():
        # One host read and Python comparisons (NaN fails both) rather than a tensor expression.
        value = float(gamma.item())
        if not (value >= 0.0 and math.isfinite(value)):
            raise ValueError("gamma must be a finite number >= 0, got {}".format(value))


def binary_focal_statistics(
    predictions: Tensor,
    targets: Tensor,
    weights: Optional[Tensor],
    alpha: Tensor,
    gamma: Tensor,
    class_weight: Optional[Tensor],
    class_dim: int,
    per_sample: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`binary_focal_loss`; ``alpha`` and ``gamma`` are 0-d tensors."""
    check_same_shape(predictions, targets, class_dim, one_target_per_prediction_hint())
    _check_gamma(gamma)
    if not is_exporting() and float(alpha.item()) > 1.0:
        raise ValueError("alpha must be <= 1 (a negative alpha disables the balancing), got {}".format(float(alpha)))
    dtype = compute_dtype(predictions.dtype)
    x = predictions.to(dtype)
    t = as_float(targets, dtype, "targets")
    alpha = alpha.to(dtype)
    log_p = log_sigmoid(x)
    # BCE with logits, -[t log σ(x) + (1 - t) log σ(-x)] = (1 - t) x - log σ(x).
    cross_entropy = (1.0 - t) * x - log_p
    # 1 - p_t = σ(x)(1 - t) + σ(-x) t. σ(-x) is computed, not 1 - σ(x), which cancels to 0 for
    # x >> 0; exp(log σ) rather than torch.sigmoid, whose vectorised and strided CPU kernels differ
    # in the last bit (the result must not depend on the memory layout).
    one_minus_p_t = torch.exp(log_p) * (1.0 - t) + torch.exp(log_sigmoid(-x)) * t
    loss = cross_entropy * _modulating_factor(one_minus_p_t, gamma)
    alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
    loss = loss * torch.where(alpha >= 0, alpha_t, torch.ones_like(alpha_t))
    shape = list(x.shape)
    weight: Optional[Tensor] = None
    if weights is not None:
        weight = sample_or_element_weights(weights, shape).to(dtype)
    if class_weight is not None:
        class_vector = per_class(class_weight.to(dtype), shape, class_dim, "class_weight")
        weight = class_vector if weight is None else weight * class_vector
    if weight is not None:
        loss = loss * weight
    return elementwise_statistics(loss, weight, None, per_sample)


def binary_focal_loss(
    predictions: Tensor,
    targets: Tensor,
    weights: Optional[Tensor] = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    class_dim: int = 1,
) -> Tensor:
    r"""Sigmoid focal loss from logits (Lin et al. 2017, eq. 5), per element.

    With :math:`p = \sigma(x)`,

    .. math::
        \mathrm{CE} = -[t \log p + (1 - t)\log(1 - p)], \quad
        p_t = p\,t + (1 - p)(1 - t), \quad
        \alpha_t = \alpha\,t + (1 - \alpha)(1 - t)

    .. math::
        \ell = w\,\alpha_t\,(1 - p_t)^\gamma\,\mathrm{CE}

    where :math:`\alpha_t = 1` when :math:`\alpha < 0` and :math:`w` is the call-time weight times
    the element's ``class_weight``. ``CE`` uses a stable log-sigmoid, so any finite logit gives a
    finite loss and gradient.

    Args:
        predictions: logits, any shape ``(N, *)``.
        targets: same shape, values in ``[0, 1]`` (binary masks or soft labels).
        weights: ``(N,)`` per-sample, or broadcastable to the predictions.
        alpha: weight of positives :math:`\alpha \le 1`; negative disables the balancing.
        gamma: focusing parameter :math:`\gamma \ge 0` (``gamma=0, alpha<0`` is ``bce_with_logits``).
        class_weight: per-class weight, length ``C`` along ``class_dim``.
        reduction: ``none`` | ``mean`` (plain mean over elements, as torchvision) | ``sum`` |
            ``weighted_mean`` (:math:`\sum \ell / \sum w`).

    Equals ``torchvision.ops.sigmoid_focal_loss`` for every ``alpha``, ``gamma`` and reduction.
    """
    class_weight = vector_argument(class_weight)
    check_reduction(reduction)
    values, totals, _ = binary_focal_statistics(
        predictions,
        targets,
        weights,
        float_hyperparameter(alpha, predictions),
        float_hyperparameter(gamma, predictions),
        class_weight,
        class_dim,
        False,
    )
    return select_reduction(values, elementwise_reductions(totals), reduction, predictions.dtype)


def focal_class_weight(
    alpha: Optional[Tensor],
    balance_index: Tensor,
    class_weight: Optional[Tensor],
    shape: List[int],
    dim: int,
    dtype: torch.dtype,
) -> Optional[Tensor]:
    r"""The per-class weight :math:`a_c = \alpha_c\, w_c` of the softmax focal loss, along ``dim``.

    ``alpha`` is ``None`` (all ones), a per-class vector, or a 0-d scalar :math:`\alpha` that
    means :math:`\alpha` for class ``balance_index`` and :math:`1 - \alpha` for every other class.
    """
    combined: Optional[Tensor] = None
    if alpha is not None:
        if alpha.dim() == 0:
            num_classes = shape[dim]
            if not is_exporting():
                value = float(alpha.item())
                if value < 0.0 or value > 1.0:
                    raise ValueError("a scalar alpha must be in [0, 1], got {}".format(value))
                balance = int(balance_index.item())
                if balance < 0 or balance >= num_classes:
                    raise ValueError(
                        "balance_index must be a class in [0, {}), got {}".format(num_classes, balance)
                    )
            view = [1] * len(shape)
            view[dim] = num_classes
            classes = torch.arange(num_classes, device=alpha.device).reshape(view)
            scalar_alpha = alpha.to(dtype)
            combined = torch.where(classes == balance_index, scalar_alpha, 1.0 - scalar_alpha)
        else:
            combined = per_class(alpha.to(dtype), shape, dim, "alpha")
    if class_weight is not None:
        weight_c = per_class(class_weight.to(dtype), shape, dim, "class_weight")
        combined = weight_c if combined is None else combined * weight_c
    return combined


def focal_statistics(
    predictions: Tensor,
    targets: Tensor,
    weights: Optional[Tensor],
    gamma: Tensor,
    alpha: Optional[Tensor],
    balance_index: Tensor,
    class_weight: Optional[Tensor],
    ignore_index: Tensor,
    label_smoothing: Tensor,
    class_dim: int,
    per_sample: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`focal_loss`.

    ``gamma``, ``label_smoothing`` (compute dtype), ``balance_index`` and ``ignore_index`` (int64)
    are 0-d tensors; ``alpha`` is ``None``, a 0-d tensor or a per-class vector.
    """
    dtype = compute_dtype(predictions.dtype)
    x = predictions.to(dtype)
    shape = list(x.shape)
    dim = normalize_class_dim(class_dim, len(shape))
    _check_gamma(gamma)
    check_label_smoothing(label_smoothing)
    epsilon = label_smoothing.to(dtype)
    num_classes = shape[dim]
    weight_c = focal_class_weight(alpha, balance_index, class_weight, shape, dim, dtype)

    if targets.dim() == len(shape):
        # Probability targets: Σ_c q_c a_c (1 - p_c)^γ (-log p_c); gamma = 0 is cross_entropy's.
        check_same_shape(predictions, targets, dim, label_map_hint())
        return probability_target_statistics(
            _focal_terms(log_softmax(x, dim), gamma), targets, weights, epsilon, weight_c, dim, dtype, per_sample
        )

    if not is_exporting():
        class_vector: Optional[Tensor] = None
        if weight_c is not None:
            class_vector = class_vector_along(weight_c, shape, dim)
        if weight_c is None or class_vector is not None:
            return _eager_index_focal(
                x, targets, weights, gamma, weight_c, class_vector, ignore_index, epsilon, shape, dim, dtype, per_sample
            )

    target_mask, valid = class_index_mask(targets, ignore_index, shape, dim, True)
    weight, denominator, sample_weight = index_weights(weights, weight_c, target_mask, valid, dim, dtype)
    log_p = log_softmax(x, dim)
    target_term = _focal_terms(select_class(log_p, target_mask, dim), gamma)
    # As in cross_entropy: with label_smoothing = 0 the all-class term is masked out before use.
    smoothing_terms = _focal_terms(torch.where(epsilon > 0, log_p, torch.zeros_like(log_p)), gamma)
    if weight_c is not None:
        smoothing_terms = smoothing_terms * weight_c
    # denominator = a_y (0 where ignored), the same mean denominator as cross_entropy.
    loss = (1.0 - epsilon) * denominator * target_term + (epsilon / num_classes) * smoothing_terms.sum(dim)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if sample_weight is not None:
        loss = loss * sample_weight
    return elementwise_statistics(loss, weight, denominator, per_sample)


def _eager_index_focal(
    x: Tensor,
    targets: Tensor,
    weights: Optional[Tensor],
    gamma: Tensor,
    weight_c: Optional[Tensor],
    class_vector: Optional[Tensor],
    ignore_index: Tensor,
    epsilon: Tensor,
    shape: List[int],
    dim: int,
    dtype: torch.dtype,
    per_sample: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The class-index branch of :func:`focal_statistics` outside export, same formula.

    The focal term of the target is computed from :math:`-\log p_y` alone (elementwise shape), in
    place unless autograd records ``x``; the all-class smoothing term only when
    ``label_smoothing > 0`` (read on the host); no mask when no target is ignored.
    """
    indices, valid = eager_index_targets(targets, ignore_index, shape, dim)
    x = x.contiguous()
    smoothing = float(epsilon.item()) > 0.0
    lse = logsumexp(x, dim)
    target_nll = eager_target_nll(x, lse, indices, valid, dim, smoothing)
    weight, denominator, sample_weight = eager_index_weights(weights, class_vector, indices, valid, dtype)
    # (1 - p_y)^γ (-log p_y) with 1 - p_y = -expm1(log p_y); target_nll is 0 where ignored and
    # denominator = a_y is 0 there, so ignored elements give 0 without a mask.
    if torch.is_grad_enabled() and x.requires_grad:
        loss = _modulating_factor(-torch.expm1(-target_nll), gamma).mul_(target_nll)
    else:
        # No clamp at the smallest normal (it is there for the gradient): target_nll >= 0, so the
        # base is >= 0, and a base below it means -log p_y below it too, a product of ~0 either way.
        loss = torch.neg(target_nll).expm1_().neg_().pow_(float(gamma.item())).mul_(target_nll)
    if denominator is not None:
        loss = loss.mul_(denominator)
    if smoothing:
        smoothing_terms = _focal_terms(x - lse.unsqueeze(dim), gamma)
        if weight_c is not None:
            smoothing_terms = smoothing_terms * weight_c
        loss = (1.0 - epsilon) * loss + (epsilon / shape[dim]) * smoothing_terms.sum(dim)
        if valid is not None:
            loss = torch.where(valid, loss, 0.0)
    if sample_weight is not None:
        loss = loss.mul_(sample_weight)
    return elementwise_statistics(loss, weight, denominator, per_sample)


def _focal_terms(log_p: Tensor, gamma: Tensor) -> Tensor:
    r"""``(1 - p)^γ · (-log p)`` from ``log p``; ``1 - p = -expm1(log p)`` stays accurate as p -> 1."""
    return _modulating_factor(-torch.expm1(log_p), gamma) * -log_p


def _number_or_vector(value: Any) -> Union[float, Tensor, None]:
    r"""An eager caller's ``alpha``: a number (an int or a numpy scalar too) or a per-class vector (a
    list, tuple or numpy array too), as :class:`FocalLoss` takes it."""
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return torch.as_tensor(value)


def focal_loss(
    predictions: Tensor,
    targets: Tensor,
    weights: Optional[Tensor] = None,
    gamma: float = 2.0,
    alpha: Union[float, Tensor, None] = None,
    balance_index: int = 0,
    class_weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    class_dim: int = 1,
) -> Tensor:
    r"""Softmax (multi-class) focal loss from logits (Lin et al. 2017), per element.

    With :math:`\log p_c = \operatorname{log\_softmax}(x)_c`, the per-class weight
    :math:`a_c = \alpha_c\, w_c` (``alpha`` times ``class_weight``; the paper's :math:`\alpha_t` is
    :math:`a_y`) and :math:`f(p) = (1 - p)^\gamma (-\log p)`, an element with class index
    :math:`y` has

    .. math::
        \ell = (1 - \varepsilon)\, a_y\, f(p_y) + \frac{\varepsilon}{C} \sum_c a_c\, f(p_c),
        \qquad d = a_y

    (:math:`\ell = d = 0` where :math:`y` is ``ignore_index``), and an element with class
    probabilities :math:`t_c` has :math:`\ell = \sum_c q_c\, a_c f(p_c)` with
    :math:`q_c = (1 - \varepsilon) t_c + \varepsilon / C` and :math:`d = 1`. With
    :math:`\gamma = 0` this is :func:`~loss_service.losses.cross_entropy.cross_entropy_loss` with
    ``class_weight`` :math:`a`, for every reduction.

    Args:
        predictions: logits ``(N, C, *)`` (classes along ``class_dim``).
        targets: class indices ``(N, *)`` in ``[0, C)`` or ``ignore_index``, or class
            probabilities of the predictions' shape.
        weights: ``(N,)`` per-sample, or broadcastable to ``(N, *)``; not part of :math:`d`.
        gamma: focusing parameter :math:`\gamma \ge 0`.
        alpha: ``None`` (no balancing); a per-class vector :math:`\alpha_c` (length ``C``, used
            as given: a normalisation to sum 1 cancels in ``mean``); or a scalar in ``[0, 1]``
            meaning :math:`\alpha` for class ``balance_index`` and :math:`1 - \alpha` for the others.
        balance_index: the class a scalar ``alpha`` applies to.
        class_weight: per-class weight :math:`w_c` (multiplies ``alpha``).
        ignore_index: class-index target that contributes nothing.
        label_smoothing: :math:`\varepsilon \in [0, 1]`, torch's smoothed target distribution.
        reduction: ``none`` | ``mean`` (:math:`\sum \ell / \sum d`, as cross_entropy) | ``sum`` |
            ``weighted_mean`` (:math:`\sum \ell / \sum w`, :math:`w` = weights × :math:`d`).
        class_dim: the class dimension (``-1`` for channels-last ``(N, *, C)``).
    """
    class_weight = vector_argument(class_weight)
    check_reduction(reduction)
    if not torch.jit.is_scripting():
        alpha = _number_or_vector(alpha)
    alpha_tensor: Optional[Tensor] = None
    if isinstance(alpha, Tensor):
        alpha_tensor = alpha
    elif alpha is not None:
        alpha_tensor = float_hyperparameter(alpha, predictions)
    values, totals, _ = focal_statistics(
        predictions,
        targets,
        weights,
        float_hyperparameter(gamma, predictions),
        alpha_tensor,
        int_hyperparameter(balance_index, predictions),
        class_weight,
        int_hyperparameter(ignore_index, predictions),
        float_hyperparameter(label_smoothing, predictions),
        class_dim,
        False,
    )
    return select_reduction(values, elementwise_reductions(totals), reduction, predictions.dtype)


class BinaryFocalLoss(ElementwiseLoss):
    r"""Module form of :func:`binary_focal_loss`; ``class_weight`` is a buffer."""

    alpha: float
    gamma: float

    def __init__(
        self,
        alpha: float = 0.25,
        gamma: float = 2.0,
        class_weight: Optional[Tensor] = None,
        reduction: str = "mean",
        class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return binary_focal_statistics(
            predictions,
            targets,
            weights,
            float_hyperparameter(self.alpha, predictions),
            float_hyperparameter(self.gamma, predictions),
            optional_vector(self.class_weight),
            self.class_dim,
            per_sample,
        )


class FocalLoss(ElementwiseLoss):
    r"""Module form of :func:`focal_loss`.

    ``alpha`` is a buffer: empty when unset, 0-d for the scalar (``balance_index``) form, 1-d for a
    per-class vector. Lists and floats are accepted, as in the blog's
    ``FocalLoss(num_class, alpha=0.6, gamma=2, balance_index=0)`` (the class count comes from the
    predictions here).
    """

    gamma: float
    balance_index: int
    ignore_index: int
    label_smoothing: float

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: Union[float, List[float], Tensor, None] = None,
        balance_index: int = 0,
        class_weight: Optional[Tensor] = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.gamma = float(gamma)
        self.balance_index = int(balance_index)
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        if isinstance(alpha, (int, float, list, tuple)):
            # float64 keeps a Python number exact; kernels cast to the compute dtype.
            alpha = torch.tensor(alpha, dtype=torch.float64)
        self.register_buffer("alpha", vector_buffer(alpha))

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return focal_statistics(
            predictions,
            targets,
            weights,
            float_hyperparameter(self.gamma, predictions),
            optional_vector(self.alpha),
            int_hyperparameter(self.balance_index, predictions),
            optional_vector(self.class_weight),
            int_hyperparameter(self.ignore_index, predictions),
            float_hyperparameter(self.label_smoothing, predictions),
            self.class_dim,
            per_sample,
        )


def _binary_inputs(batch, num_classes, spatial, generator, dtype, params):
    shape = (batch, num_classes) + tuple(spatial)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    targets = (torch.rand(shape, generator=generator, dtype=torch.float64) < 0.3).to(dtype)
    return logits.to(dtype), targets


register(
    LossSpec(
        name="binary_focal",
        family="focal",
        summary="sigmoid focal loss from logits (per element, torchvision's convention)",
        module=BinaryFocalLoss,
        function=binary_focal_loss,
        predictions="logits",
        targets="probabilities",
        prediction_shape="(N, *)",
        target_shape="same as predictions",
        params=(
            ParamSpec("alpha", "float", 0.25, "weight α of positives (1-α of negatives); negative disables", high=1.0),
            GAMMA_PARAM,
            CLASS_WEIGHT_PARAM,
            REDUCTION_PARAM,
            CLASS_DIM_PARAM,
        ),
        make_inputs=_binary_inputs,
        statistics_kernel=binary_focal_statistics,
        reductions_kernel=elementwise_reductions,
        reference="torchvision.ops.sigmoid_focal_loss (its documented formula; mean = plain element mean)",
        test_params=(
            {},
            {"alpha": -1.0, "gamma": 0.0},
            {"alpha": 0.75, "gamma": 0.5},
            {"alpha": 0.25, "gamma": 1.5, "class_weight": torch.tensor([0.5, 2.0, 1.0])},
        ),
        paper="Lin et al., Focal Loss for Dense Object Detection, ICCV 2017 (arXiv:1708.02002)",
    )
)

register(
    LossSpec(
        name="focal",
        family="focal",
        summary="softmax (multi-class) focal loss from logits; gamma=0 is cross_entropy",
        module=FocalLoss,
        function=focal_loss,
        predictions="logits",
        targets="class_indices_or_probabilities",
        prediction_shape="(N, C, *)",
        target_shape="(N, *) class indices, or (N, C, *) probabilities",
        params=(
            GAMMA_PARAM,
            ParamSpec(
                "alpha", "float_or_vector", None,
                "per-class α_c (length C, multiplies class_weight), or a scalar α in [0, 1]: α for class "
                "balance_index and 1-α for the others; unset means 1",
                low=0.0,
            ),
            ParamSpec("balance_index", "int", 0, "the class a scalar alpha applies to", low=0),
            CLASS_WEIGHT_PARAM,
            IGNORE_INDEX_PARAM,
            LABEL_SMOOTHING_PARAM,
            REDUCTION_PARAM,
            CLASS_DIM_PARAM,
        ),
        make_inputs=class_index_inputs,
        statistics_kernel=focal_statistics,
        reductions_kernel=elementwise_reductions,
        reference="explicit formula of Lin et al. 2017 with torch.nn.functional.cross_entropy's class weights, "
        "ignore_index, label smoothing and mean denominator",
        test_params=(
            {},
            {"gamma": 0.5, "class_weight": torch.tensor([0.5, 2.0, 1.0]), "ignore_index": 1},
            {"gamma": 1.5, "alpha": torch.tensor([0.2, 0.3, 0.5]), "label_smoothing": 0.1},
            {"gamma": 2.0, "alpha": 0.25, "balance_index": 2, "class_weight": torch.tensor([1.0, 3.0, 0.5]),
             "label_smoothing": 0.05},
            {"gamma": 0.0, "class_weight": torch.tensor([1.5, 0.0, 3.0])},
        ),
        paper="Lin et al., Focal Loss for Dense Object Detection, ICCV 2017 (arXiv:1708.02002)",
        notes="Targets with the predictions' rank are class probabilities (their own exported graph).",
    )
)

__all__ = ["BinaryFocalLoss", "FocalLoss", "binary_focal_loss", "focal_loss"]
