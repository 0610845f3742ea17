r"""Score a dataset that does not fit one machine with Ray Data (docs/evaluation.md, "At scale").

:func:`score_dataset` computes each block's :class:`~loss_service.statistics.Statistics` on Ray's workers
-- in process with the library (``loss_service.evaluation``), or through a running LossService
(``service=``) -- and merges them exactly: the result equals one ``ScoreBatch`` on the whole dataset, per
group too. Install with ``pip install "loss-service[ray]"``; nothing else in the package imports Ray.

Example, a Parquet dataset with one row per sample::

    import ray
    from loss_service.ray import score_dataset

    dataset = ray.data.read_parquet("s3://bucket/eval/")        # columns: logits, label, site
    result = score_dataset(dataset, "focal", predictions="logits", targets="label", group_by="site", gamma=2.0,
                           per_class=True)
    result.loss, result.group_ids, result.group_losses, result.class_losses
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import ray.data

from loss_service.statistics import Statistics, merge

# One row of the dataset of block statistics that map_batches returns.
STATISTICS_COLUMN = "statistics"


class _ScoreBlocks:
    r"""The per-block scorer Ray runs on its workers: one batch of rows in, its statistics out (one row).

    A class, so that each worker builds its client (``service``) or imports the library once."""

    def __init__(self, loss: str, columns: Dict[str, Optional[str]], reduction: str, per_class: bool,
                 service: Optional[str], client_options: Dict[str, Any], device: str, params: Dict[str, Any]) -> None:
        self.loss = loss
        self.columns = columns
        self.reduction = reduction
        self.per_class = per_class
        self.params = params
        self.client = None
        self.device = None
        if service is None:
            import torch

            # "auto": the worker's GPU where Ray gave it one (num_gpus in map_options), else its CPU.
            self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                       ("cpu" if device == "auto" else device))
        else:
            from loss_service.client import LossClient

            self.client = LossClient(service, **client_options)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        arrays = {role: None if column is None else _stacked(batch[column], column)
                  for role, column in self.columns.items()}
        if self.client is not None:
            stats = self.client.score(
                self.loss, arrays["predictions"], arrays["targets"], arrays["weights"], group_ids=arrays["group_ids"],
                reduction=self.reduction, return_statistics=True, return_per_class=self.per_class, **self.params,
            ).statistics
        else:
            import torch

            from loss_service import evaluation

            tensors = {role: None if array is None else torch.from_numpy(array).to(self.device)
                       for role, array in arrays.items()}
            stats = evaluation.statistics(
                self.loss, tensors["predictions"], tensors["targets"], tensors["weights"], group_ids=tensors["group_ids"],
                per_class=self.per_class, reduction=self.reduction, **self.params,
            )
        column = np.empty(1, dtype=object)
        column[0] = stats
        return {STATISTICS_COLUMN: column}


def _stacked(values: Union[np.ndarray, Sequence[np.ndarray]], column: str) -> np.ndarray:
    r"""A column of a numpy batch as one array ``(rows, ...)``: Ray gives tensor columns stacked already, and
    columns of equal-length lists (e.g. from Parquet) as an object array of rows."""
    array = np.asarray(values)
    if array.dtype == object:
        try:
            array = np.stack([np.asarray(row) for row in values])
        except ValueError as error:
            raise ValueError(f"column '{column}': rows of different shapes cannot form one batch ({error})") from None
    return np.ascontiguousarray(array)


DEVICES = ("cpu", "cuda", "auto")


def block_statistics(
    dataset: "ray.data.Dataset", loss: str, *, predictions: str = "predictions", targets: str = "targets",
    weights: Optional[str] = None, group_by: Optional[str] = None, per_class: bool = False, reduction: str = "mean",
    service: Optional[str] = None, client_options: Optional[Dict[str, Any]] = None, device: str = "cpu",
    batch_size: Optional[int] = None, map_options: Optional[Dict[str, Any]] = None, **params: Any,
) -> List[Statistics]:
    r"""The statistics of each scored batch of ``dataset`` (the arguments of :func:`score_dataset`), merged by
    no one yet: for a caller that keeps them (e.g. per day) and merges them later."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    columns = {"predictions": predictions, "targets": targets, "weights": weights, "group_ids": group_by}
    scored = dataset.map_batches(
        _ScoreBlocks,
        fn_constructor_kwargs=dict(loss=loss, columns=columns, reduction=reduction, per_class=per_class,
                                   service=service, client_options=dict(client_options or {}), device=device,
                                   params=params),
        batch_format="numpy", batch_size=batch_size, **dict(map_options or {}),
    )
    return [row[STATISTICS_COLUMN] for row in scored.iter_rows()]


def score_dataset(
    dataset: "ray.data.Dataset", loss: str, *, predictions: str = "predictions", targets: str = "targets",
    weights: Optional[str] = None, group_by: Optional[str] = None, per_class: bool = False, reduction: str = "mean",
    service: Optional[str] = None, client_options: Optional[Dict[str, Any]] = None, device: str = "cpu",
    batch_size: Optional[int] = None, map_options: Optional[Dict[str, Any]] = None, **params: Any,
):
    r"""The loss of ``dataset`` (one row per sample), exactly as one call on all of it.

    Args:
        dataset: a ``ray.data.Dataset`` whose columns hold each sample's predictions, targets (and weights,
            group label): tensor columns, or equal-length lists (Parquet).
        loss: a registered loss name; ``params`` its hyperparameters (as ``losses.build`` takes them, or as
            ``LossClient.score`` sends them with ``service``).
        predictions, targets, weights, group_by: the column names; ``group_by``'s integer labels give the
            loss of each group as well (``group_ids``, ``group_losses``).
        per_class: the loss of each class as well (``class_losses``; a region loss's index per class in
            ``class_scores``), exact over the blocks.
        service: ``host:port`` of a LossService to score the blocks with (``client_options`` go to
            ``LossClient``: ``token``, ``ca``, ...); ``None`` scores them in process with the library.
        device: where the library computes in process: ``cpu``, ``cuda``, or ``auto`` (a worker's GPU when
            Ray gave it one, e.g. ``map_options={"num_gpus": 1}``, else its CPU).
        batch_size: rows per scored batch (default: Ray's); ``map_options``: further arguments of
            ``Dataset.map_batches`` (``compute=ray.data.ActorPoolStrategy(size=4)``, ``num_gpus``, ...).
            The scorers are Ray actors, an autoscaling pool unless ``compute`` says otherwise.

    Returns the :class:`loss_service.evaluation.Evaluation` of the merged statistics (in process), or the
    ``LossClient.merge`` result (with ``service``): ``loss``, ``weight_sum``, ``denominator``,
    ``num_elements``, ``group_ids``, ``group_losses``, ``class_losses``, ``class_scores`` and the merged
    ``statistics`` either way.
    """
    parts = block_statistics(
        dataset, loss, predictions=predictions, targets=targets, weights=weights, group_by=group_by,
        per_class=per_class, reduction=reduction, service=service, client_options=client_options, device=device,
        batch_size=batch_size, map_options=map_options, **params,
    )
    if not parts:
        raise ValueError("dataset: no rows to score")
    if service is not None:
        from loss_service.client import LossClient

        with LossClient(service, **dict(client_options or {})) as client:
            return client.merge(parts)
    from loss_service import evaluation

    return evaluation.evaluate(merge(parts))


__all__ = ["block_statistics", "score_dataset"]
