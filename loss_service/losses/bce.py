r"""Binary cross-entropy on probabilities (``bce``) and on logits (``bce_with_logits``).

Their arguments follow docs/losses.md: predictions and targets of one shape ``(N, *)``, targets in
``[0, 1]``; ``weights`` ``(N,)`` per sample or broadcastable to the predictions; per-class vectors of
length ``C`` along ``class_dim``; ``mean`` divides by the element count (torch's ``weight`` semantics),
``weighted_mean`` by ``Σ w``.
"""
import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _autograd
from ._base import ElementwiseLoss
from ._params import (
    CLASS_DIM_PARAM, CLASS_WEIGHT_PARAM, IGNORED_IN_MEAN_PARAM, OPTIONAL_IGNORE_INDEX_PARAM, POS_WEIGHT_PARAM,
    REDUCTION_PARAM,
)
from ._params import LABEL_SMOOTHING_PARAM as CATEGORICAL_LABEL_SMOOTHING_PARAM
from ._registry import LossSpec, register
from ._stable import log_sigmoid
from ._reduction import (
    as_float, binary_kept, check_reduction, check_same_shape, class_setting, compute_dtype, effective_weight,
    float_hyperparameter, ignored_denominator, ignored_targets_zeroed, in_dtype, is_tracing,
    one_target_per_prediction_hint, optional_ignore_index, optional_vector, reduce_elementwise, smoothed_binary_targets,
    summed_statistics, sums_only, torch_reduction, unless_ignored, vector_argument, vector_buffer, weighted_statistics,
)

# Binary targets smoothed towards 1/2; segmentation_models_pytorch's smooth_factor s is label_smoothing 2s.
LABEL_SMOOTHING_PARAM = dataclasses.replace(
    CATEGORICAL_LABEL_SMOOTHING_PARAM,
    doc="targets t(1-ε) + ε/2 (torch's label smoothing of two outcomes; smp's smooth_factor s is ε = 2s)",
)


def _clamped_log(p: Tensor, complement: bool) -> Tensor:
    r"""``max(log p, -100)`` (or ``max(log(1 - p), -100)``) with a finite gradient everywhere."""
    if complement:
        inside = p < 1
        log = torch.log1p(-torch.where(inside, p, torch.zeros_like(p)))
    else:
        inside = p > 0
        log = torch.log(torch.where(inside, p, torch.ones_like(p)))
    return torch.where(inside, torch.clamp(log, min=-100.0), torch.full_like(log, -100.0))


def bce_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int,
    per_sample: bool, values: bool = True, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`binary_cross_entropy` (see :mod:`._reduction`). It writes its values whatever
    ``values`` says: its eager form is faster than torch's fused kernel."""
    check_same_shape(predictions, targets, class_dim, one_target_per_prediction_hint())
    dtype = compute_dtype(predictions.dtype)
    p = predictions.to(dtype)
    t = as_float(targets, dtype, "targets")
    if is_tracing():
        loss = _bce_terms(p, t)
    else:
        if p.numel() > 0:
            # One pass for the range check; a NaN propagates into the min and max.
            smallest, largest = torch.aminmax(p)
            if bool((smallest < 0) | (largest > 1) | torch.isnan(smallest) | torch.isnan(largest)):
                raise ValueError("bce: predictions must be probabilities in [0, 1]; use bce_with_logits for logits")
        # Contiguous: the result must not depend on the memory layout.
        if not (torch.is_grad_enabled() and (p.requires_grad or t.requires_grad)):
            loss = _autograd.bce_values(p.contiguous(), t.contiguous())
        elif t.requires_grad or torch.jit.is_scripting():
            loss = _bce_terms(p, t)
        else:
            loss = _autograd.binary_cross_entropy(p.contiguous(), t.contiguous())
    return weighted_statistics(loss, weights, class_weight, class_dim, dtype, per_sample, per_class)


def _bce_terms(p: Tensor, t: Tensor) -> Tensor:
    r"""``-[t max(log p, -100) + (1 - t) max(log(1 - p), -100)]``, with finite gradients at p in {0, 1}."""
    # torch clamps each log term at -100 so that p = 0 or 1 gives a finite loss; the log's
    # argument is kept positive too, else its backward would be 0 * inf = NaN there.
    log_p = _clamped_log(p, False)
    log_not_p = _clamped_log(p, True)
    return -(t * log_p + (1.0 - t) * log_not_p)


def binary_cross_entropy(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Binary cross-entropy between probabilities and (soft) targets.

    .. math::
        \ell_i = -w_i\,[\,t_i \max(\log p_i, -100) + (1 - t_i) \max(\log(1 - p_i), -100)\,]

    Predictions are probabilities in ``[0, 1]``. Equals :func:`torch.nn.functional.binary_cross_entropy`
    (``weight=weights``), including the log clamp at -100.
    """
    check_reduction(reduction)
    values, totals, _ = bce_statistics(
        predictions, targets, weights, vector_argument(class_weight), class_dim, False, reduction == "none"
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


def optional_smoothing(label_smoothing: float, predictions: Tensor) -> Optional[Tensor]:
    r"""The kernel's ``label_smoothing``: ``None`` for none, so that a call without smoothing builds and reads
    back no 0-d tensor (the exporter passes a tensor always: a graph input)."""
    if label_smoothing == 0.0:
        return None
    return float_hyperparameter(label_smoothing, predictions)


def bce_with_logits_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], pos_weight: Optional[Tensor],
    label_smoothing: Optional[Tensor], ignore_index: Optional[Tensor], ignored_in_mean: Optional[Tensor],
    class_weight: Optional[Tensor], class_dim: int, per_sample: bool, values: bool = True, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`binary_cross_entropy_with_logits`; for the totals alone
    (:func:`sums_only`) torch's fused kernel sums the weighted loss. ``ignore_index`` ``None``: nothing is
    ignored and no mask is built (:func:`~._reduction.binary_kept`)."""
    x, t, kept, positive_weight, dtype = _logits_and_targets(
        predictions, targets, pos_weight, label_smoothing, ignore_index, class_dim
    )
    if is_tracing():
        # -log σ(x) = softplus(-x) and -log σ(-x) = softplus(-x) + x: one stable log-sigmoid
        # (log_sigmoid, which the ONNX exporter cannot turn into Log(Sigmoid)).
        log_sigmoid_x = log_sigmoid(x)
        positive_scale = t if positive_weight is None else positive_weight * t
        loss = (1.0 - t) * x - (positive_scale + 1.0 - t) * log_sigmoid_x
    elif sums_only(values, per_sample or per_class):
        shape = list(x.shape)
        weight = effective_weight(shape, weights, class_weight, class_dim, dtype)
        denominator: Optional[Tensor] = None
        if kept is not None:
            keep = kept.to(dtype)
            weight = keep if weight is None else weight * keep
            denominator = ignored_denominator(keep, ignored_in_mean)
        loss_sum = F.binary_cross_entropy_with_logits(
            x.contiguous(), t.contiguous(), weight, reduction="sum", pos_weight=positive_weight
        )
        return summed_statistics(loss_sum, weight, denominator, shape)
    else:
        loss = _fused_bce_with_logits(x, t, positive_weight)
    return weighted_statistics(
        loss, weights, class_weight, class_dim, dtype, per_sample, per_class, kept, ignored_in_mean
    )


def _logits_and_targets(
    predictions: Tensor, targets: Tensor, pos_weight: Optional[Tensor], label_smoothing: Optional[Tensor],
    ignore_index: Optional[Tensor], class_dim: int,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], torch.dtype]:
    r"""``(x, t, kept, positive_weight, dtype)`` of :func:`bce_with_logits_statistics`: the logits (0 where ignored)
    and the targets (0 where ignored, then smoothed) in the compute ``dtype``, :func:`~._reduction.binary_kept`, and
    ``pos_weight`` shaped along ``class_dim``."""
    check_same_shape(predictions, targets, class_dim, one_target_per_prediction_hint())
    dtype = compute_dtype(predictions.dtype)
    t = as_float(targets, dtype, "targets")
    kept = binary_kept(t, ignore_index)
    x = unless_ignored(in_dtype(predictions, dtype), kept)
    t = smoothed_binary_targets(ignored_targets_zeroed(t, kept), label_smoothing)
    positive_weight: Optional[Tensor] = None
    if pos_weight is not None:
        positive_weight = class_setting(in_dtype(pos_weight, dtype), list(x.shape), class_dim, "pos_weight")
    return x, t, kept, positive_weight, dtype


def fused_bce_with_logits(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], pos_weight: Optional[Tensor],
    label_smoothing: Optional[Tensor], ignore_index: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int,
    reduction: str,
) -> Optional[Tensor]:
    r"""``Loss.fused_reduction`` of :func:`binary_cross_entropy_with_logits`: torch's fused loss with its own
    reduction (:func:`~._reduction.torch_reduction`; ``mean`` divides by the element count there as here,
    ``weight`` being the effective weight), on contiguous inputs; ``None`` with ``ignore_index``, for
    ``weighted_mean`` of a weighted loss, and for the mean of no elements."""
    how = torch_reduction(reduction, weights is None and class_weight is None, predictions.numel())
    if how == "" or ignore_index is not None:
        return None
    x, t, _, positive_weight, dtype = _logits_and_targets(
        predictions, targets, pos_weight, label_smoothing, None, class_dim
    )
    weight = effective_weight(list(x.shape), weights, class_weight, class_dim, dtype)
    loss = F.binary_cross_entropy_with_logits(
        x.contiguous(), t.contiguous(), weight, reduction=how, pos_weight=positive_weight
    )
    return in_dtype(loss, predictions.dtype)


def _fused_bce_with_logits(x: Tensor, t: Tensor, positive_weight: Optional[Tensor]) -> Tensor:
    r"""The export form's :math:`(1 - t)\,x - (p_c t + 1 - t)\log\sigma(x)` in 4-5 full-size passes.

    torch's fused ``logsigmoid`` (stable in eager and TorchScript) replaces the 6-op export form,
    and the products are accumulated in place into this function's own temporaries.
    """
    # Contiguous inputs: the vectorised and strided kernels of logsigmoid may differ in the last
    # bit, and the result must not depend on the memory layout.
    x = x.contiguous()
    t = t.contiguous()
    log_sigmoid_x = F.logsigmoid(x)
    one_minus_t = 1.0 - t
    if positive_weight is None:
        return one_minus_t.mul_(x).sub_(log_sigmoid_x)
    scale = torch.addcmul(one_minus_t, positive_weight, t)
    return one_minus_t.mul_(x).addcmul_(scale, log_sigmoid_x, value=-1.0)


def binary_cross_entropy_with_logits(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, pos_weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0, ignore_index: Optional[int] = None, ignored_in_mean: bool = False,
    class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Binary cross-entropy on logits, stable for any finite logit.

    .. math::
        \ell_i = -w_i\,[\,p_c\, t_i \log\sigma(x_i) + (1 - t_i)\log\sigma(-x_i)\,]
               = w_i\,[\,(1 - t_i)\,x_i - (p_c t_i + 1 - t_i)\log\sigma(x_i)\,]

    with :math:`p_c` the ``pos_weight`` (weight of positive examples) of the element's class and ``log σ``
    computed stably (never ``log(sigmoid(x))``, which is ``-inf`` for ``x = -1e4``). Equals
    :func:`torch.nn.functional.binary_cross_entropy_with_logits` (``weight=weights``; a length-``C``
    ``pos_weight`` there broadcasts along the last dim, here along ``class_dim``). ``label_smoothing`` ε
    replaces the targets by :math:`t_i (1 - \varepsilon) + \varepsilon / 2` first (torch's label smoothing of
    two outcomes; segmentation_models_pytorch's ``SoftBCEWithLogitsLoss(smooth_factor=s)`` is ``ε = 2s``).
    Elements whose target is ``ignore_index`` get weight 0 (their logit is not read: NaN there is harmless) and
    count in ``mean``'s denominator only with ``ignored_in_mean`` (the mean of segmentation_models_pytorch's
    ``SoftBCEWithLogitsLoss(ignore_index=...)``).
    """
    class_weight = vector_argument(class_weight)
    pos_weight = vector_argument(pos_weight)
    check_reduction(reduction)
    smoothing = optional_smoothing(label_smoothing, predictions)
    ignored, ignored_in_mean_tensor = optional_ignore_index(ignore_index, ignored_in_mean, predictions)
    fused = fused_bce_with_logits(
        predictions, targets, weights, pos_weight, smoothing, ignored, class_weight, class_dim, reduction
    )
    if fused is not None:
        return fused
    values, totals, _ = bce_with_logits_statistics(
        predictions, targets, weights, pos_weight, smoothing, ignored, ignored_in_mean_tensor, class_weight, class_dim,
        False, reduction == "none",
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


class BCELoss(ElementwiseLoss):
    r"""Module form of :func:`binary_cross_entropy`; ``class_weight`` is a buffer."""

    kernel = staticmethod(bce_statistics)


class BCEWithLogitsLoss(ElementwiseLoss):
    r"""Module form of :func:`binary_cross_entropy_with_logits`; tensor settings are buffers."""

    label_smoothing: float
    ignore_index: Optional[int]
    ignored_in_mean: bool

    def __init__(
        self, pos_weight: Optional[Tensor] = None, label_smoothing: float = 0.0, ignore_index: Optional[int] = None,
        ignored_in_mean: bool = False, class_weight: Optional[Tensor] = None, reduction: str = "mean",
        class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.register_buffer("pos_weight", vector_buffer(pos_weight))
        self.label_smoothing = float(LABEL_SMOOTHING_PARAM.validate(label_smoothing))
        self.ignore_index = OPTIONAL_IGNORE_INDEX_PARAM.validate(ignore_index)
        self.ignored_in_mean = bool(ignored_in_mean)

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        ignore_index, ignored_in_mean = optional_ignore_index(self.ignore_index, self.ignored_in_mean, predictions)
        return bce_with_logits_statistics(
            predictions, targets, weights, optional_vector(self.pos_weight),
            optional_smoothing(self.label_smoothing, predictions), ignore_index, ignored_in_mean,
            optional_vector(self.class_weight), self.class_dim, per_sample, values, per_class,
        )

    def fused_reduction(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
        if self.ignore_index is not None:
            return None
        return fused_bce_with_logits(
            predictions, targets, weights, optional_vector(self.pos_weight),
            optional_smoothing(self.label_smoothing, predictions), None, optional_vector(self.class_weight),
            self.class_dim, self.reduction,
        )


def binary_inputs(
    batch: int, num_classes: int, spatial: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
    params: Dict[str, Any], probabilities: bool = False,
) -> Tuple[Tensor, Tensor]:
    r"""Random logits (or their sigmoid, ``probabilities``) ``(N, C, *)`` and binary masks, 30% positive; about
    15% of the targets are ``ignore_index`` when the parameters set one."""
    shape = (batch, num_classes) + tuple(spatial)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    targets = (torch.rand(shape, generator=generator, dtype=torch.float64) < 0.3).to(dtype)
    if params.get("ignore_index") is not None:
        ignored = torch.rand(shape, generator=generator) < 0.15
        targets = torch.where(ignored, torch.full_like(targets, params["ignore_index"]), targets)
    predictions = torch.sigmoid(logits) if probabilities else logits
    return predictions.to(dtype), targets


register(LossSpec(
    name="bce", family="bce", summary="binary cross-entropy on probabilities", module=BCELoss,
    function=binary_cross_entropy, predictions="probabilities", targets="probabilities", prediction_shape="(N, *)",
    target_shape="same as predictions", params=(CLASS_WEIGHT_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM),
    make_inputs=functools.partial(binary_inputs, probabilities=True), statistics_kernel=bce_statistics,
    reference="torch.nn.functional.binary_cross_entropy, including its log clamp at -100",
    logits_alternative="bce_with_logits", test_params=({}, {"class_weight": torch.tensor([0.5, 2.0, 1.0])}),
))

register(LossSpec(
    name="bce_with_logits", family="bce", summary="binary cross-entropy on logits with pos_weight",
    module=BCEWithLogitsLoss, function=binary_cross_entropy_with_logits, predictions="logits",
    targets="probabilities", prediction_shape="(N, *)", target_shape="same as predictions",
    params=(
        POS_WEIGHT_PARAM, LABEL_SMOOTHING_PARAM, OPTIONAL_IGNORE_INDEX_PARAM, IGNORED_IN_MEAN_PARAM, CLASS_WEIGHT_PARAM,
        REDUCTION_PARAM, CLASS_DIM_PARAM,
    ),
    make_inputs=binary_inputs, statistics_kernel=bce_with_logits_statistics,
    reference="torch.nn.functional.binary_cross_entropy_with_logits",
    test_params=(
        {}, {"pos_weight": torch.tensor([3.0, 0.5, 1.0])},
        {"pos_weight": torch.tensor([2.0, 1.0, 0.25]), "class_weight": torch.tensor([1.0, 0.0, 4.0])},
        {"label_smoothing": 0.2, "pos_weight": torch.tensor([2.0, 1.0, 0.5])},
        {"ignore_index": 255, "pos_weight": torch.tensor([2.0, 1.0, 0.5])},
        {"ignore_index": -100, "ignored_in_mean": True, "label_smoothing": 0.2},
    ),
))

__all__ = [
    "BCELoss", "BCEWithLogitsLoss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "bce_statistics",
    "bce_with_logits_statistics",
]
