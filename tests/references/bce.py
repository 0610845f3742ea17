r"""References for ``bce`` and ``bce_with_logits``: torch.nn.functional itself."""
import torch
import torch.nn.functional as F

from . import reduce, reference


def _full_weight(predictions, weights, params):
    weight = torch.ones_like(predictions)
    if weights is not None:
        w = weights.to(predictions.dtype)
        if w.dim() == 1 and predictions.dim() > 1 and w.shape[0] == predictions.shape[0]:
            w = w.reshape([-1] + [1] * (predictions.dim() - 1))
        weight = weight * w
    if params.get("class_weight") is not None:
        weight = weight * _along_dim1(params["class_weight"], predictions)
    return weight


def _along_dim1(vector, predictions):
    return vector.to(predictions.dtype).reshape([1, -1] + [1] * (predictions.dim() - 2))


def _torch_reduced(loss_none, weight, reduction):
    return reduce(loss_none, reduction, torch.tensor(float(loss_none.numel()), dtype=loss_none.dtype), weight.sum())


@reference("bce")
def bce_reference(predictions, targets, weights, params, reduction):
    weight = _full_weight(predictions, weights, params)
    loss = F.binary_cross_entropy(predictions, targets, weight=weight, reduction="none")
    if reduction in ("mean", "sum", "none"):
        torch_result = F.binary_cross_entropy(predictions, targets, weight=weight, reduction=reduction)
        if predictions.numel() > 0:
            return torch_result
    return _torch_reduced(loss, weight, reduction)


def ignored(targets, params):
    r"""``(targets with 0 where ignored, the not-ignored mask as 0/1, the mean's element count)`` of a binary loss
    with an optional ``ignore_index`` (segmentation_models_pytorch's SoftBCEWithLogitsLoss masks so)."""
    ignore_index = params.get("ignore_index")
    kept = torch.ones_like(targets) if ignore_index is None else (targets != ignore_index).to(targets.dtype)
    count = kept.sum() if ignore_index is not None and not params.get("ignored_in_mean") else float(kept.numel())
    return targets * kept, kept, torch.as_tensor(count, dtype=targets.dtype)


@reference("bce_with_logits")
def bce_with_logits_reference(predictions, targets, weights, params, reduction):
    targets, kept, count = ignored(targets, params)
    weight = _full_weight(predictions, weights, params) * kept
    # Label smoothing as segmentation_models_pytorch's SoftBCEWithLogitsLoss writes it, whose
    # smooth_factor is half of torch's (two-outcome) label_smoothing.
    smooth_factor = params.get("label_smoothing", 0.0) / 2
    targets = (1 - targets) * smooth_factor + targets * (1 - smooth_factor)
    pos_weight = params.get("pos_weight")
    if pos_weight is not None:
        pos_weight = _along_dim1(pos_weight, predictions)[0]
    loss = F.binary_cross_entropy_with_logits(predictions, targets, weight=weight, pos_weight=pos_weight, reduction="none")
    if params.get("ignore_index") is None and reduction in ("mean", "sum", "none") and predictions.numel() > 0:
        return F.binary_cross_entropy_with_logits(
            predictions, targets, weight=weight, pos_weight=pos_weight, reduction=reduction
        )
    return reduce(loss, reduction, count, weight.sum())
