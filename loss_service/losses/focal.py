r"""Focal losses (Lin et al. 2017): sigmoid ``binary_focal`` and softmax ``focal``.

Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017,
https://arxiv.org/abs/1708.02002. The focal term multiplies each element's cross-entropy by
:math:`(1 - p_t)^\gamma`, *per element*, so that well-classified elements are down-weighted one by
one (applying it to the batch-mean BCE, as one popular blog does, only rescales the batch loss).
"""
import numbers
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _autograd
from ._base import ElementwiseLoss
from ._params import (
    CLASS_DIM_PARAM, CLASS_WEIGHT_PARAM, GAMMA_PARAM, IGNORE_INDEX_PARAM, IGNORED_IN_MEAN_PARAM, LABEL_SMOOTHING_PARAM,
    OPTIONAL_IGNORE_INDEX_PARAM, POS_WEIGHT_PARAM, REDUCTION_PARAM,
)
from ._registry import LossSpec, ParamSpec, register
from ._reduction import (
    as_float, binary_kept, check_reduction, check_same_shape, class_setting, compute_dtype, reduce_elementwise,
    float_hyperparameter, hyperparameter_in, ignored_targets_zeroed, in_dtype, int_hyperparameter, is_tracing,
    one_target_per_prediction_hint, optional_ignore_index, optional_vector, sum_reduction, torch_reduction,
    unless_ignored, vector_argument, vector_buffer, weighted_statistics,
)
from ._stable import log_sigmoid
from .bce import binary_inputs
from .cross_entropy import SOFTMAX_CONTRACT, check_gamma, modulating_factor, softmax_statistics


def binary_focal_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], alpha: Tensor, gamma: Tensor,
    pos_weight: Optional[Tensor], ignore_index: Optional[Tensor], ignored_in_mean: Optional[Tensor],
    class_weight: Optional[Tensor], class_dim: int, per_sample: bool, values: bool = True, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`binary_focal_loss`; ``alpha`` and ``gamma`` are 0-d tensors, ``ignore_index``
    ``None`` ignores nothing (no mask: :func:`~._reduction.binary_kept`). It writes its values whatever
    ``values`` says."""
    loss, kept, dtype = _binary_focal_terms(predictions, targets, alpha, gamma, pos_weight, ignore_index, class_dim)
    return weighted_statistics(
        loss, weights, class_weight, class_dim, dtype, per_sample, per_class, kept, ignored_in_mean
    )


def _binary_focal_terms(
    predictions: Tensor, targets: Tensor, alpha: Tensor, gamma: Tensor, pos_weight: Optional[Tensor],
    ignore_index: Optional[Tensor], class_dim: int,
) -> Tuple[Tensor, Optional[Tensor], torch.dtype]:
    r"""``(loss, kept, dtype)`` of :func:`binary_focal_statistics`: each element's unweighted focal loss (0 where
    ignored), :func:`~._reduction.binary_kept` and the compute dtype."""
    check_same_shape(predictions, targets, class_dim, one_target_per_prediction_hint())
    check_gamma(gamma)
    if not is_tracing() and float(alpha) > 1.0:
        raise ValueError("alpha must be <= 1 (a negative alpha disables the balancing), got {}".format(float(alpha)))
    dtype = compute_dtype(predictions.dtype)
    t = as_float(targets, dtype, "targets")
    kept = binary_kept(t, ignore_index)
    x = unless_ignored(predictions.to(dtype), kept)
    t = ignored_targets_zeroed(t, kept)
    positive_weight: Optional[Tensor] = None
    if pos_weight is not None:
        positive_weight = class_setting(pos_weight.to(dtype), list(x.shape), class_dim, "pos_weight")
    if not torch.jit.is_scripting() and not is_tracing() and not t.requires_grad:
        return _autograd.binary_focal(x, t, float(alpha), float(gamma), positive_weight), kept, dtype
    alpha = hyperparameter_in(alpha, dtype)
    log_p = log_sigmoid(x)
    # BCE with logits, -[w₊ t log σ(x) + (1 - t) log σ(-x)] = (1 - t) x - (w₊ t + 1 - t) log σ(x).
    positive_scale = t if positive_weight is None else positive_weight * t
    cross_entropy = (1.0 - t) * x - (positive_scale + 1.0 - t) * log_p
    # 1 - p_t = σ(x)(1 - t) + σ(-x) t. σ(-x) is computed, not 1 - σ(x), which cancels to 0 for
    # x >> 0; exp(log σ) rather than torch.sigmoid, whose vectorised and strided CPU kernels differ
    # in the last bit (the result must not depend on the memory layout).
    one_minus_p_t = torch.exp(log_p) * (1.0 - t) + torch.exp(log_sigmoid(-x)) * t
    loss = cross_entropy * modulating_factor(one_minus_p_t, gamma)
    alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
    if not is_tracing():
        # A negative alpha disables the balancing: read on the host.
        return (loss * alpha_t if float(alpha) >= 0 else loss), kept, dtype
    return loss * torch.where(alpha >= 0, alpha_t, torch.ones_like(alpha_t)), kept, dtype


def fused_binary_focal(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], alpha: Tensor, gamma: Tensor,
    pos_weight: Optional[Tensor], ignore_index: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int,
    reduction: str,
) -> Optional[Tensor]:
    r"""``Loss.fused_reduction`` of :func:`binary_focal_loss`: torch's own sum of its values, divided for the
    mean (:func:`~._reduction.sum_reduction`: the element count is ``mean``'s denominator), not the float64 totals;
    ``None`` with ``weights``, ``class_weight`` or ``ignore_index``, and for the mean of no elements."""
    how = torch_reduction(reduction, True, predictions.numel())
    if how == "" or weights is not None or class_weight is not None or ignore_index is not None:
        return None
    loss, _, _ = _binary_focal_terms(predictions, targets, alpha, gamma, pos_weight, None, class_dim)
    return in_dtype(sum_reduction(loss.sum(), how, loss.numel()), predictions.dtype)


def binary_focal_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, alpha: float = 0.25, gamma: float = 2.0,
    pos_weight: Optional[Tensor] = None, ignore_index: Optional[int] = None, ignored_in_mean: bool = False,
    class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Sigmoid focal loss from logits (Lin et al. 2017, eq. 5), per element.

    With :math:`p = \sigma(x)`,

    .. math::
        \mathrm{CE} = -[w_+ t \log p + (1 - t)\log(1 - p)], \quad
        p_t = p\,t + (1 - p)(1 - t), \quad
        \alpha_t = \alpha\,t + (1 - \alpha)(1 - t)

    .. math::
        \ell = w\,\alpha_t\,(1 - p_t)^\gamma\,\mathrm{CE}

    where :math:`\alpha_t = 1` when :math:`\alpha < 0`, :math:`w_+` is the ``pos_weight`` of the element's class
    (1 unset; torch's ``pos_weight`` of ``binary_cross_entropy_with_logits``, kornia's of
    ``binary_focal_loss_with_logits``) and :math:`w` is the call-time weight times the element's ``class_weight``. ``CE`` uses a stable log-sigmoid, so any finite logit gives a
    finite loss and gradient.

    ``alpha`` :math:`\le 1` weights positives (negative disables the balancing), ``gamma`` :math:`\ge 0`
    (``gamma=0, alpha<0`` is ``bce_with_logits``, whose inputs and weights these are). ``mean`` is the plain
    element mean (torchvision's), ``weighted_mean`` :math:`\sum \ell / \sum w`. Elements whose target is
    ``ignore_index`` get weight 0 and count in ``mean`` only with ``ignored_in_mean`` (kornia's
    ``binary_focal_loss_with_logits(ignore_index=...)`` mean). Equals
    ``torchvision.ops.sigmoid_focal_loss`` for every ``alpha``, ``gamma`` and reduction.
    """
    check_reduction(reduction)
    alpha_tensor, gamma_tensor = float_hyperparameter(alpha, predictions), float_hyperparameter(gamma, predictions)
    pos_weight, class_weight = vector_argument(pos_weight), vector_argument(class_weight)
    ignored, ignored_in_mean_tensor = optional_ignore_index(ignore_index, ignored_in_mean, predictions)
    fused = fused_binary_focal(
        predictions, targets, weights, alpha_tensor, gamma_tensor, pos_weight, ignored, class_weight, class_dim,
        reduction,
    )
    if fused is not None:
        return fused
    values, totals, _ = binary_focal_statistics(
        predictions, targets, weights, alpha_tensor, gamma_tensor, pos_weight, ignored, ignored_in_mean_tensor,
        class_weight, class_dim, False,
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


# Statistics kernel of focal_loss: the softmax kernel, its arguments named as the focal parameters (gamma a
# 0-d tensor; alpha None, a 0-d tensor or a per-class vector).
focal_statistics = softmax_statistics


def _number_or_vector(value: Any) -> Union[float, Tensor, None]:
    r"""An eager caller's ``alpha``: a number (an int or a numpy scalar too) or a per-class vector (a
    list, tuple or numpy array too), as :class:`FocalLoss` takes it."""
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return torch.as_tensor(value)


def focal_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, gamma: float = 2.0,
    alpha: Union[float, Tensor, None] = None, balance_index: int = 0, class_weight: Optional[Tensor] = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", class_dim: int = 1,
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

    ``alpha`` is ``None`` (no balancing), a per-class vector :math:`\alpha_c` (used as given: a normalisation
    to sum 1 cancels in ``mean``) or a scalar in ``[0, 1]``: :math:`\alpha` for class ``balance_index``,
    :math:`1 - \alpha` for the others. The rest as :func:`~loss_service.losses.cross_entropy.cross_entropy_loss`.
    """
    check_reduction(reduction)
    if not torch.jit.is_scripting():
        alpha = _number_or_vector(alpha)
    alpha_tensor: Optional[Tensor] = None
    if isinstance(alpha, Tensor):
        alpha_tensor = alpha
    elif alpha is not None:
        # A scalar alpha is a 0-d tensor as the module's buffer is: class_weights spreads it over the classes.
        alpha_tensor = torch.full([], alpha, dtype=compute_dtype(predictions.dtype), device=predictions.device)
    values, totals, _ = focal_statistics(
        predictions, targets, weights, float_hyperparameter(gamma, predictions), alpha_tensor,
        int_hyperparameter(balance_index, predictions), vector_argument(class_weight),
        int_hyperparameter(ignore_index, predictions), float_hyperparameter(label_smoothing, predictions), class_dim,
        False,
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


class BinaryFocalLoss(ElementwiseLoss):
    r"""Module form of :func:`binary_focal_loss`; ``pos_weight`` and ``class_weight`` are buffers."""

    alpha: float
    gamma: float
    ignore_index: Optional[int]
    ignored_in_mean: bool

    def __init__(
        self, alpha: float = 0.25, gamma: float = 2.0, pos_weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None, ignored_in_mean: bool = False, class_weight: Optional[Tensor] = None,
        reduction: str = "mean", class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.register_buffer("pos_weight", vector_buffer(pos_weight))
        self.ignore_index = OPTIONAL_IGNORE_INDEX_PARAM.validate(ignore_index)
        self.ignored_in_mean = bool(ignored_in_mean)

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        ignore_index, ignored_in_mean = optional_ignore_index(self.ignore_index, self.ignored_in_mean, predictions)
        return binary_focal_statistics(
            predictions, targets, weights, float_hyperparameter(self.alpha, predictions),
            float_hyperparameter(self.gamma, predictions), optional_vector(self.pos_weight), ignore_index,
            ignored_in_mean, optional_vector(self.class_weight), self.class_dim, per_sample, values, per_class,
        )

    def fused_reduction(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
        if self.ignore_index is not None:
            return None
        return fused_binary_focal(
            predictions, targets, weights, float_hyperparameter(self.alpha, predictions),
            float_hyperparameter(self.gamma, predictions), optional_vector(self.pos_weight), None,
            optional_vector(self.class_weight), self.class_dim, self.reduction,
        )


class FocalLoss(ElementwiseLoss):
    r"""Module form of :func:`focal_loss`. ``alpha`` is a buffer: empty when unset, 0-d for the scalar
    (``balance_index``) form, 1-d for a per-class vector; lists and floats are accepted, as in the blog's
    ``FocalLoss(num_class, alpha=0.6, gamma=2, balance_index=0)`` (the class count comes from the predictions)."""

    gamma: float
    balance_index: int
    ignore_index: int
    label_smoothing: float

    def __init__(
        self, gamma: float = 2.0, alpha: Union[float, List[float], Tensor, None] = None, balance_index: int = 0,
        class_weight: Optional[Tensor] = None, ignore_index: int = -100, label_smoothing: float = 0.0,
        reduction: str = "mean", class_dim: int = 1,
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
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return focal_statistics(
            predictions, targets, weights, float_hyperparameter(self.gamma, predictions), optional_vector(self.alpha),
            int_hyperparameter(self.balance_index, predictions), optional_vector(self.class_weight),
            int_hyperparameter(self.ignore_index, predictions), float_hyperparameter(self.label_smoothing, predictions),
            self.class_dim, per_sample, values, per_class,
        )


register(LossSpec(
    name="binary_focal", family="focal",
    summary="sigmoid focal loss from logits (per element, torchvision's convention)", module=BinaryFocalLoss,
    function=binary_focal_loss, predictions="logits", targets="probabilities", prediction_shape="(N, *)",
    target_shape="same as predictions",
    params=(
        ParamSpec("alpha", "float", 0.25, "weight α of positives (1-α of negatives); negative disables", high=1.0),
        GAMMA_PARAM, POS_WEIGHT_PARAM, OPTIONAL_IGNORE_INDEX_PARAM, IGNORED_IN_MEAN_PARAM, CLASS_WEIGHT_PARAM,
        REDUCTION_PARAM, CLASS_DIM_PARAM,
    ),
    make_inputs=binary_inputs, statistics_kernel=binary_focal_statistics,
    reference="torchvision.ops.sigmoid_focal_loss (its documented formula; mean = plain element mean)",
    test_params=(
        {}, {"alpha": -1.0, "gamma": 0.0}, {"alpha": 0.75, "gamma": 0.5},
        {"alpha": 0.25, "gamma": 1.5, "class_weight": torch.tensor([0.5, 2.0, 1.0])},
        {"alpha": 0.6, "gamma": 2.0, "pos_weight": torch.tensor([3.0, 0.5, 1.0])},
        {"alpha": 0.25, "gamma": 2.0, "ignore_index": -100, "ignored_in_mean": True},
        {"alpha": 0.5, "gamma": 0.5, "ignore_index": 255, "class_weight": torch.tensor([0.5, 2.0, 1.0])},
    ),
    paper="Lin et al., Focal Loss for Dense Object Detection, ICCV 2017 (arXiv:1708.02002)",
))

register(LossSpec(
    name="focal", family="focal", summary="softmax (multi-class) focal loss from logits; gamma=0 is cross_entropy",
    module=FocalLoss, function=focal_loss, **SOFTMAX_CONTRACT, statistics_kernel=focal_statistics,
    params=(
        GAMMA_PARAM,
        ParamSpec(
            "alpha", "float_or_vector", None,
            "per-class α_c (length C, multiplies class_weight), or a scalar α in [0, 1]: α for class "
            "balance_index and 1-α for the others; unset means 1",
            low=0.0,
        ),
        ParamSpec("balance_index", "int", 0, "the class a scalar alpha applies to", low=0), CLASS_WEIGHT_PARAM,
        IGNORE_INDEX_PARAM, LABEL_SMOOTHING_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM,
    ),
    reference="explicit formula of Lin et al. 2017 with torch.nn.functional.cross_entropy's class weights, "
    "ignore_index, label smoothing and mean denominator",
    test_params=(
        {}, {"gamma": 0.5, "class_weight": torch.tensor([0.5, 2.0, 1.0]), "ignore_index": 1},
        {"gamma": 1.5, "alpha": torch.tensor([0.2, 0.3, 0.5]), "label_smoothing": 0.1},
        {"gamma": 2.0, "alpha": 0.25, "balance_index": 2, "class_weight": torch.tensor([1.0, 3.0, 0.5]),
         "label_smoothing": 0.05},
        {"gamma": 0.0, "class_weight": torch.tensor([1.5, 0.0, 3.0])},
    ),
    paper="Lin et al., Focal Loss for Dense Object Detection, ICCV 2017 (arXiv:1708.02002)",
    notes="Targets with the predictions' rank are class probabilities (their own exported graph).",
))

__all__ = ["BinaryFocalLoss", "FocalLoss", "binary_focal_loss", "focal_loss"]
