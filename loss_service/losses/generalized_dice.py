r"""Generalised Dice loss on logits (Sudre et al. 2017), MONAI's ``GeneralizedDiceLoss`` conventions.

Sudre, Li, Vercauteren, Ourselin, Cardoso, "Generalised Dice overlap as a deep learning loss function for
highly unbalanced segmentations", DLMIA 2017, https://arxiv.org/abs/1707.03237. With the region kernels'
sums (:func:`~loss_service.losses.region.region_sums`, no squares) per sample ``n`` and class ``c``,

.. math::
    \ell_n = 1 - \frac{2 \sum_c w_{nc}\,TP_{nc} + s_{nr}}{\sum_c w_{nc}\,(P_{nc} + T_{nc}) + s_{dr}},\qquad
    w_{nc} = T_{nc}^{-k}

with the ``weight_exponent`` :math:`k` (2 is Sudre et al.'s, MONAI's ``w_type="square"``; 1 ``"simple"``; 0
``"uniform"``) over the kept classes: ``include_background=False`` drops channel 0 beside others, and
``class_weight`` multiplies :math:`w_{nc}` (as kornia's ``weight``). A class absent from the targets
(:math:`T = 0`, an infinite weight for :math:`k > 0`) takes the largest finite weight of its row, as MONAI.
With :math:`k = 0`, ``smooth_nr = 0`` and ``smooth_dr = ε`` this is kornia's ``dice_loss(average="micro", eps=ε)``,
one Dice per sample over all classes. One loss per sample (``batch=False``: the elementwise totals of that ``(N,)``
vector), or one for the whole data (``batch=True``: the sums run over the batch too, the totals are
``[TP_c…, P_c…, T_c…]`` and the weights come from the data's :math:`T_c`; exact across batches and merges).
``(N,)`` call-time weights are sample weights
(of the per-sample losses, or scaling a sample's sums with ``batch``), other shapes pixel weights.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._base import Loss
from ._params import IGNORE_INDEX_PARAM, REDUCTION_PARAM
from ._registry import Forms, LossSpec, ParamSpec, register
from ._reduction import (
    bool_hyperparameter, check_range, check_reduction, elementwise_reductions, elementwise_statistics,
    int_hyperparameter, optional_vector, power, safe_divide, select_reduction, vector_argument, vector_buffer,
)
from .region import (
    BATCH_PARAM, CLASS_WEIGHT_PARAM, DENSE_TARGET_RANGE, INCLUDE_BACKGROUND_PARAM, MODE_PARAM, SMOOTH_DR_PARAM,
    SMOOTH_NR_PARAM, VARIANTS, _SHAPES, DiceLoss, _class_vectors, _constant, _float64, _weighted,
    batch_totals, check_split_weights, index_arguments, pooled_class_totals, region_class_reductions, region_forms,
    region_inputs, region_sums, set_region_settings, split_weights,
)

WEIGHT_EXPONENT_PARAM = ParamSpec(
    "weight_exponent", "float", 2.0,
    "class weights 1/T^k of the target sums T: 2 is Sudre et al.'s (MONAI's w_type='square'), 1 'simple', "
    "0 'uniform'",
    low=0.0,
)
# MONAI's w_type by its weight_exponent.
MONAI_WEIGHT_TYPES = {"square": 2.0, "simple": 1.0, "uniform": 0.0}


def _generalized_dice_losses(
    true_positive: Tensor, predicted: Tensor, target: Tensor, weight_exponent: Tensor, smooth_nr: Tensor,
    smooth_dr: Tensor, include_background: Tensor, class_weight: Optional[Tensor],
) -> Tensor:
    r"""The loss of each row of ``(..., C)`` float64 sums (the module docstring's :math:`\ell`)."""
    kept, class_factor = _class_vectors(true_positive.shape[-1], include_background, class_weight, true_positive.device)
    # T^-k is infinite for an absent class (T = 0) unless k = 0, where every weight is 1 (0^0 = 1, MONAI's uniform).
    present = (target > 0) | (_float64(weight_exponent) == 0.0)
    inverse = 1.0 / power(torch.where(present, target, torch.ones_like(target)), weight_exponent)
    counted = present if kept is None else present & (kept > 0)
    finite = torch.where(counted, inverse, torch.zeros_like(inverse))
    weight = _weighted(torch.where(present, inverse, finite.amax(-1, keepdim=True).expand_as(inverse)), class_factor)
    numerator = 2.0 * (weight * true_positive).sum(-1) + _float64(smooth_nr)
    denominator = (weight * (predicted + target)).sum(-1) + _float64(smooth_dr)
    # 0/0 (smooth_dr = 0, nothing predicted nor present) is a perfect overlap, as for the region losses.
    return 1.0 - safe_divide(numerator, denominator, 1.0)


def generalized_dice_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], sample_weights: Optional[Tensor],
    weight_exponent: Tensor, smooth_nr: Tensor, smooth_dr: Tensor, include_background: Tensor, ignore_index: Tensor,
    class_weight: Optional[Tensor], mode: str, batch: bool, per_sample: bool, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The statistics kernel of :func:`generalized_dice_loss`, with pixel ``weights`` and ``(N,)``
    ``sample_weights`` apart (as :func:`~loss_service.losses.region.region_statistics`). Values: the
    loss of each sample, ``(N,)``, or with ``batch`` the one loss of the batch, ``(1,)``. The class totals of
    ``per_class`` are ``[TP_c, P_c, T_c]`` over the batch, with either ``batch``."""
    check_range(weight_exponent, "weight_exponent", 1.7976931348623157e308, "a finite number >= 0")
    check_split_weights(weights, sample_weights, predictions)
    sums = region_sums(
        predictions, targets, weights, ignore_index, bool_hyperparameter(False, predictions), mode
    )
    if batch:
        totals, sample_totals = batch_totals(sums, sample_weights, per_sample and not per_class)
        values = generalized_dice_reductions(
            totals.unsqueeze(0), weight_exponent, smooth_nr, smooth_dr, include_background, class_weight, batch
        )[:, 0]
        return values, totals, pooled_class_totals(totals) if per_class else sample_totals
    true_positive, predicted, target = sums
    losses = _generalized_dice_losses(
        true_positive, predicted, target, weight_exponent, smooth_nr, smooth_dr, include_background, class_weight
    )
    weight: Optional[Tensor] = None
    if sample_weights is not None:
        weight = sample_weights.to(torch.float64)
        losses = losses * weight
    values, totals, parts = elementwise_statistics(losses, weight, None, per_sample and not per_class)
    if per_class:
        pooled, _ = batch_totals(sums, sample_weights, False)
        parts = pooled_class_totals(pooled)
    return values, totals, parts


def generalized_dice_reductions(
    totals: Tensor, weight_exponent: Tensor, smooth_nr: Tensor, smooth_dr: Tensor, include_background: Tensor,
    class_weight: Optional[Tensor], batch: bool,
) -> Tensor:
    r"""``(..., K)`` totals to ``[sum, mean, weighted_mean]``: the elementwise rule over the per-sample losses,
    or with ``batch`` the one loss of ``[TP_c…, P_c…, T_c…]`` in all three columns."""
    if not batch:
        return elementwise_reductions(totals)
    if totals.shape[-1] % 3 != 0:
        raise ValueError(
            "batch=True generalized_dice totals must hold [TP_c, P_c, T_c] per class (a multiple of 3), got {}".format(
                totals.shape[-1]
            )
        )
    num_classes = totals.shape[-1] // 3
    loss = _generalized_dice_losses(
        totals[..., :num_classes], totals[..., num_classes:2 * num_classes], totals[..., 2 * num_classes:],
        weight_exponent, smooth_nr, smooth_dr, include_background, class_weight,
    )
    return torch.stack([loss, loss, loss], dim=-1)


def _arguments(
    like: Tensor, weight_exponent: float, smooth_nr: float, smooth_dr: float, include_background: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``(weight_exponent, smooth_nr, smooth_dr, include_background)`` as the kernels take them (the region
    kernels' :func:`~loss_service.losses.region._constant` and :func:`~._reduction.bool_hyperparameter`)."""
    return (
        _constant(weight_exponent, like), _constant(smooth_nr, like), _constant(smooth_dr, like),
        bool_hyperparameter(include_background, like),
    )


def generalized_dice_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, weight_exponent: float = 2.0,
    smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, include_background: bool = True, ignore_index: int = -100,
    class_weight: Optional[Tensor] = None, mode: str = "binary", batch: bool = False, reduction: str = "mean",
) -> Tensor:
    r"""Generalised Dice loss on logits (Sudre et al. 2017; the module docstring has the formula).

    Shapes as the region losses: binary ``(N, 1, *)`` or ``(N, *)`` logits with masks of that shape, multilabel
    ``(N, C, *)`` with masks, multiclass ``(N, C, *)`` with class indices ``(N, *)``/``(N, 1, *)`` or class
    probabilities. ``none`` returns the loss of each sample ``(N,)`` (``(1,)`` with ``batch``); ``mean`` divides
    by ``N`` (MONAI's mean), ``weighted_mean`` by the sample weights' sum. Equals
    ``monai.losses.GeneralizedDiceLoss`` with ``sigmoid=True`` (binary, multilabel) or ``softmax=True,
    to_onehot_y=True`` (multiclass) and ``w_type`` ``"square"``, ``"simple"``, ``"uniform"`` for ``weight_exponent``
    2, 1, 0 (:data:`MONAI_WEIGHT_TYPES`).
    """
    check_reduction(reduction)
    class_weight = vector_argument(class_weight)
    arguments = _arguments(predictions, weight_exponent, smooth_nr, smooth_dr, include_background)
    values, totals, _ = generalized_dice_statistics(
        predictions, targets, *split_weights(weights, predictions), *arguments,
        int_hyperparameter(ignore_index, predictions), class_weight, mode, batch, False,
    )
    reductions = generalized_dice_reductions(totals, *arguments, class_weight, batch)
    return select_reduction(values, reductions, reduction, predictions.dtype)


class GeneralizedDiceLoss(Loss):
    r"""Module form of :func:`generalized_dice_loss`; the Dice index of its per-class results in ``__constants__``."""

    __constants__ = ["overlap_scale", "alpha", "beta"]

    weight_exponent: float
    smooth_nr: float
    smooth_dr: float
    include_background: bool
    ignore_index: int
    mode: str
    batch: bool
    reduction: str

    def __init__(
        self, weight_exponent: float = 2.0, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
        include_background: bool = True, ignore_index: int = -100, class_weight: Optional[Tensor] = None,
        mode: str = "binary", batch: bool = False, reduction: str = "mean",
    ) -> None:
        super().__init__()
        for name in self.__constants__:
            setattr(self, name, DiceLoss.constants[name])
        self.weight_exponent = float(WEIGHT_EXPONENT_PARAM.validate(weight_exponent))
        set_region_settings(self, smooth_nr, smooth_dr, include_background, ignore_index, mode, batch, reduction)
        self.register_buffer("class_weight", vector_buffer(class_weight))

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        weight_exponent, smooth_nr, smooth_dr, include_background = _arguments(
            predictions, self.weight_exponent, self.smooth_nr, self.smooth_dr, self.include_background
        )
        pixel_weights, sample_weights = split_weights(weights, predictions)
        return generalized_dice_statistics(
            predictions, targets, pixel_weights, sample_weights, weight_exponent, smooth_nr, smooth_dr,
            include_background, int_hyperparameter(self.ignore_index, predictions), optional_vector(self.class_weight),
            self.mode, self.batch, per_sample, per_class,
        )

    def elementwise_totals(self) -> bool:
        return not self.batch

    @torch.jit.export
    def reductions(self, totals: Tensor) -> Tensor:
        weight_exponent, smooth_nr, smooth_dr, include_background = _arguments(
            totals, self.weight_exponent, self.smooth_nr, self.smooth_dr, self.include_background
        )
        return generalized_dice_reductions(
            totals, weight_exponent, smooth_nr, smooth_dr, include_background, optional_vector(self.class_weight),
            self.batch,
        )

    @torch.jit.export
    def class_reductions(self, class_totals: Tensor) -> Tensor:
        r"""Each class's Dice loss and score over the data: within one class the weights :math:`1/T^k` cancel
        (the smoothing terms aside), so a class's generalised Dice is its Dice, every class counted (the generalised
        Dice weighs absent classes itself)."""
        return region_class_reductions(
            class_totals, *index_arguments(
                class_totals, self.overlap_scale, self.alpha, self.beta, None, self.smooth_nr, self.smooth_dr, False,
                self.include_background, "count",
            ), optional_vector(self.class_weight), True,
        )


def generalized_dice_forms(settings: Dict[str, Any]) -> Forms:
    r"""The region losses' targets and totals; one value per sample, or one for the batch."""
    region = region_forms(settings)
    return Forms(
        region.targets, "1" if settings["batch"] else "N", totals=region.totals, class_totals=("overlap",),
        indices_with_channel=region.indices_with_channel, single_channel=region.single_channel,
    )


register(LossSpec(
    name="generalized_dice", family="region", kind="region",
    summary="generalised Dice loss on logits: classes weighted by 1/T² of their target volume (Sudre et al.)",
    module=GeneralizedDiceLoss, function=generalized_dice_loss,
    params=(
        WEIGHT_EXPONENT_PARAM, SMOOTH_NR_PARAM, SMOOTH_DR_PARAM, INCLUDE_BACKGROUND_PARAM, IGNORE_INDEX_PARAM,
        CLASS_WEIGHT_PARAM, MODE_PARAM, BATCH_PARAM, REDUCTION_PARAM,
    ),
    make_inputs=region_inputs, statistics_kernel=generalized_dice_statistics,
    reductions_kernel=generalized_dice_reductions, pixel_weights=True, forms=generalized_dice_forms,
    target_range=DENSE_TARGET_RANGE, variants=VARIANTS,
    reference="1 - (2 Σ_c w_c TP_c + smooth_nr) / (Σ_c w_c (P_c + T_c) + smooth_dr), w_c = 1/T_c^k; "
    "monai.losses.GeneralizedDiceLoss with sigmoid/softmax",
    test_params=(
        {}, {"mode": "multiclass", "include_background": False, "ignore_index": 255},
        {"mode": "multilabel", "weight_exponent": 1.0, "batch": True},
        {"mode": "multiclass", "weight_exponent": 0.0, "smooth_nr": 0.0, "smooth_dr": 0.0},
        {"batch": True, "ignore_index": 255, "smooth_nr": 1.0, "smooth_dr": 1.0},
        {"mode": "multiclass", "batch": True, "class_weight": torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)},
    ),
    paper="Sudre et al. 2017, Generalised Dice overlap as a deep learning loss function for highly unbalanced "
    "segmentations (DLMIA, arXiv:1707.03237)",
    notes="A class absent from the targets takes (for weight_exponent > 0) the largest finite class weight of its "
    "sample (of the data with batch), as MONAI; include_background=False gives channel 0 no weight.",
    **_SHAPES,
))

__all__ = [
    "GeneralizedDiceLoss", "MONAI_WEIGHT_TYPES", "generalized_dice_loss", "generalized_dice_statistics",
    "generalized_dice_reductions",
]
