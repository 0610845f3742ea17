r"""References for ``mse``, ``l1``, ``huber`` and ``smooth_l1``: torch.nn.functional itself.

torch's regression losses take no weights: the reference computes torch's unreduced loss, multiplies
it by the full weight (per-sample ``(N,)`` along dim 0, or broadcast, times ``class_weight`` along
dim 1) and reduces it by the documented rule (``mean`` divides by the element count, as torch).
Unweighted ``none``/``sum``/``mean`` are torch's own reductions.
"""
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
        weight = weight * params["class_weight"].to(predictions.dtype).reshape([1, -1] + [1] * (predictions.dim() - 2))
    return weight


def _weighted(torch_loss, predictions, targets, weights, params, reduction, **hyperparameters):
    if weights is None and params.get("class_weight") is None and reduction != "weighted_mean" and predictions.numel() > 0:
        return torch_loss(predictions, targets, reduction=reduction, **hyperparameters)
    weight = _full_weight(predictions, weights, params)
    values = torch_loss(predictions, targets, reduction="none", **hyperparameters) * weight
    count = torch.tensor(float(values.numel()), dtype=values.dtype)
    return reduce(values, reduction, count, weight.sum())


@reference("mse")
def mse_reference(predictions, targets, weights, params, reduction):
    return _weighted(F.mse_loss, predictions, targets, weights, params, reduction)


@reference("l1")
def l1_reference(predictions, targets, weights, params, reduction):
    return _weighted(F.l1_loss, predictions, targets, weights, params, reduction)


@reference("huber")
def huber_reference(predictions, targets, weights, params, reduction):
    return _weighted(F.huber_loss, predictions, targets, weights, params, reduction, delta=params.get("delta", 1.0))


@reference("smooth_l1")
def smooth_l1_reference(predictions, targets, weights, params, reduction):
    return _weighted(F.smooth_l1_loss, predictions, targets, weights, params, reduction, beta=params.get("beta", 1.0))
