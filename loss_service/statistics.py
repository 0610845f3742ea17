r"""Mergeable results: the additive sufficient statistics of scored data (numpy only, no torch, no gRPC).

Every loss reduces *totals*, a float64 vector whose value for the union of disjoint data is the sum of
theirs (docs/architecture.md, "Statistics and reductions"). A :class:`Statistics` carries them with what
makes them meaningful -- the loss, its hyperparameters, the reduction and the name of each entry -- and,
for data scored with ``group_ids``, the totals of every group, and for data scored per class, the totals of
every class (one row each, additive too). :func:`merge` adds any number of them into
the statistics of the union, refusing statistics of different losses or settings; the value of merged
statistics is ``loss_service.evaluation.evaluate`` (the library) or ``LossClient.merge`` (the service).
The wire form is the ``loss_service.v1.Statistics`` message (:mod:`loss_service.codec`), version
:data:`STATISTICS_VERSION`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Optional, Tuple

import numpy as np

STATISTICS_VERSION = 1
# The largest num_batches (and element count) the wire's int64 fields hold.
INT64_MAX = 2**63 - 1
# Distinct group labels in one result (per request, per stream, per merge): a group costs a row of
# totals in every message that carries them.
MAX_GROUPS = 65536


def _key(value: Any) -> Any:
    r"""A hyperparameter value as a comparable key: a vector by its dtype and bytes, a number as it is."""
    if isinstance(value, np.ndarray):
        return ("vector", value.dtype.str, value.shape, value.tobytes())
    return value


@dataclass(frozen=True, eq=False)
class Statistics:
    r"""The statistics of some scored data (the fields of the ``Statistics`` message).

    ``params`` holds every hyperparameter but the reduction with defaults filled in (scalars as Python
    numbers, bools and strings; per-class vectors as 1-D float32/float64 arrays, absent when unset);
    ``layout`` names each entry of ``totals`` (float64 ``(K,)``); ``group_ids`` (int64 ``(G,)``,
    ascending) and ``group_totals`` (float64 ``(G, K)``) are ``None`` for data scored without groups;
    ``class_layout`` names each column of ``class_totals`` (float64 ``(C, K_c)``, a row per class), both
    ``None`` for data scored without ``per_class``.
    """

    loss: str
    params: Mapping[str, Any]
    reduction: str
    layout: Tuple[str, ...]
    totals: np.ndarray
    group_ids: Optional[np.ndarray] = None
    group_totals: Optional[np.ndarray] = None
    num_batches: int = 1
    class_layout: Optional[Tuple[str, ...]] = None
    class_totals: Optional[np.ndarray] = None
    version: int = field(default=STATISTICS_VERSION)

    def settings(self) -> Tuple[Any, ...]:
        r"""What two statistics must share to be merged: version, loss, parameters, reduction, layout."""
        params = tuple(sorted((name, _key(value)) for name, value in self.params.items()))
        return self.version, self.loss, params, self.reduction, tuple(self.layout)

    @property
    def grouped(self) -> bool:
        return self.group_ids is not None

    @property
    def per_class(self) -> bool:
        return self.class_totals is not None

    def class_shape(self) -> Optional[Tuple[Any, ...]]:
        r"""What two statistics per class must share: the class count and the class layout."""
        if self.class_totals is None:
            return None
        return self.class_totals.shape[0], tuple(self.class_layout or ())


def _difference(first: Statistics, other: Statistics) -> str:
    r"""What differs between the settings of two statistics, in words."""
    if other.version != first.version:
        return f"version {other.version} vs {first.version}"
    if other.loss != first.loss:
        return f"loss '{other.loss}' vs '{first.loss}'"
    names = sorted(set(first.params) | set(other.params))
    for name in names:
        if _key(other.params.get(name)) != _key(first.params.get(name)):
            return f"parameter '{name}' {other.params.get(name)!r} vs {first.params.get(name)!r}"
    if other.reduction != first.reduction:
        return f"reduction '{other.reduction}' vs '{first.reduction}'"
    return f"layout of {len(other.layout)} entries {list(other.layout)[:8]} vs {len(first.layout)} {list(first.layout)[:8]}"


def sum_by_label(labels: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    r"""``(distinct labels ascending, the float64 sum of the rows of each)`` of ``labels`` ``(M,)`` and ``rows``
    ``(M, K)``; ``ValueError`` beyond :data:`MAX_GROUPS` labels."""
    distinct, inverse = np.unique(labels, return_inverse=True)
    if distinct.size > MAX_GROUPS:
        raise ValueError(f"group_ids: {distinct.size} distinct groups; expected at most {MAX_GROUPS}")
    sums = np.zeros((distinct.size, rows.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse.reshape(-1), rows)
    return distinct.astype(np.int64, copy=False), sums


def merge(items: Iterable[Statistics]) -> Statistics:
    r"""The statistics of the union of the (disjoint) data of ``items``: totals added, groups added label by
    label. ``ValueError`` naming the first item whose settings (:meth:`Statistics.settings`) or grouping
    differ from item 0's."""
    items = list(items)
    if not items:
        raise ValueError("statistics: nothing to merge; expected at least one Statistics")
    first = items[0]
    for index, item in enumerate(items[1:], start=1):
        if item.settings() != first.settings():
            raise ValueError(f"statistics[{index}]: cannot be merged with statistics[0]: {_difference(first, item)}")
        if item.grouped != first.grouped:
            grouped, plain = (index, 0) if item.grouped else (0, index)
            raise ValueError(
                f"statistics[{index}]: statistics[{grouped}] are per group and statistics[{plain}] are not; score "
                f"every part with group_ids or none"
            )
        if item.class_shape() != first.class_shape():
            raise ValueError(f"statistics[{index}]: cannot be merged with statistics[0]: {_class_difference(first, item)}")
    num_batches = sum(item.num_batches for item in items)
    if num_batches > INT64_MAX:
        raise ValueError(f"statistics: {num_batches} batches in all; expected at most {INT64_MAX}")
    with np.errstate(over="ignore"):
        totals = np.sum(np.stack([item.totals for item in items]), axis=0, dtype=np.float64)
        group_ids = group_totals = None
        if first.grouped:
            group_ids, group_totals = sum_by_label(
                np.concatenate([item.group_ids for item in items]), np.concatenate([item.group_totals for item in items])
            )
        class_totals = None
        if first.per_class:
            class_totals = np.sum(np.stack([item.class_totals for item in items]), axis=0, dtype=np.float64)
    if not all(part is None or np.isfinite(part).all() for part in (totals, group_totals, class_totals)):
        raise ValueError("statistics: the merged totals overflow float64")
    return replace(
        first, totals=totals, group_ids=group_ids, group_totals=group_totals, class_totals=class_totals,
        num_batches=num_batches,
    )


def _class_difference(first: Statistics, other: Statistics) -> str:
    r"""How the class totals of two statistics differ, in words."""
    if first.per_class != other.per_class:
        with_classes, without = ("statistics[0]", "this one") if first.per_class else ("this one", "statistics[0]")
        return f"{with_classes} are per class and {without} are not; score every part with per_class or none"
    first_classes, first_layout = first.class_shape()
    other_classes, other_layout = other.class_shape()
    if first_classes != other_classes:
        return f"{other_classes} classes vs {first_classes}"
    return f"class layout {list(other_layout)} vs {list(first_layout)}"


__all__ = ["INT64_MAX", "MAX_GROUPS", "STATISTICS_VERSION", "Statistics", "merge", "sum_by_label"]
