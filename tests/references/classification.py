r"""References for ``cross_entropy``, ``nll``, ``binary_focal`` and ``focal``.

``cross_entropy`` and ``nll`` are torch.nn.functional itself; ``binary_focal`` is the documented
formula of ``torchvision.ops.sigmoid_focal_loss`` (torchvision cannot be installed here); ``focal``
is the formula of Lin et al. 2017 written out class by class with plain ``(1 - p) ** gamma``.
Call-time ``weights`` multiply the per-element losses; the ``mean`` denominator is torch's.
"""
import torch
import torch.nn.functional as F

from . import reduce, reference
from .bce import ignored


def _per_element(weights, loss):
    r"""Call-time weights as a tensor of the elementwise shape (``(N,)`` means per sample)."""
    if weights is None:
        return torch.ones_like(loss)
    w = weights.to(loss.dtype)
    if w.dim() == 1 and loss.dim() > 1 and w.shape[0] == loss.shape[0]:
        w = w.reshape([-1] + [1] * (loss.dim() - 1))
    return torch.ones_like(loss) * w


def _target_class_weight(targets, params, dtype):
    r"""``d``: the class weight of each target (1 without class weights), 0 where ignored."""
    ignore_index = params.get("ignore_index", -100)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    class_weight = params.get("class_weight")
    weight = torch.ones(safe.shape, dtype=dtype) if class_weight is None else class_weight.to(dtype)[safe]
    return weight * valid.to(dtype)


def _reduce_index_targets(loss, targets, weights, params, reduction, class_weight=None):
    sample = _per_element(weights, loss)
    denominator = _target_class_weight(targets, dict(params, class_weight=class_weight), loss.dtype)
    return reduce(loss * sample, reduction, denominator.sum(), (sample * denominator).sum())


@reference("cross_entropy")
def cross_entropy_reference(predictions, targets, weights, params, reduction):
    class_weight = params.get("class_weight")
    if class_weight is not None:
        class_weight = class_weight.to(predictions.dtype)
    loss = F.cross_entropy(
        predictions,
        targets,
        weight=class_weight,
        ignore_index=params.get("ignore_index", -100),
        label_smoothing=params.get("label_smoothing", 0.0),
        reduction="none",
    )
    if targets.dim() == predictions.dim():
        # Probability targets: torch's mean divides by the number of elements N·d1..dk.
        sample = _per_element(weights, loss)
        count = torch.tensor(float(loss.numel()), dtype=loss.dtype)
        return reduce(loss * sample, reduction, count, sample.sum())
    return _reduce_index_targets(loss, targets, weights, params, reduction, class_weight)


@reference("nll")
def nll_reference(predictions, targets, weights, params, reduction):
    class_weight = params.get("class_weight")
    if class_weight is not None:
        class_weight = class_weight.to(predictions.dtype)
    loss = F.nll_loss(
        predictions, targets, weight=class_weight, ignore_index=params.get("ignore_index", -100), reduction="none"
    )
    return _reduce_index_targets(loss, targets, weights, params, reduction, class_weight)


@reference("binary_focal")
def binary_focal_reference(predictions, targets, weights, params, reduction):
    alpha = params.get("alpha", 0.25)
    gamma = params.get("gamma", 2.0)
    targets, kept, count = ignored(targets, params)
    p = torch.sigmoid(predictions)
    # pos_weight as torch's binary_cross_entropy_with_logits weighs the positive term (along dim 1 here).
    pos_weight = params.get("pos_weight")
    if pos_weight is not None:
        pos_weight = pos_weight.to(predictions.dtype).reshape([-1] + [1] * (predictions.dim() - 2))
    ce = F.binary_cross_entropy_with_logits(predictions, targets, reduction="none", pos_weight=pos_weight)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    weight = _per_element(weights, loss) * kept
    if params.get("class_weight") is not None:
        weight = weight * params["class_weight"].to(loss.dtype).reshape([1, -1] + [1] * (loss.dim() - 2))
    # torchvision's mean is the plain mean over elements (those not ignored, unless ignored_in_mean).
    return reduce(loss * weight, reduction, count, weight.sum())


def _focal_alpha(params, num_classes, dtype):
    alpha = params.get("alpha")
    if alpha is None:
        return torch.ones(num_classes, dtype=dtype)
    if isinstance(alpha, float):
        # The blog's scalar form: alpha for class balance_index, 1 - alpha for the others.
        vector = torch.full((num_classes,), 1 - alpha, dtype=dtype)
        vector[params.get("balance_index", 0)] = alpha
        return vector
    return torch.as_tensor(alpha).to(dtype)


@reference("focal")
def focal_reference(predictions, targets, weights, params, reduction):
    gamma = params.get("gamma", 2.0)
    epsilon = params.get("label_smoothing", 0.0)
    num_classes = predictions.shape[1]
    class_weight = _focal_alpha(params, num_classes, predictions.dtype)
    if params.get("class_weight") is not None:
        class_weight = class_weight * params["class_weight"].to(predictions.dtype)
    p = torch.softmax(predictions, 1)
    per_class = (1 - p) ** gamma * -torch.log(p) * class_weight.reshape([1, -1] + [1] * (predictions.dim() - 2))
    if targets.dim() == predictions.dim():
        q = (1 - epsilon) * targets + epsilon / num_classes
        loss = (q * per_class).sum(1)
        sample = _per_element(weights, loss)
        count = torch.tensor(float(loss.numel()), dtype=loss.dtype)
        return reduce(loss * sample, reduction, count, sample.sum())
    ignore_index = params.get("ignore_index", -100)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    target_term = per_class.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = (1 - epsilon) * target_term + epsilon / num_classes * per_class.sum(1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce_index_targets(loss, targets, weights, params, reduction, class_weight)
