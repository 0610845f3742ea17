r"""The loss of docs/architecture.md's "How to add a loss": the log-cosh loss, written as a new loss
is, and registered only while ``tests/test_add_a_loss.py`` runs (:func:`registered`).

.. math::
    \ell_i = w_i\,\frac{\log\cosh(s\,r_i)}{s},\qquad r_i = x_i - y_i,\ s > 0

``log cosh a = |a| + log1p(exp(-2|a|)) - log 2`` stays finite where ``cosh`` overflows.
"""
import contextlib
import math
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from loss_service.losses import LossSpec, ParamSpec
from loss_service.losses._registry import _REGISTRY, register
from loss_service.losses._base import ElementwiseLoss
from loss_service.losses._params import CLASS_DIM_PARAM, CLASS_WEIGHT_PARAM, REDUCTION_PARAM
from loss_service.losses._reduction import (
    as_float, check_reduction, check_same_shape, compute_dtype, elementwise_reductions, float_hyperparameter,
    hyperparameter_in,
    one_target_per_prediction_hint, optional_vector, select_reduction, vector_argument, weighted_statistics,
)

from .references import REFERENCES, reduce
from .references.regression import _full_weight

NAME = "toy_log_cosh"
SCALE_PARAM = ParamSpec("scale", "float", 1.0, "residual scale s: log cosh(s·r) / s", low=0.0, low_inclusive=False)


def log_cosh_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], scale: Tensor, class_weight: Optional[Tensor],
    class_dim: int, per_sample: bool, values: bool = True, per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel: hyperparameters by their ParamSpec names, floats as 0-d tensors (Python numbers in eager
    Python, read through ``hyperparameter_in``)."""
    check_same_shape(predictions, targets, class_dim, one_target_per_prediction_hint())
    dtype = compute_dtype(predictions.dtype)
    s = hyperparameter_in(scale, dtype)
    scaled = ((predictions.to(dtype) - as_float(targets, dtype, "targets")) * s).abs()
    loss = (scaled + torch.log1p(torch.exp(-2.0 * scaled)) - math.log(2.0)) / s
    return weighted_statistics(loss, weights, class_weight, class_dim, dtype, per_sample, per_class)


class LogCoshLoss(ElementwiseLoss):
    r"""Module form of :func:`log_cosh_loss`: its hyperparameter and one call to its kernel."""

    scale: float

    def __init__(self, scale: float = 1.0, class_weight: Optional[Tensor] = None, reduction: str = "mean",
                 class_dim: int = 1) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.scale = SCALE_PARAM.validate(scale, NAME)

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return log_cosh_statistics(predictions, targets, weights, float_hyperparameter(self.scale, predictions),
                                   optional_vector(self.class_weight), self.class_dim, per_sample, values, per_class)


def log_cosh_loss(predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, scale: float = 1.0,
                  class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1) -> Tensor:
    r"""Weighted log-cosh loss (functional form)."""
    check_reduction(reduction)
    values, totals, _ = log_cosh_statistics(predictions, targets, weights, float_hyperparameter(scale, predictions),
                                            vector_argument(class_weight), class_dim, False)
    return select_reduction(values, elementwise_reductions(totals), reduction, predictions.dtype)


def _real_inputs(batch: int, num_classes: int, spatial: Tuple[int, ...], generator: torch.Generator,
                 dtype: torch.dtype, params: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    shape = (batch, num_classes) + tuple(spatial)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2).to(dtype), \
        (torch.randn(shape, generator=generator, dtype=torch.float64) * 2).to(dtype)


SPEC = LossSpec(
    name=NAME, family="toy", summary="weighted log-cosh loss (the walk-through's example)", module=LogCoshLoss,
    function=log_cosh_loss, predictions="real", targets="real", prediction_shape="(N, *)",
    target_shape="same as predictions", params=(SCALE_PARAM, CLASS_WEIGHT_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM),
    make_inputs=_real_inputs, statistics_kernel=log_cosh_statistics, reference="log(cosh(s·(x - y))) / s", test_params=({}, {"scale": 2.5, "class_weight": torch.tensor([0.5, 2.0, 1.0])}),
)


def log_cosh_reference(predictions, targets, weights, params, reduction):
    r"""Independent reference: ``torch.cosh`` in float64 (finite for the test inputs), the documented reductions."""
    scale = params.get("scale", 1.0)
    weight = _full_weight(predictions, weights, params)
    values = torch.log(torch.cosh(scale * (predictions - targets))) / scale * weight
    return reduce(values, reduction, torch.tensor(float(values.numel()), dtype=values.dtype), weight.sum())


@contextlib.contextmanager
def registered() -> Iterator[LossSpec]:
    r"""The toy loss in the registry (and its reference in the tests' references) for the block."""
    register(SPEC)
    REFERENCES[NAME] = log_cosh_reference
    try:
        yield SPEC
    finally:
        del _REGISTRY[NAME]
        del REFERENCES[NAME]
