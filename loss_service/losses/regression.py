r"""Regression losses on real values: ``mse``, ``l1``, ``huber`` and ``smooth_l1``.

Each equals its :mod:`torch.nn.functional` counterpart and adds what torch lacks: call-time
``weights`` (``(N,)`` per sample or broadcastable per element), a per-class ``class_weight`` along
``class_dim`` and the ``weighted_mean`` reduction. ``delta`` and ``beta`` reach the kernels as
0-d tensors and are only used through tensor operations, so the ONNX graph takes them as inputs.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._base import ElementwiseLoss
from ._params import CLASS_DIM_PARAM, CLASS_WEIGHT_PARAM, REDUCTION_PARAM
from ._registry import LossSpec, ParamSpec, register
from ._reduction import (
    as_float, check_reduction, check_same_shape, compute_dtype, elementwise_reductions, float_hyperparameter,
    is_exporting, one_target_per_prediction_hint, optional_vector, select_reduction, vector_argument, weighted_statistics,
)

DELTA_PARAM = ParamSpec(
    "delta", "float", 1.0, "residual size where the Huber loss turns from quadratic to linear", low=0.0,
    low_inclusive=False,
)
BETA_PARAM = ParamSpec(
    "beta", "float", 1.0, "residual size where smooth L1 turns from quadratic to linear; 0 gives the L1 loss", low=0.0,
)


def _residual(predictions: Tensor, targets: Tensor) -> Tuple[Tensor, torch.dtype]:
    r"""``predictions - targets`` in the compute dtype, and that dtype."""
    check_same_shape(predictions, targets, 1, one_target_per_prediction_hint())
    dtype = compute_dtype(predictions.dtype)
    return predictions.to(dtype) - as_float(targets, dtype, "targets"), dtype


def _check_threshold(value: Tensor, loss: str, name: str, allow_zero: bool) -> Tensor:
    r"""Raise ``ValueError`` unless ``value`` is a 0-d tensor ``> 0`` (``>= 0`` with ``allow_zero``).

    A module attribute can be changed after construction (``setattr`` from C++), so the kernel checks
    the value it receives; the check needs a host sync and is skipped while exporting.
    """
    if value.dim() != 0:
        raise ValueError("{}: parameter '{}' must be a single number, got shape {}".format(loss, name, list(value.shape)))
    if not is_exporting():
        # Written as "not valid" so that NaN is rejected too.
        valid = bool(value >= 0) if allow_zero else bool(value > 0)
        if not valid:
            raise ValueError(
                "{}: parameter '{}' must be {}, got {}".format(loss, name, ">= 0" if allow_zero else "> 0", float(value))
            )
    return value


def mse_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int,
    per_sample: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`mse_loss` (see :mod:`._reduction`)."""
    residual, dtype = _residual(predictions, targets)
    return weighted_statistics(residual * residual, weights, class_weight, class_dim, dtype, per_sample)


def l1_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int,
    per_sample: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`l1_loss`."""
    residual, dtype = _residual(predictions, targets)
    return weighted_statistics(residual.abs(), weights, class_weight, class_dim, dtype, per_sample)


def huber_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], delta: Tensor, class_weight: Optional[Tensor],
    class_dim: int, per_sample: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`huber_loss`; ``delta`` is a 0-d tensor."""
    residual, dtype = _residual(predictions, targets)
    delta = _check_threshold(delta.to(dtype), "huber", "delta", False)
    absolute = residual.abs()
    # min(|r|, δ) splits |r| into its quadratic and its linear part:
    # ½m² + δ(|r| - m) is ½r² below δ and δ(|r| - ½δ) above, with no Python branch on δ and no
    # squared large residual (which would overflow float32 in the branch torch.where discards).
    quadratic_part = torch.minimum(absolute, delta)
    loss = 0.5 * quadratic_part * quadratic_part + delta * (absolute - quadratic_part)
    return weighted_statistics(loss, weights, class_weight, class_dim, dtype, per_sample)


def smooth_l1_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], beta: Tensor, class_weight: Optional[Tensor],
    class_dim: int, per_sample: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`smooth_l1_loss`; ``beta`` is a 0-d tensor, 0 allowed."""
    residual, dtype = _residual(predictions, targets)
    beta = _check_threshold(beta.to(dtype), "smooth_l1", "beta", True)
    absolute = residual.abs()
    quadratic_part = torch.minimum(absolute, beta)
    # With β = 0 the quadratic part is 0 and the loss is |r| (torch's l1_loss); dividing that 0 by 1
    # instead of by β keeps the value and the gradient finite.
    safe_beta = torch.where(beta > 0, beta, torch.ones_like(beta))
    loss = 0.5 * quadratic_part * quadratic_part / safe_beta + (absolute - quadratic_part)
    return weighted_statistics(loss, weights, class_weight, class_dim, dtype, per_sample)


def mse_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Weighted squared error.

    .. math::
        \ell_i = w_i\,(x_i - y_i)^2

    Args:
        predictions: real values ``(N, *)``; targets: real values of the same shape.
        weights: ``(N,)`` per-sample (along dim 0 whatever the rank) or broadcastable to the predictions.
        class_weight: per-class (per-channel) vector of length ``C`` applied along ``class_dim``.
        reduction: ``none`` | ``mean`` (divides by the element count, as torch) | ``sum`` |
            ``weighted_mean`` (divides by ``Σ w``).

    Without weights it equals :func:`torch.nn.functional.mse_loss` for every torch reduction.
    """
    check_reduction(reduction)
    values, totals, _ = mse_statistics(predictions, targets, weights, vector_argument(class_weight), class_dim, False)
    return select_reduction(values, elementwise_reductions(totals), reduction, predictions.dtype)


def l1_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Weighted absolute error.

    .. math::
        \ell_i = w_i\,|x_i - y_i|

    Arguments and reductions as :func:`mse_loss`. Without weights it equals
    :func:`torch.nn.functional.l1_loss`.
    """
    check_reduction(reduction)
    values, totals, _ = l1_statistics(predictions, targets, weights, vector_argument(class_weight), class_dim, False)
    return select_reduction(values, elementwise_reductions(totals), reduction, predictions.dtype)


def huber_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, delta: float = 1.0,
    class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Weighted Huber loss (Huber, "Robust Estimation of a Location Parameter", 1964).

    .. math::
        \ell_i = w_i \begin{cases} \tfrac12 r_i^2 & |r_i| < \delta \\
                                   \delta\,(|r_i| - \tfrac12\delta) & \text{otherwise} \end{cases},
        \qquad r_i = x_i - y_i,\ \delta > 0

    Arguments and reductions as :func:`mse_loss`. Without weights it equals
    :func:`torch.nn.functional.huber_loss` with the same ``delta``.
    """
    check_reduction(reduction)
    values, totals, _ = huber_statistics(
        predictions, targets, weights, float_hyperparameter(delta, predictions), vector_argument(class_weight),
        class_dim, False,
    )
    return select_reduction(values, elementwise_reductions(totals), reduction, predictions.dtype)


def smooth_l1_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, beta: float = 1.0,
    class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Weighted smooth L1 loss (Girshick, "Fast R-CNN", ICCV 2015).

    .. math::
        \ell_i = w_i \begin{cases} \tfrac12 r_i^2 / \beta & |r_i| < \beta \\
                                   |r_i| - \tfrac12\beta & \text{otherwise} \end{cases},
        \qquad r_i = x_i - y_i,\ \beta \ge 0

    For ``β > 0`` it is the Huber loss with ``δ = β`` divided by ``β``; ``β = 0`` is the L1 loss
    (value and gradient finite). Arguments and reductions as :func:`mse_loss`. Without weights it
    equals :func:`torch.nn.functional.smooth_l1_loss` with the same ``beta``.
    """
    check_reduction(reduction)
    values, totals, _ = smooth_l1_statistics(
        predictions, targets, weights, float_hyperparameter(beta, predictions), vector_argument(class_weight),
        class_dim, False,
    )
    return select_reduction(values, elementwise_reductions(totals), reduction, predictions.dtype)


class MSELoss(ElementwiseLoss):
    r"""Module form of :func:`mse_loss`; ``class_weight`` is a buffer."""


    def __init__(self, class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1) -> None:
        super().__init__(class_weight, reduction, class_dim)

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return mse_statistics(predictions, targets, weights, optional_vector(self.class_weight), self.class_dim, per_sample)


class L1Loss(ElementwiseLoss):
    r"""Module form of :func:`l1_loss`; ``class_weight`` is a buffer."""


    def __init__(self, class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1) -> None:
        super().__init__(class_weight, reduction, class_dim)

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return l1_statistics(predictions, targets, weights, optional_vector(self.class_weight), self.class_dim, per_sample)


class HuberLoss(ElementwiseLoss):
    r"""Module form of :func:`huber_loss`; ``delta`` is read at call time (``setattr`` from C++ works)."""

    delta: float

    def __init__(
        self, delta: float = 1.0, class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.delta = DELTA_PARAM.validate(delta, "huber")

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return huber_statistics(
            predictions, targets, weights, float_hyperparameter(self.delta, predictions),
            optional_vector(self.class_weight), self.class_dim, per_sample,
        )


class SmoothL1Loss(ElementwiseLoss):
    r"""Module form of :func:`smooth_l1_loss`; ``beta`` is read at call time (``setattr`` from C++ works)."""

    beta: float

    def __init__(
        self, beta: float = 1.0, class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.beta = BETA_PARAM.validate(beta, "smooth_l1")

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return smooth_l1_statistics(
            predictions, targets, weights, float_hyperparameter(self.beta, predictions),
            optional_vector(self.class_weight), self.class_dim, per_sample,
        )


def _real_inputs(
    batch: int, num_classes: int, spatial: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
    params: Dict[str, Any],
) -> Tuple[Tensor, Tensor]:
    # Residuals have a standard deviation of about 2.8, so every delta/beta in test_params sees
    # elements on both sides of its threshold.
    shape = (batch, num_classes) + tuple(spatial)
    predictions = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    targets = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    return predictions.to(dtype), targets.to(dtype)


_SHAPES = dict(predictions="real", targets="real", prediction_shape="(N, *)", target_shape="same as predictions")

register(LossSpec(
    name="mse", family="regression", summary="weighted mean squared error", module=MSELoss, function=mse_loss,
    params=(CLASS_WEIGHT_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM), make_inputs=_real_inputs,
    statistics_kernel=mse_statistics,
    reference="torch.nn.functional.mse_loss", test_params=({}, {"class_weight": torch.tensor([0.5, 2.0, 1.0])}),
    **_SHAPES,
))

register(LossSpec(
    name="l1", family="regression", summary="weighted mean absolute error", module=L1Loss, function=l1_loss,
    params=(CLASS_WEIGHT_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM), make_inputs=_real_inputs,
    statistics_kernel=l1_statistics,
    reference="torch.nn.functional.l1_loss", test_params=({}, {"class_weight": torch.tensor([1.0, 0.0, 3.0])}),
    **_SHAPES,
))

register(LossSpec(
    name="huber", family="regression", summary="weighted Huber loss, quadratic below delta and linear above",
    module=HuberLoss, function=huber_loss,
    params=(DELTA_PARAM, CLASS_WEIGHT_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM), make_inputs=_real_inputs,
    statistics_kernel=huber_statistics, reference="torch.nn.functional.huber_loss(delta)",
    test_params=({}, {"delta": 0.5, "class_weight": torch.tensor([0.5, 2.0, 1.0])}, {"delta": 2.5}),
    paper="Huber, Robust Estimation of a Location Parameter, Ann. Math. Statist. 1964", **_SHAPES,
))

register(LossSpec(
    name="smooth_l1", family="regression", summary="weighted smooth L1 loss (Huber / beta); beta = 0 is L1",
    module=SmoothL1Loss, function=smooth_l1_loss,
    params=(BETA_PARAM, CLASS_WEIGHT_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM), make_inputs=_real_inputs,
    statistics_kernel=smooth_l1_statistics, reference="torch.nn.functional.smooth_l1_loss(beta), beta = 0 as l1_loss",
    test_params=({}, {"beta": 0.0}, {"beta": 0.3, "class_weight": torch.tensor([2.0, 1.0, 0.25])}),
    paper="Girshick, Fast R-CNN, ICCV 2015", **_SHAPES,
))

__all__ = [
    "MSELoss", "L1Loss", "HuberLoss", "SmoothL1Loss", "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss",
    "mse_statistics", "l1_statistics", "huber_statistics", "smooth_l1_statistics",
]
