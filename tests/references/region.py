r"""References for the region losses and ``bce_dice``: the formulas written out in float64.

Each index is written in its own textbook form (Dice ``(2I + s)/(P + T + s)``, IoU
``(I + s)/(P + T - I + s)``, Tversky ``(I + s)/(I + α·FP + β·FN + s)``) with explicit loops over
samples and classes, and the project's documented conventions: a 0/0 index is 1, the background
class is dropped with ``include_background=False`` when there are several channels (its column of
``none`` is 0), ``mean`` divides by the number of kept (sample, class) pairs (or kept classes with
``batch``), ``weighted_mean`` by the sum of the loss weights.
"""
import torch
import torch.nn.functional as F

from . import reduce, reference

DEFAULTS = {
    "smooth_nr": 1e-5, "smooth_dr": 1e-5, "include_background": True, "squared_pred": False, "log_loss": False,
    "ignore_index": -100, "class_weight": None, "mode": "binary", "batch": False, "absent_classes": "count",
}


def _setting(params, **loss_defaults):
    setting = dict(DEFAULTS, **loss_defaults)
    setting.update(params)
    return setting


def _dense(predictions, targets, weights, s):
    r"""``(probabilities, targets, pixel_weight, sample_weight)``: ``(N, C, S)`` float64 and ``(N,)``."""
    x = predictions.double()
    n = x.shape[0]
    if s["mode"] == "multiclass":
        c = x.shape[1]
        probabilities = torch.softmax(x, dim=1).reshape(n, c, -1)
        index = targets.reshape(n, -1)
        valid = (index != s["ignore_index"]).double()
        dense = torch.stack([(index == k).double() for k in range(c)], dim=1)
        pixel = valid.unsqueeze(1).expand(n, c, -1).clone()
    else:
        c = 1 if s["mode"] == "binary" else x.shape[1]
        probabilities = torch.sigmoid(x).reshape(n, c, -1)
        t = targets.double().reshape(n, c, -1)
        ignored = t == s["ignore_index"]
        dense = torch.where(ignored, torch.zeros_like(t), t)
        pixel = (~ignored).double()
    sample = torch.ones(n, dtype=torch.float64)
    if weights is not None:
        w = weights.double()
        if w.dim() == 1 and x.dim() > 1 and w.shape[0] == n:
            sample = w
        else:
            pixel = pixel * w.expand(predictions.shape).reshape(n, c, -1)
    return probabilities, dense, pixel, sample


def _index(name, tp, p, t, s):
    nr, dr = s["smooth_nr"], s["smooth_dr"]
    if name == "dice":
        numerator, denominator = 2 * tp + nr, p + t + dr
    elif name == "iou":
        numerator, denominator = tp + nr, p + t - tp + dr
    else:
        numerator, denominator = tp + nr, tp + s["alpha"] * (p - tp) + s["beta"] * (t - tp) + dr
    return 1.0 if denominator == 0 else numerator / denominator


def _loss(name, index, s):
    loss = -torch.log(torch.clamp(torch.as_tensor(index, dtype=torch.float64), min=1e-7)) if s["log_loss"] else 1.0 - torch.as_tensor(index, dtype=torch.float64)
    if name == "focal_tversky":
        loss = torch.clamp(loss, min=0.0) ** s["gamma"]
    return loss


def _class_weights(c, s):
    kept = torch.ones(c, dtype=torch.float64)
    if not s["include_background"] and c > 1:
        kept[0] = 0.0
    class_weight = torch.ones(c, dtype=torch.float64) if s["class_weight"] is None else s["class_weight"].double()
    return kept, class_weight * kept


def _absent_rule(name, losses, targets, kept, loss_weight, s):
    r"""``(losses, weights, mean denominators)`` of one row of class losses under ``absent_classes``, written
    out: count -- as they are; zero -- 0 for a class with no target (segmentation_models_pytorch); skip -- the
    average over the classes with a target, weighted by their class weights (kornia's macro Dice), or the loss of
    a zero index when no weighted class has one."""
    present = targets > 0
    rule = s["absent_classes"]
    if rule == "count":
        return losses, loss_weight, kept
    if rule == "zero":
        return losses * present.double(), loss_weight, kept
    share = loss_weight * present.double()
    if float(share.sum()) > 0:
        return losses, share / share.sum(), share / share.sum()
    uniform = kept / max(float(kept.sum()), 1.0)
    return torch.full_like(losses, float(_loss(name, 0.0, s))), uniform, uniform


def region_reference(name, predictions, targets, weights, params, reduction, **loss_defaults):
    s = _setting(params, **loss_defaults)
    probabilities, dense, pixel, sample = _dense(predictions, targets, weights, s)
    n, c, _ = probabilities.shape
    pred_term = probabilities ** 2 if s["squared_pred"] else probabilities
    target_term = dense ** 2 if s["squared_pred"] else dense
    kept, loss_weight = _class_weights(c, s)
    if s["batch"]:
        losses = torch.zeros(c, dtype=torch.float64)
        target_sums = torch.zeros(c, dtype=torch.float64)
        for k in range(c):
            tp = sum(float(sample[i] * (pixel[i, k] * probabilities[i, k] * dense[i, k]).sum()) for i in range(n))
            p = sum(float(sample[i] * (pixel[i, k] * pred_term[i, k]).sum()) for i in range(n))
            t = sum(float(sample[i] * (pixel[i, k] * target_term[i, k]).sum()) for i in range(n))
            losses[k] = _loss(name, _index(name, tp, p, t, s), s)
            target_sums[k] = t
        losses, weight, denominator = _absent_rule(name, losses, target_sums, kept, loss_weight, s)
        return reduce(losses * weight, reduction, denominator.sum(), weight.sum())
    losses = torch.zeros(n, c, dtype=torch.float64)
    weight = torch.zeros(n, c, dtype=torch.float64)
    denominator = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        target_sums = torch.zeros(c, dtype=torch.float64)
        for k in range(c):
            tp = float((pixel[i, k] * probabilities[i, k] * dense[i, k]).sum())
            p = float((pixel[i, k] * pred_term[i, k]).sum())
            t = float((pixel[i, k] * target_term[i, k]).sum())
            losses[i, k] = _loss(name, _index(name, tp, p, t, s), s)
            target_sums[k] = t
        losses[i], row_weight, denominator[i] = _absent_rule(name, losses[i], target_sums, kept, loss_weight, s)
        weight[i] = sample[i] * row_weight
    return reduce(losses * weight, reduction, denominator.sum(), weight.sum())


@reference("dice")
def dice_reference(predictions, targets, weights, params, reduction):
    return region_reference("dice", predictions, targets, weights, params, reduction)


@reference("iou")
def iou_reference(predictions, targets, weights, params, reduction):
    return region_reference("iou", predictions, targets, weights, params, reduction)


@reference("tversky")
def tversky_reference(predictions, targets, weights, params, reduction):
    return region_reference("tversky", predictions, targets, weights, params, reduction, alpha=0.5, beta=0.5)


@reference("focal_tversky")
def focal_tversky_reference(predictions, targets, weights, params, reduction):
    return region_reference(
        "focal_tversky", predictions, targets, weights, params, reduction, alpha=0.3, beta=0.7, gamma=0.75
    )


def _generalized_dice(tp, p, t, kept, class_weight, exponent, s):
    r"""Sudre et al.'s index over the kept classes, written class by class: w = 1/T^k, an absent class
    taking the largest weight of the present ones (MONAI)."""
    weights = []
    for k in range(len(tp)):
        if not kept[k]:
            weights.append(0.0)
        elif t[k] > 0 or exponent == 0:
            weights.append(1.0 / t[k] ** exponent)
        else:
            weights.append(None)
    largest = max([w for w in weights if w is not None] or [0.0])
    weights = [(largest if w is None else w) * float(f) for w, f in zip(weights, class_weight)]
    numerator = 2 * sum(w * a for w, a in zip(weights, tp)) + s["smooth_nr"]
    denominator = sum(w * (a + b) for w, a, b in zip(weights, p, t)) + s["smooth_dr"]
    return 1.0 - (1.0 if denominator == 0 else numerator / denominator)


@reference("generalized_dice")
def generalized_dice_reference(predictions, targets, weights, params, reduction):
    s = _setting(params, weight_exponent=2.0)
    probabilities, dense, pixel, sample = _dense(predictions, targets, weights, s)
    n, c, _ = probabilities.shape
    kept, class_weight = _class_weights(c, s)

    def sums(i):
        return ([float((pixel[i, k] * probabilities[i, k] * dense[i, k]).sum()) for k in range(c)],
                [float((pixel[i, k] * probabilities[i, k]).sum()) for k in range(c)],
                [float((pixel[i, k] * dense[i, k]).sum()) for k in range(c)])

    if s["batch"]:
        per_sample = [sums(i) for i in range(n)]
        pooled = [[sum(float(sample[i]) * per_sample[i][j][k] for i in range(n)) for k in range(c)] for j in range(3)]
        loss = torch.tensor([_generalized_dice(*pooled, kept, class_weight, s["weight_exponent"], s)], dtype=torch.float64)
        return reduce(loss, reduction, torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    losses = torch.tensor([_generalized_dice(*sums(i), kept, class_weight, s["weight_exponent"], s) for i in range(n)], dtype=torch.float64)
    return reduce(losses * sample, reduction, torch.tensor(float(n), dtype=torch.float64), sample.sum())


def _bce_part(predictions, targets, weights, params, reduction):
    r"""torch's BCE-with-logits on the ``(N, C, S)`` view, ignored positions weighted 0 and not counted."""
    s = _setting(params)
    _, dense, pixel, sample = _dense(predictions, targets, weights, s)
    n, c, _ = dense.shape
    logits = predictions.double().reshape(n, c, -1)
    weight = pixel * sample.reshape(n, 1, 1)
    if params.get("class_weight") is not None:
        weight = weight * params["class_weight"].double().reshape(1, c, 1)
    pos_weight = params.get("pos_weight")
    if pos_weight is not None:
        pos_weight = pos_weight.double().reshape(c, 1)
    loss = F.binary_cross_entropy_with_logits(logits, dense, weight=weight, pos_weight=pos_weight, reduction="none")
    counted = (_dense(predictions, targets, None, s)[2] != 0).double().sum()
    return reduce(loss, reduction, counted, weight.sum())


@reference("bce_dice")
def bce_dice_reference(predictions, targets, weights, params, reduction):
    bce_weight = params.get("bce_weight", 1.0)
    dice_weight = params.get("dice_weight", 1.0)
    dice_params = {k: v for k, v in params.items() if k not in ("pos_weight", "bce_weight", "dice_weight")}
    if reduction == "none":
        # Per sample: the combined loss of that sample alone under the ``mean`` rule.
        return torch.stack(
            [
                bce_dice_reference(
                    predictions[i:i + 1], targets[i:i + 1], None if weights is None else weights[i:i + 1], params, "mean"
                )
                for i in range(predictions.shape[0])
            ]
        ) if predictions.shape[0] > 0 else torch.zeros(0, dtype=torch.float64)
    return bce_weight * _bce_part(predictions, targets, weights, params, reduction) + dice_weight * region_reference(
        "dice", predictions, targets, weights, dice_params, reduction
    )
