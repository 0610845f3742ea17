r"""Evaluation in the library: the loss of every group of samples and of every class, and mergeable statistics
(docs/evaluation.md).

:func:`score` is what ``ScoreBatch`` answers, in process: the loss of a batch, with ``group_ids`` the loss
of each group exactly as if it had been scored alone (a group's totals are the sum of its samples' totals,
``statistics(..., per_sample=True)``), with ``per_class`` the loss of each class (and a region loss's index,
e.g. the Dice score, of each class) from the class totals (``statistics(..., per_class=True)``), and the
batch's :class:`~loss_service.statistics.Statistics`.
:func:`~loss_service.statistics.merge` adds statistics of disjoint data (shards, workers, days) and
:func:`evaluate` gives their value, which equals :func:`score` on all the data at once. The server builds
its answers with the same functions (:mod:`loss_service.server.scoring`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from loss_service import losses
from loss_service.losses import Forms, LossSpec
from loss_service.statistics import Statistics, merge, sum_by_label

# Column of each reduction in a reductions kernel's output; for "none" the loss of a group, a stream and a
# merge is the "sum" column.
REDUCTION_COLUMN = {"sum": 0, "mean": 1, "weighted_mean": 2, "none": 0}
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class Evaluation:
    r"""The value of some statistics: the loss (the reduction's column; the sum for ``none``), the
    ``weighted_mean`` and ``mean`` denominators and the element count (:func:`summarize`), with groups
    their labels (int64 ``(G,)``, ascending) and losses (float64 ``(G,)``), and per class the loss of each
    class (float64 ``(C,)``, the reduction's column) and, for a loss with an overlap index (``Forms.class_index``),
    each class's index over the data (float64 ``(C,)``, e.g. its Dice score)."""

    loss: float
    weight_sum: float
    denominator: float
    num_elements: int
    group_ids: Optional[np.ndarray]
    group_losses: Optional[np.ndarray]
    statistics: Statistics
    class_losses: Optional[np.ndarray] = None
    class_scores: Optional[np.ndarray] = None


def summarize(forms: Forms, totals: Tensor) -> Tuple[float, float, int]:
    r"""``(weight_sum, denominator, num_elements)`` of totals (float64 ``(K,)``, on the host).

    Totals that begin with the elementwise block ``[Σ w·ℓ, Σ w, Σ d, n]`` give its entries; totals of an
    overlap block alone (region losses with ``batch=True``: ``[TP_c, P_c, T_c]`` of the whole data) give
    the number of loss terms for all three: one per class, or one (``Forms.values`` ``"1"``).
    """
    if not forms.elementwise_totals:
        terms = 1 if forms.values == "1" else forms.classes_of(totals.shape[-1]) or 0
        return float(terms), float(terms), terms
    _, weight_sum, denominator, count = totals.tolist()[:4]
    return weight_sum, denominator, int(count)


def canonical_params(spec: LossSpec, params: Dict[str, Any]) -> Dict[str, Any]:
    r"""``params`` (validated) with every other hyperparameter at its default, the reduction left out and
    per-class vectors as numpy arrays (unset ones left out): what :class:`Statistics` compare."""
    canonical: Dict[str, Any] = {}
    for param in spec.params:
        if param.name == "reduction":
            continue
        value = params.get(param.name, param.default)
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        if value is not None:
            canonical[param.name] = value
    return canonical


def group_labels(group_ids: Any, num_samples: int) -> np.ndarray:
    r"""``group_ids`` as int64 ``(N,)`` labels; ``ValueError`` naming ``group_ids`` otherwise."""
    ids = torch.as_tensor(group_ids) if not isinstance(group_ids, Tensor) else group_ids
    if ids.dtype not in INTEGER_DTYPES:
        raise ValueError(f"group_ids must be integer labels (int64, int32, int16, int8 or uint8), got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != num_samples:
        raise ValueError(f"group_ids must have one label per sample, shape ({num_samples},), got {list(ids.shape)}")
    return ids.detach().cpu().numpy().astype(np.int64, copy=False)


def make_statistics(
    spec: LossSpec, params: Dict[str, Any], reduction: str, forms: Forms, totals: Tensor,
    groups: Optional[Tuple[np.ndarray, Tensor]] = None, num_batches: int = 1, class_totals: Optional[Tensor] = None,
) -> Statistics:
    r"""The :class:`Statistics` of ``totals`` (and of ``groups`` = ``(labels (N,), sample_totals (N, K))``, and of
    ``class_totals`` ``(C, K_c)``)."""
    totals = totals.detach().to("cpu", torch.float64).numpy()
    num_classes = forms.classes_of(totals.shape[0])
    if num_classes is None:
        raise ValueError(f"loss '{spec.name}' returned {totals.shape[0]} totals, which its Forms {forms.totals} do not allow")
    group_ids = group_totals = None
    if groups is not None:
        labels, sample_totals = groups
        group_ids, group_totals = sum_by_label(labels, sample_totals.detach().to("cpu", torch.float64).numpy())
    class_layout = None
    if class_totals is not None:
        class_layout = forms.class_totals_layout()
        class_totals = class_totals.detach().to("cpu", torch.float64).numpy()
    return Statistics(
        loss=spec.name, params=canonical_params(spec, params), reduction=reduction,
        layout=forms.totals_layout(num_classes), totals=totals, group_ids=group_ids, group_totals=group_totals,
        num_batches=num_batches, class_layout=class_layout, class_totals=class_totals,
    )


def statistics(
    loss: str, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, *, group_ids: Any = None,
    per_class: bool = False, reduction: str = "mean", **params: Any,
) -> Statistics:
    r"""The :class:`Statistics` of one batch scored with loss ``loss`` and hyperparameters ``params`` (as
    :func:`loss_service.losses.build` takes them); ``group_ids``: ``(N,)`` integer labels of the samples;
    ``per_class``: with the class totals too."""
    spec = losses.get(loss)
    params = spec.validate(dict(params, reduction=reduction))
    module = spec.module(**params)
    labels = None if group_ids is None else group_labels(group_ids, predictions.shape[0] if predictions.dim() else 0)
    with torch.no_grad():
        by_sample = labels is not None
        _, totals, parts = module.statistics(predictions, targets, weights, by_sample, False, per_class and not by_sample)
        groups = class_totals = None
        if by_sample:
            groups = (labels, parts)
            if per_class:
                # One breakdown per kernel call: the class totals take a second pass.
                _, _, class_totals = module.statistics(predictions, targets, weights, False, False, True)
        elif per_class:
            class_totals = parts
    return make_statistics(spec, params, reduction, spec.forms_of(params), totals, groups, class_totals=class_totals)


def evaluate(stats: Statistics) -> Evaluation:
    r"""The value of ``stats``: for merged statistics, the value of scoring all their data at once."""
    spec = losses.get(stats.loss)
    params = spec.validate(dict(stats.params, reduction=stats.reduction))
    forms = spec.forms_of(params)
    if forms.classes_of_layout(tuple(stats.layout)) is None:
        expected = forms.totals_layout(1)
        raise ValueError(
            f"layout of {len(stats.layout)} entries is not the totals of loss '{stats.loss}' with these parameters "
            f"(e.g. {', '.join(expected[:4])}{', ...' if len(expected) > 4 else ''} for one class)"
        )
    if stats.per_class:
        check_class_totals(stats, forms)
    module = spec.module(**params)
    column = REDUCTION_COLUMN[stats.reduction]
    totals = torch.from_numpy(np.asarray(stats.totals, dtype=np.float64))
    with torch.no_grad():
        loss = float(module.reductions(totals)[column])
        group_losses = class_losses = class_scores = None
        if stats.grouped:
            group_totals = torch.from_numpy(np.asarray(stats.group_totals, dtype=np.float64))
            group_losses = module.reductions(group_totals)[:, column].numpy()
        if stats.per_class:
            class_losses, class_scores = class_values(
                forms, module, torch.from_numpy(np.asarray(stats.class_totals, dtype=np.float64)), column
            )
    weight_sum, denominator, num_elements = summarize(forms, totals)
    return Evaluation(
        loss, weight_sum, denominator, num_elements, stats.group_ids, group_losses, stats, class_losses, class_scores
    )


def check_class_totals(stats: Statistics, forms: Forms) -> None:
    r"""``ValueError`` unless the class totals of ``stats`` have the loss's class layout and, for totals with an
    overlap block, as many classes as the totals."""
    if tuple(stats.class_layout or ()) != forms.class_totals_layout():
        raise ValueError(
            f"class layout {list(stats.class_layout or ())} is not the class totals of loss '{stats.loss}' with these "
            f"parameters: expected {list(forms.class_totals_layout())}"
        )
    num_classes = forms.classes_of(len(stats.layout))
    if num_classes and np.shape(stats.class_totals)[0] != num_classes:
        raise ValueError(
            f"class totals have {np.shape(stats.class_totals)[0]} classes, the totals {num_classes}; expected the same"
        )


def class_values(
    forms: Forms, module: torch.nn.Module, class_totals: Tensor, column: int
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    r"""``(class_losses, class_scores)`` of float64 ``(C, K_c)`` class totals: each class's loss in the reduction's
    ``column``, and its overlap index for a loss that has one (``None`` otherwise)."""
    reductions = module.class_reductions(class_totals)
    scores = reductions[:, 3].numpy() if forms.class_index else None
    return reductions[:, column].numpy(), scores


def score(
    loss: str, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, *, group_ids: Any = None,
    per_class: bool = False, reduction: str = "mean", **params: Any,
) -> Evaluation:
    r"""One batch's :class:`Evaluation`: :func:`evaluate` of its :func:`statistics`."""
    return evaluate(
        statistics(
            loss, predictions, targets, weights, group_ids=group_ids, per_class=per_class, reduction=reduction, **params
        )
    )


__all__ = ["Evaluation", "Statistics", "evaluate", "merge", "score", "statistics", "summarize"]
