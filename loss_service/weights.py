r"""Class weights for imbalanced data, per-sample weights and a class-balancing sampler.

``class_weights`` turns labels (or class counts) into a per-class vector for a loss's
``class_weight``; ``sample_weights`` looks each label's class weight up; ``make_sampler`` builds a
:class:`torch.utils.data.WeightedRandomSampler` that draws classes in balance.

Input, one of (never both):

* ``labels`` -- integer class indices: a flat vector ``(N,)`` (one label per sample) or label maps
  ``(N, *)`` (segmentation). ``ignore_index`` elements are not counted.
* ``counts=`` -- class counts ``(K,)``, or per-image class counts ``(N, K)`` (what a streaming pass
  over a large segmentation set accumulates; it gives ``median_frequency`` its image-based meaning).

With :math:`n_c` the count of class :math:`c`, :math:`n = \sum_c n_c` and :math:`K` the number of
classes present in the data (:math:`n_c > 0`):

============================  =================================================================
``inverse``                   :math:`1 / n_c`
``max_over_count``            :math:`\max_k n_k / n_c`
``balanced``                  :math:`n / (K n_c)` (scikit-learn's ``"balanced"``, King & Zeng 2001)
``effective_number``          :math:`(1-\beta)/(1-\beta^{n_c})`, scaled to sum to :math:`K` (Cui et al. 2019)
``median_frequency``          :math:`\operatorname{median}_k f_k / f_c` (Eigen & Fergus 2015)
============================  =================================================================

A class declared through ``num_classes`` but absent from the data gets weight **0**: the data say
nothing about it, a weight of 0 keeps it out of class-weighted losses (rather than giving the
class never seen the largest weight of all, the limit of :math:`1/n_c`), and :math:`K` counts only
present classes so that declaring extra classes never changes the weights of the present ones.

Sampling: ``WeightedRandomSampler`` draws sample :math:`i` with probability proportional to its
weight, so class :math:`c` is drawn with probability :math:`\propto n_c w_c`. With inverse-frequency
class weights (``inverse``, ``max_over_count``, ``balanced``, flat ``median_frequency``)
:math:`n_c w_c` is the same for every class: **the sample weight is the class weight itself**. The
often-copied "sample weight = 1 / class weight" gives :math:`n_c^2` and makes the imbalance worse.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import WeightedRandomSampler

METHODS: Tuple[str, ...] = ("inverse", "max_over_count", "balanced", "effective_number", "median_frequency")

__all__ = ["METHODS", "class_weights", "class_counts", "sample_weights", "make_sampler"]


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor, array or list of numbers, got {type(value).__name__}") from error


def _check_num_classes(num_classes: Optional[int]) -> Optional[int]:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_labels(
    labels: Any, num_classes: Optional[int], ignore_index: Optional[int], name: str = "labels"
) -> Tuple[Tensor, Tensor, int]:
    r"""``(labels as int64, mask of counted elements, number of classes)`` after validation."""
    tensor = _as_tensor(labels, name)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name} must be integer class indices, got dtype {tensor.dtype}")
    if tensor.dim() == 0:
        raise ValueError(f"{name} must have a sample dimension (N,) or (N, *), got a scalar")
    tensor = tensor.to(torch.int64)
    counted = torch.ones_like(tensor, dtype=torch.bool) if ignore_index is None else tensor != ignore_index
    if not bool(counted.any()):
        raise ValueError(f"{name} must contain at least one labelled element, got {tensor.numel()} elements"
                         + ("" if ignore_index is None else f", none different from ignore_index={ignore_index}"))
    kept = tensor[counted]
    if bool((kept < 0).any()):
        allowed = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
        raise ValueError(f"{name} must be class indices >= 0{allowed}, got {int(kept.min())}")
    largest = int(kept.max())
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise ValueError(f"{name} must be < num_classes={num_classes}, got {largest}")
    return tensor, counted, num_classes


def class_counts(
    labels: Any, num_classes: Optional[int] = None, ignore_index: Optional[int] = None
) -> Tensor:
    r"""Class counts of ``labels``: ``(K,)`` for a flat ``(N,)`` vector, ``(N, K)`` for label maps ``(N, *)``.

    Per-image counts of label maps are what ``median_frequency`` needs and are additive over
    images, so a large data set can be counted batch by batch (``torch.cat`` the results) and
    passed as ``class_weights(counts=...)``. ``ignore_index`` elements are not counted.
    """
    num_classes = _check_num_classes(num_classes)
    tensor, counted, num_classes = _check_labels(labels, num_classes, ignore_index)
    if tensor.dim() == 1:
        return torch.bincount(tensor[counted], minlength=num_classes).to(torch.float64)
    images = tensor.shape[0]
    flat = tensor.reshape(images, -1)
    # One bincount for every image at once: image i's classes land in bins [i·K, (i+1)·K).
    offsets = torch.arange(images, device=tensor.device).unsqueeze(1) * num_classes
    bins = (flat + offsets)[counted.reshape(images, -1)]
    return torch.bincount(bins, minlength=images * num_classes).reshape(images, num_classes).to(torch.float64)


def _check_counts(counts: Any, num_classes: Optional[int]) -> Tensor:
    tensor = _as_tensor(counts, "counts")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"counts must be real numbers, got dtype {tensor.dtype}")
    if tensor.dim() not in (1, 2) or tensor.shape[-1] == 0:
        raise ValueError(
            f"counts must be a non-empty vector (K,) or per-image counts (N, K), got shape {list(tensor.shape)}"
        )
    tensor = tensor.to(torch.float64)
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError("counts must be finite and >= 0")
    if num_classes is not None and tensor.shape[-1] != num_classes:
        raise ValueError(f"counts must have num_classes={num_classes} entries per row, got {tensor.shape[-1]}")
    if not bool((tensor.sum() > 0)):
        raise ValueError("counts must count at least one element, got all zeros")
    return tensor


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    return float(beta)


def _median(values: Tensor) -> Tensor:
    r"""The usual median: the mean of the two middle values for an even count (``torch.median`` takes the lower)."""
    ordered = values.sort().values
    middle = (ordered.numel() - 1) / 2
    return (ordered[math.floor(middle)] + ordered[math.ceil(middle)]) / 2


def class_weights(
    labels: Any = None,
    method: str = "balanced",
    num_classes: Optional[int] = None,
    *,
    counts: Any = None,
    beta: float = 0.999,
    ignore_index: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Per-class weights, length ``num_classes``, from ``labels`` or from ``counts=``.

    Args:
        labels: integer class indices, ``(N,)`` (one per sample) or label maps ``(N, *)``.
        method: ``inverse`` | ``max_over_count`` | ``balanced`` | ``effective_number`` |
            ``median_frequency`` (formulas in the module docstring and ``docs/class_weights.md``).
        num_classes: number of classes ``C``; default ``max label + 1`` (or the counts' length).
        counts: instead of ``labels``: class counts ``(K,)`` or per-image class counts ``(N, K)``
            (see :func:`class_counts`).
        beta: ``β ∈ [0, 1)`` of ``effective_number``; 0 gives equal weights, ``β → 1`` inverse
            frequencies (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
            CVPR 2019).
        ignore_index: label value that is not counted (label input only).
        dtype: dtype of the result (computed in float64).

    ``median_frequency`` (Eigen & Fergus, "Predicting Depth, Surface Normals and Semantic Labels
    with a Common Multi-Scale Convolutional Architecture", ICCV 2015): on label maps (or per-image
    counts) :math:`f_c` is the count of class ``c`` over the element count of the images that
    contain ``c``; on a flat vector (or ``(K,)`` counts) the plain frequency :math:`n_c / n`.
    The median of an even number of frequencies is the mean of the middle two.

    Absent classes (``n_c = 0``) get weight 0, and the ``K`` of ``balanced``/``effective_number``
    counts the present classes only.

    Returns:
        a ``(num_classes,)`` tensor on the labels' device, ready for a loss's ``class_weight``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    beta = _check_beta(beta)
    num_classes = _check_num_classes(num_classes)
    if (labels is None) == (counts is None):
        raise ValueError("pass exactly one of labels (class indices) and counts= (class counts)")
    if labels is not None:
        per_image = class_counts(labels, num_classes, ignore_index)
    else:
        if ignore_index is not None:
            raise ValueError("ignore_index applies to labels, not to counts")
        per_image = _check_counts(counts, num_classes)
    totals = per_image if per_image.dim() == 1 else per_image.sum(0)
    present = totals > 0
    # Absent classes are computed with a count of 1 and then set to 0, so no inf/NaN is formed.
    safe = torch.where(present, totals, torch.ones_like(totals))
    present_classes = present.sum().to(torch.float64)

    if method == "inverse":
        weights = 1.0 / safe
    elif method == "max_over_count":
        weights = totals.max() / safe
    elif method == "balanced":
        weights = totals.sum() / (present_classes * safe)
    elif method == "effective_number":
        # 1 - β^n as -expm1(n·log β): exact for β near 1 and large n, and 1 for β = 0 (log 0 = -inf).
        log_beta = torch.log(torch.tensor(beta, dtype=torch.float64, device=safe.device))
        weights = (1.0 - beta) / -torch.expm1(safe * log_beta)
        weights = weights * present_classes / weights[present].sum()
    else:
        if per_image.dim() == 2:
            image_sizes = per_image.sum(1, keepdim=True)
            pixels_of_images_with_class = torch.where(per_image > 0, image_sizes, torch.zeros_like(image_sizes)).sum(0)
            frequency = safe / torch.where(present, pixels_of_images_with_class, torch.ones_like(safe))
        else:
            frequency = safe / totals.sum()
        weights = _median(frequency[present]) / frequency
    return torch.where(present, weights, torch.zeros_like(weights)).to(dtype)


def sample_weights(labels: Any, class_weights: Any, ignore_index: Optional[int] = None) -> Tensor:
    r"""The weight of each label's class: ``class_weights[labels]``, same shape as ``labels``.

    For ``(N,)`` labels this is the per-sample weight of a sampler or of a loss's ``weights``;
    for label maps ``(N, *)`` a per-element ``weights`` tensor. ``ignore_index`` elements get 0.
    With inverse-frequency class weights this *is* the balancing sample weight (not its inverse).
    """
    vector = _as_tensor(class_weights, "class_weights")
    if vector.dim() != 1 or vector.numel() == 0 or not (vector.is_floating_point() or vector.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"class_weights must be a non-empty real vector (C,), got shape {list(vector.shape)}, dtype {vector.dtype}")
    if not vector.is_floating_point():
        vector = vector.to(torch.float64)
    if not bool(torch.isfinite(vector).all()) or bool((vector < 0).any()):
        raise ValueError("class_weights must be finite and >= 0")
    tensor, counted, _ = _check_labels(labels, vector.numel(), ignore_index)
    vector = vector.to(tensor.device)
    looked_up = vector[torch.where(counted, tensor, torch.zeros_like(tensor))]
    return torch.where(counted, looked_up, torch.zeros_like(looked_up))


def make_sampler(
    labels: Any,
    method: str = "balanced",
    num_samples: Optional[int] = None,
    replacement: bool = True,
    generator: Optional[torch.Generator] = None,
    *,
    beta: float = 0.999,
) -> WeightedRandomSampler:
    r"""A :class:`~torch.utils.data.WeightedRandomSampler` over a data set with labels ``(N,)``.

    Sample ``i`` is drawn with probability :math:`\propto w_{y_i}` (``class_weights(labels, method)``),
    so class ``c`` comes out with probability :math:`\propto n_c w_c`: equal for every class with
    ``inverse``, ``max_over_count``, ``balanced`` and ``median_frequency``; in between the data's
    frequencies and equal ones with ``effective_number`` (``beta``).

    Args:
        labels: one integer class per sample, ``(N,)``.
        num_samples: samples per epoch, default ``N``.
        replacement: draw with replacement (needed to oversample rare classes beyond their count).
        generator: the sampler's random generator, for reproducible epochs.
    """
    tensor = _as_tensor(labels, "labels")
    if tensor.dim() != 1:
        raise ValueError(f"labels must be one class per sample, shape (N,), got {list(tensor.shape)}")
    if num_samples is None:
        num_samples = tensor.numel()
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(replacement, bool):
        raise ValueError(f"replacement must be a bool, got {type(replacement).__name__}")
    if not replacement and num_samples > tensor.numel():
        raise ValueError(f"num_samples must be <= the {tensor.numel()} labels when replacement=False, got {num_samples}")
    weights = sample_weights(tensor, class_weights(tensor, method, beta=beta, dtype=torch.float64))
    return WeightedRandomSampler(weights, int(num_samples), replacement=replacement, generator=generator)
