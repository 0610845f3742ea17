r"""Region (overlap) losses on logits: soft Dice, IoU (Jaccard), Tversky and focal Tversky (docs/losses/region.md).

All four are one kernel family. Per sample ``n`` and class ``c`` the kernel accumulates, over the
spatial positions ``i`` and in float64,

.. math::
    TP_{nc} = \sum_i w_{nci}\,p_{nci}\,t_{nci},\qquad
    P_{nc} = \sum_i w_{nci}\,p_{nci}^{(2)},\qquad
    T_{nc} = \sum_i w_{nci}\,t_{nci}^{(2)}

(the squares only with ``squared_pred``), with ``FP = P - TP`` and ``FN = T - TP``. A loss is an
*overlap index* of these statistics,

.. math::
    I = \frac{k\,TP + s_{nr}}{k\,(TP + \alpha\,FP + \beta\,FN) + s_{dr}}

(Dice: ``k = 2, α = β = 1/2``, ``(2TP + s_nr) / (P + T + s_dr)``; IoU: ``k = 1, α = β = 1``; Tversky:
``k = 1`` with the user's ``α``, ``β``), as ``1 - I`` (``-log I`` with ``log_loss``), and ``max(·, 0)^γ`` of
that for focal Tversky.

``batch=False``: one index per ``(n, c)``, and the totals are the elementwise ``[Σ w·ℓ, Σ w, Σ d, n]`` of
that ``(N, C)`` loss matrix. ``batch=True``: the sums also run over the batch, and the totals
``[TP_c…, P_c…, T_c…]`` (length ``3C``) become per-class losses in the reductions kernel. Both are additive
over batches. ``(N,)`` call-time weights are per-sample weights :math:`s_n` (of the ``(n, c)`` losses, or
scaling sample ``n``'s sums with ``batch``), any other shape pixel weights :math:`w_{nci}`;
:func:`split_weights` tells them apart for :func:`region_statistics`, which takes both.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _autograd
from ._base import Loss
from ._params import CLASS_WEIGHT_PARAM as SHARED_CLASS_WEIGHT_PARAM
from ._params import IGNORE_INDEX_PARAM, REDUCTION_PARAM
from ._registry import Forms, LossSpec, ParamSpec, register
from ._reduction import (
    accumulate, as_float, bool_hyperparameter, broadcastable, check_real, check_reduction, check_same_shape,
    compute_dtype, elementwise_reductions, elementwise_statistics, float_hyperparameter, hyperparameter_in, in_dtype,
    int_hyperparameter, is_tracing, multiclass_mode_hint, optional_vector, safe_divide, sample_or_element_weights,
    select_reduction, unless_ignored, vector_argument, vector_buffer,
)

MODES = ("binary", "multilabel", "multiclass")

MODE_PARAM = ParamSpec(
    "mode", "str", "binary",
    "binary: sigmoid, one foreground channel (predictions (N, 1, *) or (N, *)); multilabel: sigmoid per "
    "channel (N, C, *); multiclass: softmax over dim 1 with class-index targets (N, *) or (N, 1, *), or "
    "class probabilities of the predictions' shape",
    choices=MODES, graph_input=False,
)
SMOOTH_NR_PARAM = ParamSpec("smooth_nr", "float", 1e-5, "added to the index's numerator", low=0.0)
SMOOTH_DR_PARAM = ParamSpec("smooth_dr", "float", 1e-5, "added to the index's denominator", low=0.0)
BATCH_PARAM = ParamSpec(
    "batch", "bool", False,
    "sum the statistics over the batch before the index (one loss per class) instead of one loss per (sample, class)",
    graph_input=False,
)
INCLUDE_BACKGROUND_PARAM = ParamSpec(
    "include_background", "bool", True,
    "keep channel 0; False drops it (multilabel/multiclass with C > 1; no-op for a single channel)",
)
SQUARED_PRED_PARAM = ParamSpec(
    "squared_pred", "bool", False, "use Σ w·p² and Σ w·t² in place of Σ w·p and Σ w·t (V-Net's denominator)"
)
LOG_LOSS_PARAM = ParamSpec("log_loss", "bool", False, "loss -log(index) (index clamped at 1e-7) instead of 1 - index")
# How the losses of classes absent from the targets (T = 0) count, in the order of their graph-input codes.
ABSENT_CLASSES = ("count", "zero", "skip")
ABSENT_CLASSES_PARAM = ParamSpec(
    "absent_classes", "str", "count",
    "classes absent from a sample's targets (T = 0; with batch, from the data's): count -- as every class (MONAI); "
    "zero -- their loss is 0, still counted in mean (segmentation_models_pytorch); skip -- each sample's loss is the "
    "class-weighted average over its present classes, the loss of a zero index without any (kornia's macro Dice)",
    choices=ABSENT_CLASSES,
)
# Binary masks, multilabel masks and class probabilities (what prepare checks).
DENSE_TARGET_RANGE = (0.0, 1.0)
CLASS_WEIGHT_PARAM = dataclasses.replace(
    SHARED_CLASS_WEIGHT_PARAM,
    doc="weight of each class's loss, length C (1 in binary mode); entry 0 is unused when the background is dropped",
)
ALPHA_PARAM = ParamSpec("alpha", "float", 0.5, "Tversky weight of false positives", low=0.0)
BETA_PARAM = ParamSpec("beta", "float", 0.5, "Tversky weight of false negatives", low=0.0)
# Abraham & Khan's recommended setting: α = 0.3 on false positives, β = 0.7 on false negatives
# (their Eq. 3 names them the other way round) and exponent 1/γ = 1/(4/3) = 0.75.
FOCAL_ALPHA_PARAM = dataclasses.replace(ALPHA_PARAM, default=0.3)
FOCAL_BETA_PARAM = dataclasses.replace(BETA_PARAM, default=0.7)
GAMMA_PARAM = ParamSpec(
    "gamma", "float", 0.75,
    "exponent applied to the Tversky loss: (1 - TI)^gamma (Abraham & Khan's 1/γ; their γ = 4/3 is gamma = 0.75)",
    low=0.0, low_inclusive=False,
)


def _flatten_spatial(x: Tensor, class_channel: bool) -> Tensor:
    r"""``(N, C, *) -> (N, C, S)`` (or ``(N, *) -> (N, 1, S)`` for a tensor without class channel)."""
    if not class_channel:
        if x.dim() == 1:
            return x.reshape(x.shape[0], 1, 1)
        return x.flatten(1).unsqueeze(1)
    if x.dim() == 2:
        return x.unsqueeze(2)
    return x.flatten(2)


def prepare(
    predictions: Tensor, targets: Tensor, ignore_index: Tensor, mode: str
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    r"""Logits, probabilities, dense targets and the not-ignored mask, each ``(N, C, S)`` (mask may be
    ``(N, 1, S)``; ``None`` outside tracing when no target is ignored). binary: every non-batch dimension is
    spatial, ``C = 1``. multiclass: targets of the predictions' shape are class probabilities, others class
    indices (the shape decides, as in the ONNX layout). The logits of ignored positions are 0
    (:func:`~._reduction.unless_ignored`)."""
    if mode not in ["binary", "multilabel", "multiclass"]:
        raise ValueError("mode must be one of 'binary', 'multilabel', 'multiclass', got '{}'".format(mode))
    if predictions.dim() == 0:
        raise ValueError("predictions must have a batch dimension: expected (N, *) logits, got a scalar")
    dtype = compute_dtype(predictions.dtype)
    # One memory layout for the sums: a strided view gives bit-identical results to its copy.
    x = in_dtype(predictions, dtype).contiguous()
    targets = targets.contiguous()
    if mode == "multiclass":
        if x.dim() < 2:
            raise ValueError(
                "multiclass predictions must be (N, C, *) logits, got shape {}".format(list(predictions.shape))
            )
        if targets.shape != predictions.shape:
            return prepare_class_indices(x, predictions, targets, ignore_index)
        # Class probabilities (soft labels, label smoothing, one-hot masks): a position whose
        # target equals ignore_index in any channel is dropped from every class, as an ignored
        # class index is (the softmax at that position involves every class).
        ignored_entries = targets == hyperparameter_in(ignore_index, targets.dtype)
        t = _dense_targets(targets, ignored_entries, dtype, "multiclass probability")
        ignored = ignored_entries.any(dim=1, keepdim=True)
        t = torch.where(ignored, torch.zeros_like(t), t)
        kept = ~ignored
        flat = _flatten_spatial(unless_ignored(x, kept), True)
        keep = _flatten_spatial(kept.to(dtype), True)
        return flat, torch.softmax(flat, dim=1), _flatten_spatial(t, True), keep
    check_same_shape(predictions, targets, 1, multiclass_mode_hint())
    if mode == "multilabel" and x.dim() < 2:
        raise ValueError(
            "multilabel predictions must be (N, C, *) logits, got shape {}".format(list(predictions.shape))
        )
    class_channel = mode == "multilabel"
    if not is_tracing() and _plainly_dense(targets, ignore_index):
        flat = _flatten_spatial(x, class_channel)
        return flat, torch.sigmoid(flat), _flatten_spatial(targets.to(dtype), class_channel), None
    ignored = targets == hyperparameter_in(ignore_index, targets.dtype)
    t = torch.where(ignored, 0.0, _dense_targets(targets, ignored, dtype, mode))
    kept = ~ignored
    flat = _flatten_spatial(unless_ignored(x, kept), class_channel)
    keep = _flatten_spatial(kept.to(dtype), class_channel)
    return flat, torch.sigmoid(flat), _flatten_spatial(t, class_channel), keep


def _plainly_dense(targets: Tensor, ignore_index: Tensor) -> bool:
    r"""True when one ``aminmax`` read on the host shows every target in ``[0, 1]`` and none equal to
    ``ignore_index``: then no mask is needed and the element-by-element check can be skipped."""
    if targets.numel() == 0 or targets.is_complex() or targets.dtype == torch.bool:
        return False
    smallest, largest = torch.aminmax(targets)
    low, high, ignored = float(smallest.item()), float(largest.item()), float(ignore_index)
    # NaN fails every comparison: such targets take the checked path, which names them.
    return low >= 0.0 and high <= 1.0 and not (low <= ignored and ignored <= high)


def _dense_targets(targets: Tensor, ignored: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    r"""``targets`` in ``dtype``; ``ValueError`` unless those not ``ignored`` are in ``[0, 1]``
    (``DENSE_TARGET_RANGE``, which scripted code cannot read)."""
    t = as_float(targets, dtype, "targets")
    if not is_tracing() and t.numel() > 0:
        if bool(((~ignored) & ((t < 0) | (t > 1) | torch.isnan(t))).any()):
            raise ValueError("{} targets must be in [0, 1] (or equal ignore_index)".format(what))
    return t


def class_index_view(x: Tensor, predictions: Tensor, targets: Tensor) -> Tensor:
    r"""Multiclass class-index ``targets`` ``(N, *)`` or ``(N, 1, *)`` as ``(N, *)``, their dtype and shape
    checked; ``x`` is the compute-dtype view of ``predictions``."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            "multiclass targets must be integer class indices (N, *) or (N, 1, *), or class probabilities of the "
            "predictions' shape {}; got dtype {} and shape {}".format(
                list(predictions.shape), targets.dtype, list(targets.shape)
            )
        )
    index = targets
    if targets.dim() == x.dim() and targets.shape[1] == 1:
        index = targets.squeeze(1)
    expected = [x.shape[0]] + list(x.shape[2:])
    if list(index.shape) != expected:
        raise ValueError(
            "multiclass targets must be class indices of shape (N, *) or (N, 1, *), or class probabilities of "
            "the predictions' shape (N, C, *): predictions {} vs targets {}".format(
                list(predictions.shape), list(targets.shape)
            )
        )
    return index


def check_class_indices(index: Tensor, ignored: Tensor, num_classes: int) -> None:
    r"""``ValueError`` unless every index that is not ``ignored`` is in ``[0, C)``; a host check, not while tracing."""
    if not is_tracing() and index.numel() > 0:
        if bool(((~ignored) & ((index < 0) | (index >= num_classes))).any()):
            raise ValueError("multiclass targets must be in [0, {}) or equal ignore_index".format(num_classes))


def prepare_class_indices(
    x: Tensor, predictions: Tensor, targets: Tensor, ignore_index: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r""":func:`prepare` for multiclass class-index targets (:func:`class_index_view`)."""
    index = class_index_view(x, predictions, targets)
    num_classes = x.shape[1]
    ignored = index == hyperparameter_in(ignore_index, index.dtype)
    check_class_indices(index, ignored, num_classes)
    kept = ~ignored
    x = unless_ignored(x, kept.unsqueeze(1))
    probabilities = _flatten_spatial(torch.softmax(x, dim=1), True)
    flat_index = _flatten_spatial(index, False)
    classes = torch.arange(num_classes, device=x.device).reshape(1, num_classes, 1)
    # Comparing with arange (not F.one_hot) exports to ONNX; ignored positions match no class.
    dense = (flat_index == classes).to(x.dtype)
    keep = _flatten_spatial(kept, False).to(x.dtype)
    return _flatten_spatial(x, True), probabilities, dense, keep


def _eager_index_sums(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], ignore_index: Tensor, squared: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``(TP, P, T)`` of multiclass class-index targets outside tracing, same sums as :func:`region_sums`.

    No one-hot targets: ``TP_c`` and ``T_c`` are the (weighted) probabilities and weights *at the
    target class*, gathered once and added into their class (``scatter_add``, in float64), and the
    not-ignored mask is applied only when some target is ignored. In eager Python the gradient of
    ``TP`` and ``P`` is :class:`~._autograd.ClassIndexOverlap`'s closed form.
    """
    dtype = compute_dtype(predictions.dtype)
    x = in_dtype(predictions, dtype).contiguous()
    index = class_index_view(x, predictions, targets.contiguous())
    num_classes = x.shape[1]
    # One aminmax read on the host: when every index is in [0, C) and none can equal ignore_index,
    # no mask is built and no element-by-element check runs.
    low, high, ignored_index = 0, -1, int(ignore_index)
    if index.numel() > 0:
        smallest, largest = torch.aminmax(index)
        low, high = int(smallest.item()), int(largest.item())
    keep: Optional[Tensor] = None
    if not (low >= 0 and high < num_classes and (ignored_index < low or ignored_index > high)):
        ignored = index == ignored_index
        check_class_indices(index, ignored, num_classes)
        # Ignored positions point at class 0 with a zero weight.
        index = torch.where(ignored, 0, index)
        kept = ~ignored
        keep = _flatten_spatial(kept, False).to(dtype)
        x = unless_ignored(x, kept.unsqueeze(1))
    pixel_weight = masked_pixel_weight(keep, weights, predictions, "multiclass")
    flat_x = _flatten_spatial(x, True)
    flat_index = _flatten_spatial(index, False)
    if torch.jit.is_scripting():
        true_positive, predicted, _ = _autograd.class_index_sums(flat_x, flat_index, pixel_weight, squared)
    else:
        true_positive, predicted = _autograd.class_index_overlap(flat_x, flat_index, pixel_weight, squared)
    if pixel_weight is None:
        # The same 1 at every position (stride 0), not a float64 buffer of ones of the targets' shape.
        target_weight = torch.ones(1, dtype=torch.float64, device=x.device).expand(flat_index.shape)
    else:
        target_weight = pixel_weight.expand(flat_x.shape).gather(1, flat_index).to(torch.float64)
    target = torch.zeros(true_positive.shape, dtype=torch.float64, device=x.device)
    return true_positive, predicted, target.scatter_add_(1, flat_index.squeeze(1), target_weight.squeeze(1))


def region_sums(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], ignore_index: Tensor, squared_pred: Tensor,
    mode: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``(TP, P, T)``, float64 ``(N, C)``: the sums of the module docstring over the spatial positions,
    with the pixel ``weights`` (broadcastable to the predictions) and the ignored positions' zero weight."""
    if not is_tracing() and mode == "multiclass" and predictions.dim() >= 2 and targets.shape != predictions.shape:
        return _eager_index_sums(predictions, targets, weights, ignore_index, bool(squared_pred))
    _, probabilities, dense, keep = prepare(predictions, targets, ignore_index, mode)
    return dense_sums(probabilities, dense, masked_pixel_weight(keep, weights, predictions, mode), squared_pred)


def masked_pixel_weight(
    keep: Optional[Tensor], weights: Optional[Tensor], predictions: Tensor, mode: str
) -> Optional[Tensor]:
    r"""The not-ignored mask of :func:`prepare` times the pixel ``weights``, ``(N, C, S)`` or ``(N, 1, S)``
    (``None``: every weight is 1)."""
    if weights is None:
        return keep
    dtype = compute_dtype(predictions.dtype)
    pixel_weight = _flatten_spatial(weights.to(dtype).expand(predictions.shape), mode != "binary")
    return pixel_weight if keep is None else keep * pixel_weight


def dense_sums(
    probabilities: Tensor, dense: Tensor, pixel_weight: Optional[Tensor], squared_pred: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``(TP, P, T)`` of the outputs of :func:`prepare` and :func:`masked_pixel_weight`."""
    if is_tracing():
        squared = squared_pred.to(torch.bool)
        predicted_term = torch.where(squared, probabilities * probabilities, probabilities)
        target_term = torch.where(squared, dense * dense, dense)
    elif bool(squared_pred):
        predicted_term, target_term = probabilities * probabilities, dense * dense
    else:
        predicted_term, target_term = probabilities, dense
    if pixel_weight is None:
        return (
            accumulate(probabilities * dense, [2]), accumulate(predicted_term, [2]), accumulate(target_term, [2])
        )
    weighted = pixel_weight * probabilities
    true_positive = accumulate(weighted * dense, [2])
    predicted = accumulate(weighted if predicted_term is probabilities else pixel_weight * predicted_term, [2])
    return true_positive, predicted, accumulate(pixel_weight * target_term, [2])


def _class_vectors(
    num_classes: int, include_background: Tensor, class_weight: Optional[Tensor], device: torch.device,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    r"""``(kept, loss_weight)``, float64 ``(C,)``: 1/0 per kept/dropped class, and ``class_weight · kept``; ``None``
    for both when every class is kept with weight 1 (then they cost no op), except while tracing.
    Channel 0 is background only beside other channels (as MONAI); it is dropped by a zero in ``kept``, not by
    slicing, so the graph and the output shape do not depend on ``include_background``. Outside tracing the flag is read
    on the host: one op instead of the graph's nine, which a small batch notices."""
    if is_tracing():
        classes = torch.arange(num_classes, device=device)
        background = (classes == 0) & (classes < num_classes - 1)
        dropped = background & (~include_background.to(torch.bool))
        kept = (~dropped).to(torch.float64)
    else:
        if class_weight is None and (num_classes == 1 or bool(include_background)):
            return None, None
        kept = torch.ones(num_classes, dtype=torch.float64, device=device)
        if num_classes > 1 and not bool(include_background):
            kept[0] = 0.0
    if class_weight is None:
        return kept, kept
    if class_weight.dim() != 1 or class_weight.shape[0] != num_classes:
        raise ValueError(
            "class_weight must have one entry per class: expected {} (1 in binary mode), got shape {}".format(
                num_classes, list(class_weight.shape)
            )
        )
    return kept, class_weight.to(device=device, dtype=torch.float64) * kept


def _class_vector(vector: Optional[Tensor], num_classes: int, device: torch.device) -> Tensor:
    r"""A vector of :func:`_class_vectors`, ``None`` as the ones it stands for."""
    if vector is None:
        return torch.ones(num_classes, dtype=torch.float64, device=device)
    return vector


def _class_sum(vector: Optional[Tensor], losses: Tensor) -> Tensor:
    r"""The sum over the classes of a weight or denominator of :func:`class_terms` for ``losses`` ``(..., C)``
    (``None``: ones, whose sum is ``C``)."""
    if vector is None:
        return torch.full([], float(losses.shape[-1]), dtype=torch.float64, device=losses.device)
    return vector.sum(-1)


def _weighted(losses: Tensor, weight: Optional[Tensor]) -> Tensor:
    r"""``losses · weight``, ``None`` a weight of 1."""
    if weight is None:
        return losses
    return losses * weight


# (k, α, β, γ, s_nr, s_dr, log_loss) of an overlap index, as the kernels receive them: 0-d tensors in TorchScript and
# while tracing, Python numbers in eager Python (_constant).
OverlapIndex = Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Tensor, Tensor]


def overlap_ratio(true_positive: Tensor, predicted: Tensor, target: Tensor, index: OverlapIndex) -> Tensor:
    r"""The overlap index ``(k·TP + s_nr) / (k·(TP + α·FP + β·FN) + s_dr)``, elementwise."""
    overlap_scale, alpha, beta = _float64(index[0]), _float64(index[1]), _float64(index[2])
    numerator = _linear_combination([(overlap_scale, true_positive)], index[4])
    # TP + α(P - TP) + β(T - TP) written without the differences, k multiplied into each term: exact P + T for
    # Dice (k = 2, α = β = 1/2), whose TP term has the factor 0.
    denominator = _linear_combination(
        [(overlap_scale * (1.0 - alpha - beta), true_positive), (overlap_scale * alpha, predicted),
         (overlap_scale * beta, target)],
        index[5],
    )
    # 0/0 happens only with smooth_dr = 0 and a class absent from predictions and targets (or
    # entirely ignored): it counts as a perfect overlap (index 1, loss 0) instead of NaN.
    return safe_divide(numerator, denominator, 1.0)


def _linear_combination(terms: List[Tuple[Tensor, Tensor]], constant: Tensor) -> Tensor:
    r"""``Σ_j a_j·x_j + b`` of float64 tensors ``x_j`` and hyperparameters ``a_j``, ``b`` of :func:`_constant`. In
    eager Python, where those are Python numbers, terms with ``a_j = 0`` and ``b = 0`` are left out and ``a_j = 1``
    multiplies nothing: ops that change nothing cost a small batch more than its arithmetic."""
    if not torch.jit.is_scripting():
        if not is_tracing():
            total = None
            for factor, x in terms:
                if factor != 0.0:
                    term = x if factor == 1.0 else x * factor
                    total = term if total is None else total + term
            if total is None:
                total = torch.zeros_like(terms[0][1])
            return total if constant == 0.0 else total + constant
    result = _float64(terms[0][0]) * terms[0][1]
    for factor, x in terms[1:]:
        result = result + _float64(factor) * x
    return result + _float64(constant)


def _overlap_losses(true_positive: Tensor, predicted: Tensor, target: Tensor, index: OverlapIndex) -> Tensor:
    r"""The loss of each :func:`overlap_ratio`, elementwise."""
    return ratio_losses(overlap_ratio(true_positive, predicted, target, index), index)


def ratio_losses(ratio: Tensor, index: OverlapIndex) -> Tensor:
    r"""The loss of overlap indices ``ratio``: ``1 - I`` or ``-log max(I, 1e-7)``, to the power ``γ`` if set."""
    _, _, _, gamma, _, _, log_loss = index
    if is_tracing():
        loss = torch.where(log_loss.to(torch.bool), _negative_log(ratio), 1.0 - ratio)
    elif bool(log_loss):
        loss = _negative_log(ratio)
    else:
        loss = 1.0 - ratio
    if gamma is None:
        return loss
    # x^γ has an infinite derivative at 0 for γ < 1: evaluate the power on a positive base only
    # and take 0 (with gradient 0) where the loss is 0; an index above 1 (s_nr > s_dr) is clamped.
    base = torch.clamp(loss, min=0.0)
    positive = base > 0
    powered = torch.pow(torch.where(positive, base, torch.ones_like(base)), _float64(gamma))
    return torch.where(positive, powered, torch.zeros_like(powered))


def _negative_log(ratio: Tensor) -> Tensor:
    r"""``-log I``, taken at ``max(I, 1e-7)`` (smp's clamp): an index of 0 gives the finite loss 16.1 and a zero
    gradient instead of ``-log(0) = inf``."""
    return -torch.log(torch.clamp(ratio, min=1e-7))


def _batch_losses(totals: Tensor, index: OverlapIndex) -> Tensor:
    r"""The per-class losses of ``batch=True`` totals ``(..., 3C)`` = ``[TP_c…, P_c…, T_c…]``."""
    num_classes = totals.shape[-1] // 3
    true_positive, predicted = totals[..., :num_classes], totals[..., num_classes:2 * num_classes]
    return _overlap_losses(true_positive, predicted, totals[..., 2 * num_classes:], index)


def absent_classes_code(name: str) -> int:
    r"""The graph-input code of an ``absent_classes`` choice (spelled out: TorchScript cannot read
    ``ABSENT_CLASSES``, whose order this is)."""
    choices = ["count", "zero", "skip"]
    if name not in choices:
        raise ValueError("absent_classes must be one of 'count', 'zero', 'skip', got '{}'".format(name))
    return choices.index(name)


def class_terms(
    losses: Tensor, target: Tensor, kept: Optional[Tensor], loss_weight: Optional[Tensor],
    absent_classes: Optional[Tensor], index: OverlapIndex,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    r"""``(losses, weights, mean denominators)`` of rows ``(..., C)`` of per-class losses with target sums ``target``,
    under the ``absent_classes`` rule (a 0-d int64 code of :data:`ABSENT_CLASSES`; ``None`` outside export is
    "count", which then costs nothing); ``kept`` and ``loss_weight`` are :func:`_class_vectors`' ``(C,)`` (``None``:
    ones, and then so are the weights and denominators of count and zero).

    count: ``(ℓ, w_c, kept_c)`` (the vectors broadcast). zero: ``ℓ`` is 0 where ``T = 0``. skip: the weights of a row are its present
    classes' ``w_c``, normalised to sum 1, and so are its denominators: each row counts once, as the average over
    its present classes; a row without a weighted present class is the loss of a zero index (constant), spread
    over its kept classes."""
    if absent_classes is None:
        return losses, loss_weight, kept
    present = target > 0
    if not is_tracing():
        code = int(absent_classes)
        if code == 0:
            return losses, loss_weight, kept
        if code == 1:
            return torch.where(present, losses, torch.zeros_like(losses)), loss_weight, kept
    kept_vector = _class_vector(kept, losses.shape[-1], losses.device)
    weight_vector = kept_vector if loss_weight is None else loss_weight
    share = weight_vector * present.to(torch.float64)
    total = share.sum(-1, keepdim=True)
    weighted = total > 0
    uniform = kept_vector / torch.clamp(kept_vector.sum(), min=1.0)
    normalised = torch.where(weighted, share / torch.where(weighted, total, torch.ones_like(total)), uniform)
    empty_loss = ratio_losses(torch.zeros_like(losses), index)
    skipped = torch.where(weighted, losses, empty_loss)
    if not is_tracing():
        return skipped, normalised, normalised
    zeroed = torch.where(present, losses, torch.zeros_like(losses))
    skip = absent_classes == 2
    chosen_losses = torch.where(absent_classes == 0, losses, torch.where(absent_classes == 1, zeroed, skipped))
    return chosen_losses, torch.where(skip, normalised, weight_vector.expand_as(losses)), torch.where(
        skip, normalised, kept_vector.expand_as(losses)
    )


def split_weights(weights: Optional[Tensor], predictions: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    r"""Call-time ``weights`` of a region loss as ``(pixel_weights, sample_weights)``: ``(N,)`` weights of
    predictions with more than one dimension weight a sample's overlap (no pixel weight can); any other shape
    is a pixel weight broadcastable to the predictions."""
    if weights is None:
        return None, None
    sample_or_element_weights(weights, list(predictions.shape))
    if weights.dim() == 1 and predictions.dim() > 1 and weights.shape[0] == predictions.shape[0]:
        return None, weights
    return weights, None


def check_split_weights(weights: Optional[Tensor], sample_weights: Optional[Tensor], predictions: Tensor) -> None:
    r"""Pixel ``weights`` must broadcast to the predictions; ``sample_weights`` must be ``(N,)``."""
    shape = list(predictions.shape)
    if weights is not None:
        check_real(weights, "weights")
        if not broadcastable(list(weights.shape), shape):
            raise ValueError(
                "weights (pixel weights) of shape {} must broadcast to the predictions' shape {}".format(
                    list(weights.shape), shape
                )
            )
    if sample_weights is not None:
        check_real(sample_weights, "sample_weights")
        if sample_weights.dim() != 1 or sample_weights.shape[0] != shape[0]:
            raise ValueError(
                "sample_weights must have shape (N,) = [{}] (one weight per sample of predictions {}), got {}".format(
                    shape[0], shape, list(sample_weights.shape)
                )
            )


def region_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], sample_weights: Optional[Tensor],
    overlap_scale: Tensor, alpha: Tensor, beta: Tensor, gamma: Optional[Tensor], smooth_nr: Tensor,
    smooth_dr: Tensor, log_loss: Tensor, include_background: Tensor, absent_classes: Optional[Tensor], squared_pred: Tensor,
    ignore_index: Tensor, class_weight: Optional[Tensor], mode: str, batch: bool, per_sample: bool,
    values: bool = True, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The statistics kernel of every region loss, of the overlap index ``k = overlap_scale``, ``α``, ``β`` (and
    ``γ`` for focal Tversky, else ``None``) of the module docstring. Pixel ``weights`` :math:`w_{nci}` (never
    per-sample) and ``(N,)`` ``sample_weights`` :math:`s_n` may both be given (``None`` is ones; the ONNX graphs
    feed both): ``batch=False`` weights the loss of ``(n, c)`` by :math:`s_n\,w_c` (``w_c`` the class weight),
    ``batch=True`` sums :math:`TP_c = \sum_n s_n \sum_i w_{nci}\,p_{nci}\,t_{nci}` (and ``P``, ``T`` alike).
    Its values, a loss per ``(n, c)``, cost no more than its totals: it writes them whatever ``values`` says, except
    with ``batch`` (:func:`overlap_statistics`)."""
    check_split_weights(weights, sample_weights, predictions)
    return overlap_statistics(
        region_sums(predictions, targets, weights, ignore_index, squared_pred, mode), sample_weights, overlap_scale,
        alpha, beta, gamma, smooth_nr, smooth_dr, log_loss, include_background, absent_classes, class_weight, batch,
        per_sample, per_class, values,
    )


def batch_totals(
    sums: Tuple[Tensor, Tensor, Tensor], sample_weights: Optional[Tensor], per_sample: bool
) -> Tuple[Tensor, Tensor]:
    r"""``(totals, sample_totals)`` of ``batch=True``: the ``(N, C)`` sums ``(TP, P, T)`` as ``[TP_c…, P_c…, T_c…]``
    summed over the batch, a sample weight scaling that sample's contributions; the sample totals ``(N, 3C)``
    with ``per_sample``, else ``(0, 3C)``."""
    true_positive, predicted, target = sums
    if sample_weights is not None:
        scale = sample_weights.to(torch.float64).unsqueeze(1)
        true_positive, predicted, target = true_positive * scale, predicted * scale, target * scale
    sample_totals = torch.cat([true_positive, predicted, target], dim=1)
    return sample_totals.sum(0), sample_totals if per_sample else sample_totals[:0]


def pooled_class_totals(totals: Tensor) -> Tensor:
    r"""``batch=True`` totals ``[TP_c…, P_c…, T_c…]`` as class totals ``(C, 3)``, a row ``[TP_c, P_c, T_c]`` per class."""
    return totals.reshape(3, totals.shape[0] // 3).t()


def overlap_statistics(
    sums: Tuple[Tensor, Tensor, Tensor], sample_weights: Optional[Tensor], overlap_scale: Tensor, alpha: Tensor,
    beta: Tensor, gamma: Optional[Tensor], smooth_nr: Tensor, smooth_dr: Tensor, log_loss: Tensor,
    include_background: Tensor, absent_classes: Optional[Tensor], class_weight: Optional[Tensor], batch: bool, per_sample: bool,
    per_class: bool = False, values: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The statistics of the region kernel from the ``(TP, P, T)`` sums of :func:`region_sums`, the ``(n, c)``
    losses weighted by :func:`class_terms`. The class totals of ``per_class``: ``[TP_c, P_c, T_c]`` over the batch
    (:func:`pooled_class_totals`), after the elementwise totals of class ``c``'s ``(n, c)`` losses for
    ``batch=False``. Without ``values`` (outside tracing), ``batch=True`` leaves its per-class losses to the
    reductions kernel, which computes them from the totals anyway."""
    true_positive, predicted, target = sums
    num_classes = true_positive.shape[1]
    index = (overlap_scale, alpha, beta, gamma, smooth_nr, smooth_dr, log_loss)
    if batch:
        totals, sample_totals = batch_totals(sums, sample_weights, per_sample and not per_class)
        parts = pooled_class_totals(totals) if per_class else sample_totals
        if not values and not is_tracing():
            return totals.new_empty([0]), totals, parts
        kept, loss_weight = _class_vectors(num_classes, include_background, class_weight, true_positive.device)
        losses, weight, _ = class_terms(
            _batch_losses(totals, index), pooled_class_totals(totals)[:, 2], kept, loss_weight, absent_classes, index
        )
        return _weighted(losses, weight), totals, parts
    kept, loss_weight = _class_vectors(num_classes, include_background, class_weight, true_positive.device)
    losses, weight, denominator = class_terms(
        _overlap_losses(true_positive, predicted, target, index), target, kept, loss_weight, absent_classes, index
    )
    if sample_weights is not None:
        # batch=False: a sample weight weights that sample's (n, c) losses.
        weight = _weighted(sample_weights.to(torch.float64).unsqueeze(1), weight)
    values, loss_totals, parts = elementwise_statistics(
        _weighted(losses, weight), weight, denominator, per_sample, per_class, 1
    )
    if per_class:
        pooled, _ = batch_totals(sums, sample_weights, False)
        parts = torch.cat([parts, pooled_class_totals(pooled)], dim=1)
    return values, loss_totals, parts


def region_reductions(
    totals: Tensor, overlap_scale: Tensor, alpha: Tensor, beta: Tensor, gamma: Optional[Tensor], smooth_nr: Tensor,
    smooth_dr: Tensor, log_loss: Tensor, include_background: Tensor, absent_classes: Optional[Tensor],
    class_weight: Optional[Tensor], batch: bool,
) -> Tensor:
    r"""The reductions kernel of every region loss: ``(..., K)`` totals to ``[sum, mean, weighted_mean]``.
    ``batch=False``: the elementwise rule over the ``(n, c)`` losses (``mean`` divides by ``N·C'``,
    ``C'`` the kept classes, as MONAI's mean). ``batch=True``: per-class losses ``ℓ_c`` from
    ``[TP_c…, P_c…, T_c…]`` with the weights ``w_c`` and denominators ``d_c`` of :func:`class_terms`:
    ``Σ w_c ℓ_c``, ``Σ w_c ℓ_c / Σ d_c`` (``C'`` when every class counts) and ``Σ w_c ℓ_c / Σ w_c`` (0 when the
    denominator is 0).
    """
    if not batch:
        return elementwise_reductions(totals)
    if totals.shape[-1] % 3 != 0:
        raise ValueError(
            "batch=True region totals must hold [TP_c, P_c, T_c] per class (a multiple of 3), got {}".format(
                totals.shape[-1]
            )
        )
    index = (overlap_scale, alpha, beta, gamma, smooth_nr, smooth_dr, log_loss)
    num_classes = totals.shape[-1] // 3
    kept, loss_weight = _class_vectors(num_classes, include_background, class_weight, totals.device)
    losses, weight, denominator = class_terms(
        _batch_losses(totals, index), totals[..., 2 * num_classes:], kept, loss_weight, absent_classes, index
    )
    loss_sum = _weighted(losses, weight).sum(-1)
    mean = safe_divide(loss_sum, _class_sum(denominator, losses))
    return torch.stack([loss_sum, mean, safe_divide(loss_sum, _class_sum(weight, losses))], dim=-1)


def region_class_reductions(
    class_totals: Tensor, overlap_scale: Tensor, alpha: Tensor, beta: Tensor, gamma: Optional[Tensor],
    smooth_nr: Tensor, smooth_dr: Tensor, log_loss: Tensor, include_background: Tensor, absent_classes: Optional[Tensor],
    class_weight: Optional[Tensor], batch: bool,
) -> Tensor:
    r"""``(C, 4)`` per class: ``[sum, mean, weighted_mean]`` of the class's loss, and its overlap index over the
    data (:func:`overlap_ratio` of the pooled ``[TP_c, P_c, T_c]``, e.g. its Dice score).

    ``batch=False``: the elementwise rule over the class's ``(n, c)`` losses. ``batch=True``: the class's one
    loss ``ℓ_c`` as one term with the weight ``w_c`` and denominator ``d_c`` of :func:`class_terms` (``w_c ℓ_c``,
    ``w_c ℓ_c / d_c``, ``ℓ_c``)."""
    index = (overlap_scale, alpha, beta, gamma, smooth_nr, smooth_dr, log_loss)
    pooled = class_totals[:, -3:]
    true_positive, predicted, target = pooled[:, 0], pooled[:, 1], pooled[:, 2]
    ratio = overlap_ratio(true_positive, predicted, target, index)
    if batch:
        num_classes = class_totals.shape[0]
        kept, loss_weight = _class_vectors(num_classes, include_background, class_weight, class_totals.device)
        losses, weight, denominator = class_terms(
            _overlap_losses(true_positive, predicted, target, index), target, kept, loss_weight, absent_classes, index
        )
        weight_vector = _class_vector(weight, num_classes, class_totals.device)
        terms = torch.stack(
            [weight_vector * losses, weight_vector, _class_vector(denominator, num_classes, class_totals.device),
             torch.ones_like(losses)],
            dim=1,
        )
        reductions = elementwise_reductions(terms)
    else:
        reductions = elementwise_reductions(class_totals[:, :4])
    return torch.cat([reductions, ratio.unsqueeze(1)], dim=1)


def _constant(value: float, like: Tensor) -> Tensor:
    r"""A float hyperparameter of the region kernels: :func:`~._reduction.float_hyperparameter` (a Python ``float`` in
    eager Python), but a float64 tensor in TorchScript and while tracing (a graph input there), whatever the
    predictions' dtype. The kernels read it through :func:`_float64` and ``bool``/``int``, which take both."""
    return float_hyperparameter(value, like, torch.float64)


def _float64(value: Tensor) -> Tensor:
    r"""A hyperparameter of :func:`_constant` in float64 (the Python number as it is)."""
    return hyperparameter_in(value, torch.float64)


# The arguments both region kernels take after their tensors: (k, α, β, γ, s_nr, s_dr, log_loss,
# include_background, absent_classes).
IndexArguments = Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]


def index_arguments(
    like: Tensor, overlap_scale: float, alpha: float, beta: float, gamma: Optional[float], smooth_nr: float,
    smooth_dr: float, log_loss: bool, include_background: bool, absent_classes: str,
) -> IndexArguments:
    r"""The overlap index and its settings as the kernels take them (:func:`_constant` and
    :func:`~._reduction.bool_hyperparameter` on ``like``'s device; ``absent_classes`` as its code, ``None`` for the
    default rule, which needs no tensor)."""
    code = absent_classes_code(absent_classes)
    return (
        _constant(overlap_scale, like), _constant(alpha, like), _constant(beta, like),
        None if gamma is None else _constant(gamma, like), _constant(smooth_nr, like), _constant(smooth_dr, like),
        bool_hyperparameter(log_loss, like), bool_hyperparameter(include_background, like),
        None if code == 0 else int_hyperparameter(code, like),
    )


def _region_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], index: Dict[str, Any], smooth_nr: float,
    smooth_dr: float, include_background: bool, squared_pred: bool, log_loss: bool, ignore_index: int,
    class_weight: Optional[Tensor], mode: str, batch: bool, absent_classes: str, reduction: str,
    statistics_kernel: Callable[..., Tuple[Tensor, Tensor, Tensor]] = region_statistics,
    reductions_kernel: Callable[..., Tensor] = region_reductions,
    statistics_leading: Tuple[Any, ...] = (), reductions_leading: Tuple[Any, ...] = (),
) -> Tensor:
    r"""The functional form of a region loss whose overlap index is ``index`` (``overlap_scale``,
    ``alpha``, ``beta``, ``gamma``). A loss built on the region kernels (``bce_dice``) passes its
    own kernels and the arguments each takes before the index."""
    class_weight = vector_argument(class_weight)
    check_reduction(reduction)
    arguments = index_arguments(
        predictions, index["overlap_scale"], index["alpha"], index["beta"], index["gamma"], smooth_nr, smooth_dr,
        log_loss, include_background, absent_classes,
    )
    values, totals, _ = statistics_kernel(
        predictions, targets, *split_weights(weights, predictions), *statistics_leading, *arguments,
        bool_hyperparameter(squared_pred, predictions), int_hyperparameter(ignore_index, predictions), class_weight,
        mode, batch, False, reduction == "none",
    )
    reductions = reductions_kernel(totals, *reductions_leading, *arguments, class_weight, batch)
    return select_reduction(values, reductions, reduction, predictions.dtype)


def set_region_settings(
    module: Loss, smooth_nr: float, smooth_dr: float, include_background: bool, ignore_index: int, mode: str,
    batch: bool, reduction: str,
) -> None:
    r"""The settings every region loss module has (``generalized_dice`` too), checked and set on ``module``."""
    if mode not in MODES:
        raise ValueError("mode must be one of 'binary', 'multilabel', 'multiclass', got {!r}".format(mode))
    module.smooth_nr = float(smooth_nr)
    module.smooth_dr = float(smooth_dr)
    module.include_background = bool(include_background)
    module.ignore_index = int(ignore_index)
    module.mode = mode
    module.batch = bool(batch)
    module.reduction = check_reduction(reduction)


class RegionLoss(Loss):
    r"""Base of the region-loss modules: the shared settings, ``statistics`` and ``reductions``. A loss declares
    its overlap index's fixed values in ``constants`` (``overlap_scale`` and those of ``alpha``, ``beta``,
    ``gamma`` that are no hyperparameters of it), TorchScript constants C++ cannot change."""

    constants: Dict[str, Optional[float]] = {}
    smooth_nr: float
    smooth_dr: float
    include_background: bool
    squared_pred: bool
    log_loss: bool
    ignore_index: int
    mode: str
    batch: bool
    absent_classes: str
    reduction: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__constants__ = list(cls.constants)

    def __init__(
        self, smooth_nr: float = SMOOTH_NR_PARAM.default, smooth_dr: float = SMOOTH_DR_PARAM.default,
        include_background: bool = INCLUDE_BACKGROUND_PARAM.default, squared_pred: bool = SQUARED_PRED_PARAM.default,
        log_loss: bool = LOG_LOSS_PARAM.default, ignore_index: int = IGNORE_INDEX_PARAM.default,
        class_weight: Optional[Tensor] = None, mode: str = MODE_PARAM.default, batch: bool = BATCH_PARAM.default,
        absent_classes: str = ABSENT_CLASSES_PARAM.default, reduction: str = REDUCTION_PARAM.default,
    ) -> None:
        super().__init__()
        for name, value in self.constants.items():
            setattr(self, name, value)
        set_region_settings(self, smooth_nr, smooth_dr, include_background, ignore_index, mode, batch, reduction)
        absent_classes_code(absent_classes)
        self.absent_classes = absent_classes
        self.squared_pred = bool(squared_pred)
        self.log_loss = bool(log_loss)
        self.register_buffer("class_weight", vector_buffer(class_weight))

    def index_arguments(self, like: Tensor) -> IndexArguments:
        return index_arguments(
            like, self.overlap_scale, self.alpha, self.beta, self.gamma, self.smooth_nr, self.smooth_dr, self.log_loss,
            self.include_background, self.absent_classes,
        )

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return region_statistics(
            predictions, targets, *split_weights(weights, predictions), *self.index_arguments(predictions),
            bool_hyperparameter(self.squared_pred, predictions), int_hyperparameter(self.ignore_index, predictions),
            optional_vector(self.class_weight), self.mode, self.batch, per_sample, values, per_class,
        )

    def elementwise_totals(self) -> bool:
        return not self.batch

    @torch.jit.export
    def reductions(self, totals: Tensor) -> Tensor:
        return region_reductions(totals, *self.index_arguments(totals), optional_vector(self.class_weight), self.batch)

    @torch.jit.export
    def class_reductions(self, class_totals: Tensor) -> Tensor:
        return region_class_reductions(
            class_totals, *self.index_arguments(class_totals), optional_vector(self.class_weight), self.batch
        )


class DiceLoss(RegionLoss):
    r"""Module form of :func:`dice_loss`; ``class_weight`` is a buffer (empty = not set)."""

    constants = {"overlap_scale": 2.0, "alpha": 0.5, "beta": 0.5, "gamma": None}


class IoULoss(RegionLoss):
    r"""Module form of :func:`iou_loss`; ``class_weight`` is a buffer (empty = not set)."""

    constants = {"overlap_scale": 1.0, "alpha": 1.0, "beta": 1.0, "gamma": None}


class TverskyLoss(RegionLoss):
    r"""Module form of :func:`tversky_loss`; ``class_weight`` is a buffer (empty = not set)."""

    constants = {"overlap_scale": 1.0, "gamma": None}
    alpha: float
    beta: float

    def __init__(
        self, alpha: float = ALPHA_PARAM.default, beta: float = BETA_PARAM.default, *settings: Any, **named: Any
    ) -> None:
        super().__init__(*settings, **named)
        self.alpha = float(alpha)
        self.beta = float(beta)


class FocalTverskyLoss(RegionLoss):
    r"""Module form of :func:`focal_tversky_loss`; ``class_weight`` is a buffer (empty = not set)."""

    constants = {"overlap_scale": 1.0}
    alpha: float
    beta: float
    gamma: float

    def __init__(
        self, alpha: float = FOCAL_ALPHA_PARAM.default, beta: float = FOCAL_BETA_PARAM.default,
        gamma: float = GAMMA_PARAM.default, *settings: Any, **named: Any,
    ) -> None:
        super().__init__(*settings, **named)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)


def dice_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, smooth_nr: float = SMOOTH_NR_PARAM.default,
    smooth_dr: float = SMOOTH_DR_PARAM.default, include_background: bool = INCLUDE_BACKGROUND_PARAM.default,
    squared_pred: bool = SQUARED_PRED_PARAM.default, log_loss: bool = LOG_LOSS_PARAM.default,
    ignore_index: int = IGNORE_INDEX_PARAM.default, class_weight: Optional[Tensor] = None,
    mode: str = MODE_PARAM.default, batch: bool = BATCH_PARAM.default,
    absent_classes: str = ABSENT_CLASSES_PARAM.default, reduction: str = REDUCTION_PARAM.default,
) -> Tensor:
    r"""Soft Dice loss on logits (Milletari et al. 2016, V-Net), with MONAI's conventions.

    .. math::
        D_{nc} = \frac{2\,TP_{nc} + s_{nr}}{P_{nc} + T_{nc} + s_{dr}},\qquad
        \ell_{nc} = 1 - D_{nc}\ \ (\text{or } -\log\max(D_{nc}, 10^{-7}))

    with :math:`TP = Σ w·p·t`, :math:`P = Σ w·p` (:math:`Σ w·p^2` with ``squared_pred``), :math:`T = Σ w·t`
    (:math:`Σ w·t^2`) over the spatial positions (and the batch with ``batch``), ``p`` the sigmoid (binary,
    multilabel) or the softmax over dim 1 (multiclass) of the logits. Inputs by ``mode`` (the ``MODE_PARAM`` doc):
    binary ``(N, 1, *)`` or ``(N, *)`` logits; multilabel ``(N, C, *)``; targets of their shape in ``[0, 1]`` or
    ``ignore_index``; multiclass ``(N, C, *)`` logits with class indices ``(N, *)`` or ``(N, 1, *)``, or class
    probabilities. ``class_weight`` (length ``C``) weights each class's loss. ``none`` returns the ``(N, C)`` weighted
    losses (``(C,)`` with ``batch``), a dropped background column 0; ``mean`` divides by ``N·C'`` (``C'`` with
    ``batch``, ``C'`` the kept classes), ``weighted_mean`` by the sum of the loss weights.

    Equals MONAI ``DiceLoss(sigmoid=True | softmax=True, to_onehot_y=...)`` for its settings.
    """
    return _region_loss(
        predictions, targets, weights, DiceLoss.constants, smooth_nr, smooth_dr, include_background, squared_pred,
        log_loss, ignore_index, class_weight, mode, batch, absent_classes, reduction,
    )


def iou_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, smooth_nr: float = SMOOTH_NR_PARAM.default,
    smooth_dr: float = SMOOTH_DR_PARAM.default, include_background: bool = INCLUDE_BACKGROUND_PARAM.default,
    squared_pred: bool = SQUARED_PRED_PARAM.default, log_loss: bool = LOG_LOSS_PARAM.default,
    ignore_index: int = IGNORE_INDEX_PARAM.default, class_weight: Optional[Tensor] = None,
    mode: str = MODE_PARAM.default, batch: bool = BATCH_PARAM.default,
    absent_classes: str = ABSENT_CLASSES_PARAM.default, reduction: str = REDUCTION_PARAM.default,
) -> Tensor:
    r"""Soft IoU (Jaccard) loss on logits (Rahman & Wang 2016; Berman et al. 2018).

    .. math::
        J_{nc} = \frac{TP_{nc} + s_{nr}}{P_{nc} + T_{nc} - TP_{nc} + s_{dr}},\qquad
        \ell_{nc} = 1 - J_{nc}\ \ (\text{or } -\log\max(J_{nc}, 10^{-7}))

    The rest as :func:`dice_loss`. MONAI's ``jaccard=True`` smooths ``(2TP + s_nr) / (2(P + T - TP) + s_dr)``,
    the same loss without smoothing.
    """
    return _region_loss(
        predictions, targets, weights, IoULoss.constants, smooth_nr, smooth_dr, include_background, squared_pred,
        log_loss, ignore_index, class_weight, mode, batch, absent_classes, reduction,
    )


def tversky_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, alpha: float = ALPHA_PARAM.default,
    beta: float = BETA_PARAM.default, smooth_nr: float = SMOOTH_NR_PARAM.default,
    smooth_dr: float = SMOOTH_DR_PARAM.default, include_background: bool = INCLUDE_BACKGROUND_PARAM.default,
    squared_pred: bool = SQUARED_PRED_PARAM.default, log_loss: bool = LOG_LOSS_PARAM.default,
    ignore_index: int = IGNORE_INDEX_PARAM.default, class_weight: Optional[Tensor] = None,
    mode: str = MODE_PARAM.default, batch: bool = BATCH_PARAM.default,
    absent_classes: str = ABSENT_CLASSES_PARAM.default, reduction: str = REDUCTION_PARAM.default,
) -> Tensor:
    r"""Tversky loss on logits (Salehi et al. 2017), ``alpha`` on false positives, ``beta`` on false negatives.

    .. math::
        TI_{nc} = \frac{TP_{nc} + s_{nr}}{TP_{nc} + \alpha\,FP_{nc} + \beta\,FN_{nc} + s_{dr}},\quad
        FP = P - TP,\ FN = T - TP,\qquad \ell_{nc} = 1 - TI_{nc}\ \ (\text{or } -\log\max(TI_{nc}, 10^{-7}))

    Without smoothing, ``alpha = beta = 0.5`` (the default, as MONAI and smp) is :func:`dice_loss` and
    ``alpha = beta = 1`` :func:`iou_loss`. The rest as :func:`dice_loss`; equals MONAI ``TverskyLoss``.
    """
    return _region_loss(
        predictions, targets, weights, dict(TverskyLoss.constants, alpha=alpha, beta=beta), smooth_nr, smooth_dr,
        include_background, squared_pred, log_loss, ignore_index, class_weight, mode, batch, absent_classes, reduction,
    )


def focal_tversky_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, alpha: float = FOCAL_ALPHA_PARAM.default,
    beta: float = FOCAL_BETA_PARAM.default, gamma: float = GAMMA_PARAM.default,
    smooth_nr: float = SMOOTH_NR_PARAM.default, smooth_dr: float = SMOOTH_DR_PARAM.default,
    include_background: bool = INCLUDE_BACKGROUND_PARAM.default, squared_pred: bool = SQUARED_PRED_PARAM.default,
    log_loss: bool = LOG_LOSS_PARAM.default, ignore_index: int = IGNORE_INDEX_PARAM.default,
    class_weight: Optional[Tensor] = None, mode: str = MODE_PARAM.default, batch: bool = BATCH_PARAM.default,
    absent_classes: str = ABSENT_CLASSES_PARAM.default, reduction: str = REDUCTION_PARAM.default,
) -> Tensor:
    r"""Focal Tversky loss on logits (Abraham & Khan 2019), per class before any reduction.

    .. math::
        \ell_{nc} = \max(1 - TI_{nc}, 0)^{\gamma}\ \ (\text{or } \max(-\log\max(TI_{nc}, 10^{-7}), 0)^{\gamma})

    ``gamma`` is the exponent itself: the paper's :math:`(1 - TI)^{1/γ}` with ``γ = 4/3`` is the default
    ``gamma = 0.75`` (with its ``alpha = 0.3``, ``beta = 0.7``); ``gamma = 1`` is :func:`tversky_loss`. The power
    applies to each class's loss, as the paper's :math:`\sum_c (1 - TI_c)^{1/γ}` (smp: to the mean loss); at a
    loss of 0 the gradient is 0 (docs/losses/region.md).
    """
    return _region_loss(
        predictions, targets, weights, dict(FocalTverskyLoss.constants, alpha=alpha, beta=beta, gamma=gamma),
        smooth_nr, smooth_dr, include_background, squared_pred, log_loss, ignore_index, class_weight, mode, batch,
        absent_classes, reduction,
    )


# ------------------------------------------------------------------------------ registration


def region_inputs(
    batch: int, num_classes: int, spatial: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
    params: Dict[str, Any],
) -> Tuple[Tensor, Tensor]:
    r"""Random logits and targets for ``params["mode"]``; about 15% of targets are ``ignore_index``
    when the parameters set one, and with an ``absent_classes`` rule the last class is absent from sample 0 and
    every class but 0 from sample 1. Binary inputs are ``(N, 1, *spatial)``."""
    mode = params.get("mode", MODE_PARAM.default)
    channels = 1 if mode == "binary" else num_classes
    shape = (batch, channels) + tuple(spatial)
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2).to(dtype)
    if mode == "multiclass":
        targets = torch.randint(0, num_classes, (batch,) + tuple(spatial), generator=generator)
    else:
        targets = (torch.rand(shape, generator=generator, dtype=torch.float64) < 0.3).to(dtype)
    if params.get("absent_classes", ABSENT_CLASSES_PARAM.default) != ABSENT_CLASSES_PARAM.default:
        if mode == "multiclass":
            targets[:1] = torch.where(targets[:1] == num_classes - 1, 0, targets[:1])
            targets[1:2] = 0
        else:
            targets[:1, -1:] = 0
            targets[1:2, 1:] = 0
    if "ignore_index" in params:
        ignored = torch.rand(targets.shape, generator=generator) < 0.15
        targets = torch.where(ignored, torch.full_like(targets, params["ignore_index"]), targets)
    return logits, targets


COMMON_PARAMS: Tuple[ParamSpec, ...] = (
    SMOOTH_NR_PARAM, SMOOTH_DR_PARAM, INCLUDE_BACKGROUND_PARAM, SQUARED_PRED_PARAM, LOG_LOSS_PARAM, IGNORE_INDEX_PARAM,
    CLASS_WEIGHT_PARAM, MODE_PARAM, BATCH_PARAM, ABSENT_CLASSES_PARAM, REDUCTION_PARAM,
)
# One ONNX graph per mode and batch setting: together they cover every structural choice.
VARIANTS: Tuple[Dict[str, Any], ...] = (
    {}, {"mode": "multilabel"}, {"mode": "multiclass"}, {"batch": True}, {"mode": "multilabel", "batch": True},
    {"mode": "multiclass", "batch": True},
)
_SHAPES = dict(
    predictions="logits",
    targets="class_indices_or_probabilities",
    prediction_shape="binary: (N, 1, *) or (N, *); multilabel, multiclass: (N, C, *)",
    target_shape="binary, multilabel: same as predictions, values in [0, 1] or ignore_index; "
    "multiclass: class indices (N, *) or (N, 1, *) (C > 1), or class probabilities (N, C, *)",
)
_NOTES = (
    "include_background=False zeroes class 0's weight and mean denominator (the output keeps C columns); "
    "it is a no-op for a single channel. class_weight has length C in every setting."
)


def region_forms(settings: Dict[str, Any]) -> Forms:
    r"""Multiclass: class indices (also ``(N, 1, *)``) or probabilities, else dense masks (binary: one
    channel); one loss per (sample, class), or per class with ``batch`` (totals ``[TP_c, P_c, T_c]``)."""
    batch = bool(settings["batch"])
    targets = ("class_indices", "probabilities") if settings["mode"] == "multiclass" else ("dense",)
    return Forms(
        targets, "C" if batch else "NC", totals=("overlap" if batch else "elementwise",),
        class_totals=("overlap",) if batch else ("elementwise", "overlap"), indices_with_channel=True,
        single_channel=settings["mode"] == "binary",
    )


# What the four region losses declare alike.
_REGION = dict(
    family="region", kind="region", target_range=DENSE_TARGET_RANGE, make_inputs=region_inputs,
    statistics_kernel=region_statistics, reductions_kernel=region_reductions, pixel_weights=True, forms=region_forms,
    variants=VARIANTS, notes=_NOTES, **_SHAPES,
)


def _weights3(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


register(LossSpec(
    name="dice", summary="soft Dice loss on logits (binary, multilabel, multiclass)", module=DiceLoss,
    constants=DiceLoss.constants, function=dice_loss, params=COMMON_PARAMS,
    reference="1 - (2·TP + smooth_nr) / (P + T + smooth_dr) per (sample, class) or per class; "
    "monai.losses.DiceLoss with sigmoid/softmax",
    test_params=(
        {}, {"mode": "multilabel", "class_weight": _weights3(0.5, 2.0, 1.0), "squared_pred": True},
        {"mode": "multiclass", "include_background": False, "ignore_index": 255},
        {"mode": "multiclass", "batch": True, "class_weight": _weights3(1.0, 0.0, 3.0), "log_loss": True},
        {"batch": True, "ignore_index": 255, "smooth_nr": 0.0, "smooth_dr": 0.0},
        {"mode": "multilabel", "batch": True, "include_background": False, "smooth_nr": 1.0, "smooth_dr": 1.0},
        {"mode": "multiclass", "absent_classes": "skip", "smooth_nr": 0.0, "smooth_dr": 1e-8, "ignore_index": 255,
         "class_weight": _weights3(0.5, 2.0, 1.0)},
        {"mode": "multilabel", "batch": True, "absent_classes": "zero", "smooth_nr": 0.0, "smooth_dr": 0.0},
    ),
    paper="Milletari, Navab & Ahmadi 2016, V-Net (3DV); MONAI DiceLoss conventions", **_REGION,
))

register(LossSpec(
    name="iou", summary="soft IoU (Jaccard) loss on logits", module=IoULoss, constants=IoULoss.constants,
    function=iou_loss, params=COMMON_PARAMS,
    reference="1 - (TP + smooth_nr) / (P + T - TP + smooth_dr) per (sample, class) or per class",
    test_params=(
        {}, {"mode": "multiclass", "batch": True, "include_background": False, "ignore_index": 255},
        {"mode": "multilabel", "log_loss": True, "class_weight": _weights3(2.0, 1.0, 0.5), "smooth_nr": 0.0,
         "smooth_dr": 0.0},
        {"mode": "multiclass", "absent_classes": "zero", "include_background": False},
    ),
    paper="Rahman & Wang 2016, Optimizing IoU in deep neural networks (ISVC); Berman et al. 2018, Lovász-softmax (CVPR)",
    **_REGION,
))

register(LossSpec(
    name="tversky", summary="Tversky loss on logits (alpha on false positives, beta on false negatives)",
    module=TverskyLoss, constants=TverskyLoss.constants, function=tversky_loss,
    params=(ALPHA_PARAM, BETA_PARAM) + COMMON_PARAMS,
    reference="1 - (TP + smooth_nr) / (TP + alpha·FP + beta·FN + smooth_dr); monai.losses.TverskyLoss",
    test_params=(
        {}, {"alpha": 0.3, "beta": 0.7, "mode": "multiclass", "ignore_index": 255},
        {"alpha": 0.7, "beta": 0.3, "mode": "multilabel", "batch": True, "squared_pred": True,
         "class_weight": _weights3(1.0, 2.0, 0.5)},
        {"alpha": 1.0, "beta": 0.2, "batch": True, "log_loss": True, "include_background": False},
        {"alpha": 0.3, "beta": 0.7, "mode": "multilabel", "batch": True, "absent_classes": "skip"},
    ),
    paper="Salehi, Erdogmus & Gholipour 2017, Tversky loss function for image segmentation (MLMI)", **_REGION,
))

register(LossSpec(
    name="focal_tversky", summary="focal Tversky loss on logits: (1 - TI)^gamma per class", module=FocalTverskyLoss,
    constants=FocalTverskyLoss.constants, function=focal_tversky_loss,
    params=(FOCAL_ALPHA_PARAM, FOCAL_BETA_PARAM, GAMMA_PARAM) + COMMON_PARAMS,
    reference="max(1 - TI, 0) ** gamma per (sample, class) or per class, TI the Tversky index",
    test_params=(
        {}, {"gamma": 2.0, "mode": "multiclass", "batch": True, "include_background": False,
             "class_weight": _weights3(0.0, 1.0, 2.0)},
        {"gamma": 1.5, "log_loss": True, "mode": "multilabel", "ignore_index": 255, "squared_pred": True},
        {"gamma": 2.0, "mode": "multiclass", "absent_classes": "skip", "log_loss": True},
    ),
    paper="Abraham & Khan 2019, A novel focal Tversky loss function with improved attention U-Net (ISBI); "
    "gamma here is their 1/γ",
    **_REGION,
))

__all__ = [
    "MODES", "RegionLoss", "DiceLoss", "IoULoss", "TverskyLoss", "FocalTverskyLoss", "dice_loss", "iou_loss",
    "tversky_loss", "focal_tversky_loss", "region_statistics", "region_reductions", "region_class_reductions",
    "ABSENT_CLASSES",
    "split_weights",
]
