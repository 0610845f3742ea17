r"""Combinations of losses: ``bce_dice`` = ``bce_weight``·BCE-with-logits + ``dice_weight``·Dice.

The combination is additive in its statistics: its totals are the BCE totals (4) followed by the
Dice totals, and each reduction column is ``bce_weight·bce + dice_weight·dice``, so batches sum and
per-sample values come out exactly as for the two losses on their own.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._registry import LossSpec, ParamSpec, get, register
from ._reduction import (
    accumulate, bool_hyperparameter, check_same_shape, elementwise_reductions, host_reductions, host_tensor,
    host_totals, int_hyperparameter, is_tracing, one_target_per_prediction_hint, optional_vector, sums_only,
    totals_alone, vector_argument, vector_buffer,
)
from .bce import bce_with_logits_statistics
from .region import (
    DENSE_TARGET_RANGE, DiceLoss, Forms, RegionLoss, _constant, _float64, _region_loss, _weights3,
    check_split_weights, dense_sums, masked_pixel_weight, overlap_statistics, prepare, region_class_reductions,
    region_inputs, region_reductions, split_weights,
)

_BCE = get("bce_with_logits")
_DICE = get("dice")

# One set of defaults: every parameter is the registered bce_with_logits / dice ParamSpec, with
# only the documentation (and the modes BCE is meaningful for) adapted.
POS_WEIGHT_PARAM = dataclasses.replace(
    _BCE.param("pos_weight"), doc="BCE weight of positive examples per class (length C, 1 in binary mode)"
)
CLASS_WEIGHT_PARAM = dataclasses.replace(
    _DICE.param("class_weight"),
    doc="per-class weight (length C, 1 in binary mode) of both the BCE elements and the Dice losses",
)
MODE_PARAM = dataclasses.replace(
    _DICE.param("mode"), choices=("binary", "multilabel"),
    doc="binary: one foreground channel (predictions (N, 1, *) or (N, *)); multilabel: one sigmoid per channel (N, C, *)",
)
BCE_WEIGHT_PARAM = ParamSpec("bce_weight", "float", 1.0, "weight of the BCE-with-logits term", low=0.0)
DICE_WEIGHT_PARAM = ParamSpec("dice_weight", "float", 1.0, "weight of the Dice term", low=0.0)
_DICE_SHARED = ("smooth_nr", "smooth_dr", "include_background", "squared_pred", "log_loss", "ignore_index")
BCE_DICE_PARAMS: Tuple[ParamSpec, ...] = (
    (POS_WEIGHT_PARAM, CLASS_WEIGHT_PARAM, BCE_WEIGHT_PARAM, DICE_WEIGHT_PARAM)
    + tuple(_DICE.param(name) for name in _DICE_SHARED)
    + (MODE_PARAM, _DICE.param("batch"), _DICE.param("absent_classes"), _DICE.param("reduction"))
)
_DEFAULTS: Dict[str, Any] = {p.name: p.default for p in BCE_DICE_PARAMS}


def bce_dice_reductions(
    totals: Tensor, bce_weight: Tensor, dice_weight: Tensor, overlap_scale: Tensor, alpha: Tensor, beta: Tensor,
    gamma: Optional[Tensor], smooth_nr: Tensor, smooth_dr: Tensor, log_loss: Tensor, include_background: Tensor,
    absent_classes: Optional[Tensor], class_weight: Optional[Tensor], batch: bool,
) -> Tensor:
    r"""``(..., 4 + K)`` totals to ``(..., 3)``: ``bce_weight·bce + dice_weight·dice`` per column."""
    if not batch and not is_tracing() and host_totals(totals):
        # Both terms elementwise: one read of one call's totals, the same float64 arithmetic on the host.
        sums: List[float] = totals.tolist()
        bce_weight_value, dice_weight_value = float(bce_weight), float(dice_weight)
        return host_tensor(
            [bce_weight_value * bce + dice_weight_value * dice
             for bce, dice in zip(host_reductions(sums[:4]), host_reductions(sums[4:]))],
            totals.device,
        )
    bce = elementwise_reductions(totals[..., :4])
    dice = region_reductions(
        totals[..., 4:], overlap_scale, alpha, beta, gamma, smooth_nr, smooth_dr, log_loss, include_background,
        absent_classes, class_weight, batch,
    )
    return _float64(bce_weight) * bce + _float64(dice_weight) * dice


def bce_dice_class_reductions(
    class_totals: Tensor, bce_weight: Tensor, dice_weight: Tensor, overlap_scale: Tensor, alpha: Tensor, beta: Tensor,
    gamma: Optional[Tensor], smooth_nr: Tensor, smooth_dr: Tensor, log_loss: Tensor, include_background: Tensor,
    absent_classes: Optional[Tensor], class_weight: Optional[Tensor], batch: bool,
) -> Tensor:
    r"""``(C, 4 + K_c)`` class totals to ``(C, 4)``: ``bce_weight·bce + dice_weight·dice`` per column, and the
    class's Dice score."""
    bce = elementwise_reductions(class_totals[:, :4])
    dice = region_class_reductions(
        class_totals[:, 4:], overlap_scale, alpha, beta, gamma, smooth_nr, smooth_dr, log_loss, include_background,
        absent_classes, class_weight, batch,
    )
    combined = _float64(bce_weight) * bce + _float64(dice_weight) * dice[:, :3]
    return torch.cat([combined, dice[:, 3:]], dim=1)


def bce_dice_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], sample_weights: Optional[Tensor],
    pos_weight: Optional[Tensor], bce_weight: Tensor, dice_weight: Tensor, overlap_scale: Tensor, alpha: Tensor,
    beta: Tensor, gamma: Optional[Tensor], smooth_nr: Tensor, smooth_dr: Tensor, log_loss: Tensor,
    include_background: Tensor, absent_classes: Optional[Tensor], squared_pred: Tensor, ignore_index: Tensor,
    class_weight: Optional[Tensor], mode: str, batch: bool, per_sample: bool, values: bool = True,
    per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`bce_dice_loss`, with pixel ``weights`` and ``(N,)``
    ``sample_weights`` as separate arguments (as :func:`~loss_service.losses.region.region_statistics`).

    ``values`` are per sample, ``(N,)``: the combined loss of each sample alone under the ``mean``
    rule (what ``reduction="none"`` returns); for the totals alone (:func:`~._reduction.sums_only`) neither
    term is summed per sample, and the BCE term is torch's fused sum. The BCE term is elementwise, so both
    kinds of weight simply multiply each element's weight (:math:`s_n\,w_{nci}`); the Dice term gets them as
    the region kernel does. The class totals of ``per_class`` are the BCE term's (its channels) followed by the
    Dice term's.
    """
    if mode not in ["binary", "multilabel"]:
        raise ValueError("bce_dice: mode must be 'binary' or 'multilabel', got '{}'".format(mode))
    # Checked before the Dice kernel does, whose hint would point at a multiclass mode bce_dice lacks.
    check_same_shape(predictions, targets, 1, one_target_per_prediction_hint())
    index = (overlap_scale, alpha, beta, gamma, smooth_nr, smooth_dr, log_loss, include_background, absent_classes)
    check_split_weights(weights, sample_weights, predictions)
    # One view of the inputs for both terms: the Dice sums and the BCE's weights (pixel weights times
    # the not-ignored mask, and the sample weights).
    logits, probabilities, dense, keep = prepare(predictions, targets, ignore_index, mode)
    pixel_weight = masked_pixel_weight(keep, weights, predictions, mode)
    sums = dense_sums(probabilities, dense, pixel_weight, squared_pred)
    by_sample = not sums_only(values, per_sample or per_class)
    _, dice_totals, dice_sample_totals = overlap_statistics(
        sums, sample_weights, *index, class_weight, batch, by_sample
    )
    batch_size = probabilities.shape[0]
    bce_weights = pixel_weight
    if sample_weights is not None:
        sample_scale = sample_weights.to(probabilities.dtype).reshape(batch_size, 1, 1)
        bce_weights = sample_scale if bce_weights is None else bce_weights * sample_scale
    _, bce_totals, bce_sample_totals = bce_with_logits_statistics(
        logits, dense, bce_weights, pos_weight, None, None, None, class_weight, 1, by_sample, by_sample
    )
    if keep is not None:
        # Ignored positions have weight 0 and, as for every loss here, do not count in `mean`'s
        # denominator: column 2 becomes the number of positions that are not ignored.
        counted = accumulate(keep.expand(probabilities.shape), [1, 2])
        if by_sample:
            bce_sample_totals = _with_denominator(bce_sample_totals, counted)
        bce_totals = _with_denominator(bce_totals.unsqueeze(0), counted.sum().reshape(1)).squeeze(0)
    totals = torch.cat([bce_totals, dice_totals])
    if not by_sample:
        return totals_alone(totals, totals)
    sample_totals = torch.cat([bce_sample_totals, dice_sample_totals], dim=1)
    values = bce_dice_reductions(sample_totals, bce_weight, dice_weight, *index, class_weight, batch)[:, 1]
    if per_class:
        # The terms' class totals: the BCE kernel once more (an evaluation's extra pass), the Dice term from its sums.
        _, _, bce_class_totals = bce_with_logits_statistics(
            logits, dense, bce_weights, pos_weight, None, None, None, class_weight, 1, False, True, True
        )
        if keep is not None:
            bce_class_totals = _with_denominator(bce_class_totals, accumulate(keep.expand(probabilities.shape), [0, 2]))
        _, _, dice_class_totals = overlap_statistics(
            sums, sample_weights, *index, class_weight, batch, False, True
        )
        return values, totals, torch.cat([bce_class_totals, dice_class_totals], dim=1)
    if not per_sample:
        sample_totals = sample_totals[:0]
    return values, totals, sample_totals


def _with_denominator(elementwise_totals: Tensor, denominators: Tensor) -> Tensor:
    r"""``(M, 4)`` elementwise totals with column 2 (``Σ d``) replaced by ``denominators`` ``(M,)``."""
    return torch.cat(
        [elementwise_totals[:, :2], denominators.unsqueeze(1), elementwise_totals[:, 3:]], dim=1
    )


def bce_dice_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None,
    pos_weight: Optional[Tensor] = _DEFAULTS["pos_weight"], class_weight: Optional[Tensor] = _DEFAULTS["class_weight"],
    bce_weight: float = _DEFAULTS["bce_weight"], dice_weight: float = _DEFAULTS["dice_weight"],
    smooth_nr: float = _DEFAULTS["smooth_nr"], smooth_dr: float = _DEFAULTS["smooth_dr"],
    include_background: bool = _DEFAULTS["include_background"], squared_pred: bool = _DEFAULTS["squared_pred"],
    log_loss: bool = _DEFAULTS["log_loss"], ignore_index: int = _DEFAULTS["ignore_index"],
    mode: str = _DEFAULTS["mode"], batch: bool = _DEFAULTS["batch"],
    absent_classes: str = _DEFAULTS["absent_classes"], reduction: str = _DEFAULTS["reduction"],
) -> Tensor:
    r"""``bce_weight`` · BCE-with-logits + ``dice_weight`` · soft Dice, on the same logits.

    .. math::
        L = \lambda_{bce}\,\mathrm{BCE}(x, t) + \lambda_{dice}\,\mathrm{Dice}(\sigma(x), t)

    Each term is reduced by its own rule (:func:`~loss_service.losses.bce.binary_cross_entropy_with_logits`,
    :func:`~loss_service.losses.region.dice_loss`), for every reduction: with the defaults this is exactly
    ``bce_with_logits`` + binary ``dice``. Inputs, ``weights`` and ``class_weight`` serve both terms as
    :func:`~loss_service.losses.region.dice_loss` reads them (``ignore_index``: weight 0, not counted in BCE's
    ``mean``); ``pos_weight`` is BCE's, the other settings are Dice's (``include_background`` does not change
    the BCE term, as in MONAI's ``DiceCELoss``). ``none`` returns ``(N,)``, each sample's loss alone.
    """
    term_weights = (_constant(bce_weight, predictions), _constant(dice_weight, predictions))
    return _region_loss(
        predictions, targets, weights, DiceLoss.constants, smooth_nr, smooth_dr, include_background, squared_pred,
        log_loss, ignore_index, class_weight, mode, batch, absent_classes, reduction, bce_dice_statistics,
        bce_dice_reductions,
        (vector_argument(pos_weight),) + term_weights, term_weights,
    )


class BCEDiceLoss(RegionLoss):
    r"""Module form of :func:`bce_dice_loss`; ``pos_weight`` and ``class_weight`` are buffers."""

    constants = DiceLoss.constants
    bce_weight: float
    dice_weight: float

    def __init__(
        self, pos_weight: Optional[Tensor] = _DEFAULTS["pos_weight"],
        class_weight: Optional[Tensor] = _DEFAULTS["class_weight"], bce_weight: float = _DEFAULTS["bce_weight"],
        dice_weight: float = _DEFAULTS["dice_weight"], smooth_nr: float = _DEFAULTS["smooth_nr"],
        smooth_dr: float = _DEFAULTS["smooth_dr"], include_background: bool = _DEFAULTS["include_background"],
        squared_pred: bool = _DEFAULTS["squared_pred"], log_loss: bool = _DEFAULTS["log_loss"],
        ignore_index: int = _DEFAULTS["ignore_index"], mode: str = _DEFAULTS["mode"], batch: bool = _DEFAULTS["batch"],
        absent_classes: str = _DEFAULTS["absent_classes"], reduction: str = _DEFAULTS["reduction"],
    ) -> None:
        if mode not in MODE_PARAM.choices:
            raise ValueError("bce_dice: mode must be 'binary' or 'multilabel', got {!r}".format(mode))
        super().__init__(
            smooth_nr, smooth_dr, include_background, squared_pred, log_loss, ignore_index, class_weight, mode, batch,
            absent_classes, reduction,
        )
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.register_buffer("pos_weight", vector_buffer(pos_weight))

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return bce_dice_statistics(
            predictions, targets, *split_weights(weights, predictions), optional_vector(self.pos_weight),
            _constant(self.bce_weight, predictions), _constant(self.dice_weight, predictions),
            *self.index_arguments(predictions), bool_hyperparameter(self.squared_pred, predictions),
            int_hyperparameter(self.ignore_index, predictions), optional_vector(self.class_weight), self.mode,
            self.batch, per_sample, values, per_class,
        )

    def elementwise_totals(self) -> bool:
        r"""The BCE term's totals and the Dice term's: two blocks, reduced apart."""
        return False

    @torch.jit.export
    def reductions(self, totals: Tensor) -> Tensor:
        return bce_dice_reductions(
            totals, _constant(self.bce_weight, totals), _constant(self.dice_weight, totals),
            *self.index_arguments(totals), optional_vector(self.class_weight), self.batch,
        )

    @torch.jit.export
    def class_reductions(self, class_totals: Tensor) -> Tensor:
        return bce_dice_class_reductions(
            class_totals, _constant(self.bce_weight, class_totals), _constant(self.dice_weight, class_totals),
            *self.index_arguments(class_totals), optional_vector(self.class_weight), self.batch,
        )


register(LossSpec(
    name="bce_dice", family="combo", target_range=DENSE_TARGET_RANGE,
    summary="bce_weight · BCE-with-logits + dice_weight · soft Dice (binary, multilabel)", module=BCEDiceLoss,
    function=bce_dice_loss, predictions="logits", targets="probabilities",
    prediction_shape="binary: (N, 1, *) or (N, *); multilabel: (N, C, *)",
    target_shape="same as predictions, values in [0, 1] or ignore_index", params=BCE_DICE_PARAMS,
    make_inputs=region_inputs, statistics_kernel=bce_dice_statistics, reductions_kernel=bce_dice_reductions,
    constants=BCEDiceLoss.constants, pixel_weights=True,
    forms=lambda settings: Forms(
        ("dense",), "N", totals=("bce:elementwise", "dice:overlap" if settings["batch"] else "dice:elementwise"),
        class_totals=("bce:elementwise",)
        + (("dice:overlap",) if settings["batch"] else ("dice:elementwise", "dice:overlap")),
        single_channel=settings["mode"] == "binary",
    ),
    reference="bce_weight · F.binary_cross_entropy_with_logits + dice_weight · dice, each reduced by its own rule",
    test_params=(
        {},
        {"mode": "multilabel", "pos_weight": _weights3(2.0, 1.0, 0.5), "class_weight": _weights3(1.0, 0.5, 2.0),
         "bce_weight": 0.5, "dice_weight": 2.0, "ignore_index": 255},
        {"mode": "multilabel", "batch": True, "include_background": False, "squared_pred": True,
         "log_loss": True},
        {"batch": True, "ignore_index": 255, "smooth_nr": 0.0, "smooth_dr": 0.0, "dice_weight": 0.25},
        {"mode": "multilabel", "absent_classes": "zero", "class_weight": _weights3(1.0, 0.5, 2.0)},
    ),
    variants=({}, {"mode": "multilabel"}, {"batch": True}, {"mode": "multilabel", "batch": True}), kind="region",
    paper="Combination used by e.g. Isensee et al. 2021, nnU-Net (Nature Methods), with CE in place of BCE",
    notes="totals = bce_with_logits totals (4) followed by dice totals; include_background affects the Dice term only",
))

__all__ = [
    "BCEDiceLoss", "bce_dice_loss", "bce_dice_statistics", "bce_dice_reductions", "bce_dice_class_reductions",
    "BCE_DICE_PARAMS",
]
