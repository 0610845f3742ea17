r"""Regression losses on real values: ``mse``, ``l1``, ``huber`` and ``smooth_l1``.

Each equals its :mod:`torch.nn.functional` counterpart, with call-time ``weights``, ``class_weight``
and ``weighted_mean`` added (docs/losses/regression.md). ``delta`` and ``beta`` are 0-d tensors used only
through tensor operations, so the ONNX graph takes them as inputs.
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import ElementwiseLoss
from ._params import CLASS_DIM_PARAM, CLASS_WEIGHT_PARAM, REDUCTION_PARAM
from ._registry import LossSpec, ParamSpec, register
from ._reduction import (
    as_float, check_reduction, check_same_shape, compute_dtype, reduce_elementwise, float_hyperparameter,
    hyperparameter_in, in_dtype, is_tracing, one_target_per_prediction_hint, optional_vector, summed_statistics,
    sums_only, sum_reduction, torch_reduction, vector_argument, weighted_statistics,
)

DELTA_PARAM = ParamSpec(
    "delta", "float", 1.0, "residual size where the Huber loss turns from quadratic to linear", low=0.0,
    low_inclusive=False,
)
BETA_PARAM = ParamSpec(
    "beta", "float", 1.0, "residual size where smooth L1 turns from quadratic to linear; 0 gives the L1 loss", low=0.0,
)


def _in_compute_dtype(predictions: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor, torch.dtype]:
    r"""``predictions`` and ``targets`` in the compute dtype, their shapes checked, and that dtype."""
    check_same_shape(predictions, targets, 1, one_target_per_prediction_hint())
    dtype = compute_dtype(predictions.dtype)
    return in_dtype(predictions, dtype), as_float(targets, dtype, "targets"), dtype


def _residual(predictions: Tensor, targets: Tensor) -> Tuple[Tensor, torch.dtype]:
    r"""``predictions - targets`` in the compute dtype, and that dtype."""
    p, t, dtype = _in_compute_dtype(predictions, targets)
    return p - t, dtype


def _split_residual(
    predictions: Tensor, targets: Tensor, threshold: Tensor, loss: str, name: str, allow_zero: bool
) -> Tuple[Tensor, Tensor, Tensor, torch.dtype]:
    r"""``(|r|, m, threshold, dtype)``: ``m = min(|r|, threshold)`` splits ``|r|`` into Huber's and smooth L1's
    quadratic part ``m`` and linear part ``|r| - m``, with no branch on the threshold and no squared large residual
    (which would overflow float32 in the branch torch.where discards). The 0-d ``threshold`` is checked here
    (``> 0``, ``>= 0`` with ``allow_zero``) as C++ may have set it; the host check is skipped while exporting."""
    residual, dtype = _residual(predictions, targets)
    threshold = checked_threshold(hyperparameter_in(threshold, dtype), loss, name, allow_zero)
    absolute = residual.abs()
    quadratic_part = torch.minimum(absolute, threshold)
    return absolute, quadratic_part, threshold, dtype


def checked_threshold(threshold: Tensor, loss: str, name: str, allow_zero: bool) -> Tensor:
    r"""``ValueError`` unless the 0-d ``threshold`` (or Python number, :func:`~._reduction.float_hyperparameter`) is
    ``> 0`` (``>= 0`` with ``allow_zero``); not while tracing."""
    if isinstance(threshold, Tensor) and threshold.dim() != 0:
        raise ValueError(
            "{}: parameter '{}' must be a single number, got shape {}".format(loss, name, list(threshold.shape))
        )
    if not is_tracing():
        checked_threshold_value(float(threshold), loss, name, allow_zero)
    return threshold


def checked_threshold_value(value: float, loss: str, name: str, allow_zero: bool) -> float:
    r"""The check of :func:`checked_threshold` on a number read on the host."""
    # Written as "not valid" so that NaN is rejected too.
    valid = value >= 0.0 if allow_zero else value > 0.0
    if not valid:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError("{}: parameter '{}' must be {}, got {}".format(loss, name, bound, value))
    return value


def fused_regression(
    loss: str, predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor],
    threshold: float, reduction: str,
) -> Optional[Tensor]:
    r"""``Loss.fused_reduction`` of the regression losses: torch's ``mse_loss``, ``l1_loss``, ``huber_loss``
    (``delta = threshold``) or ``smooth_l1_loss`` (``beta = threshold``) with its own reduction
    (:func:`~._reduction.torch_reduction`), on contiguous inputs (the result must not depend on the memory
    layout); ``None`` with ``weights`` or ``class_weight``, which torch's do not take, and for the mean of no
    elements."""
    how = torch_reduction(reduction, True, predictions.numel())
    if how == "" or weights is not None or class_weight is not None:
        return None
    p, t, _ = _in_compute_dtype(predictions, targets)
    p = p.contiguous()
    t = t.contiguous()
    if loss == "mse":
        result = F.mse_loss(p, t, reduction=how)
    elif loss == "l1":
        # torch's l1_loss is abs().mean(): reduced by its sum instead.
        result = sum_reduction(F.l1_loss(p, t, reduction="sum"), how, p.numel())
    elif loss == "huber":
        result = F.huber_loss(p, t, reduction=how, delta=checked_threshold_value(threshold, loss, "delta", False))
    else:
        result = F.smooth_l1_loss(p, t, reduction=how, beta=checked_threshold_value(threshold, loss, "beta", True))
    return in_dtype(result, predictions.dtype)


def mse_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int,
    per_sample: bool, values: bool = True,
    per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`mse_loss` (see :mod:`._reduction`). Unweighted, its totals alone
    (:func:`sums_only`) are torch's fused sum."""
    if weights is None and class_weight is None and sums_only(values, per_sample or per_class):
        p, t, _ = _in_compute_dtype(predictions, targets)
        return summed_statistics(F.mse_loss(p, t, reduction="sum"), None, None, list(p.shape))
    residual, dtype = _residual(predictions, targets)
    return weighted_statistics(residual * residual, weights, class_weight, class_dim, dtype, per_sample, per_class)


def l1_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int,
    per_sample: bool, values: bool = True,
    per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`l1_loss`; its values are written whatever ``values`` says (torch's fused
    sum saves neither time nor memory here)."""
    residual, dtype = _residual(predictions, targets)
    return weighted_statistics(residual.abs(), weights, class_weight, class_dim, dtype, per_sample, per_class)


def huber_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], delta: Tensor, class_weight: Optional[Tensor],
    class_dim: int, per_sample: bool, values: bool = True,
    per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`huber_loss`: ``½m² + δ(|r| - m)``; ``delta`` is a 0-d tensor. Outside tracing
    torch's fused kernel of the same loss, with its values whatever ``values`` says (its fused sum holds more
    memory through the backward pass)."""
    if is_tracing():
        absolute, quadratic_part, delta, dtype = _split_residual(predictions, targets, delta, "huber", "delta", False)
        loss = 0.5 * quadratic_part * quadratic_part + delta * (absolute - quadratic_part)
    else:
        p, t, dtype = _in_compute_dtype(predictions, targets)
        value = float(checked_threshold(hyperparameter_in(delta, dtype), "huber", "delta", False))
        loss = F.huber_loss(p, t, reduction="none", delta=value)
    return weighted_statistics(loss, weights, class_weight, class_dim, dtype, per_sample, per_class)


def smooth_l1_statistics(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor], beta: Tensor, class_weight: Optional[Tensor],
    class_dim: int, per_sample: bool, values: bool = True,
    per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics kernel of :func:`smooth_l1_loss`: ``½m²/β + (|r| - m)``; ``beta`` is a 0-d tensor, 0 allowed.
    Outside tracing torch's fused kernel of the same loss (which is ``l1_loss`` for ``β = 0``), with its values
    as :func:`huber_statistics`."""
    if is_tracing():
        absolute, quadratic_part, beta, dtype = _split_residual(predictions, targets, beta, "smooth_l1", "beta", True)
        # With β = 0 the quadratic part is 0 and the loss is |r| (torch's l1_loss); dividing that 0 by 1
        # instead of by β keeps the value and the gradient finite.
        safe_beta = torch.where(beta > 0, beta, torch.ones_like(beta))
        loss = 0.5 * quadratic_part * quadratic_part / safe_beta + (absolute - quadratic_part)
    else:
        p, t, dtype = _in_compute_dtype(predictions, targets)
        value = float(checked_threshold(hyperparameter_in(beta, dtype), "smooth_l1", "beta", True))
        loss = F.smooth_l1_loss(p, t, reduction="none", beta=value)
    return weighted_statistics(loss, weights, class_weight, class_dim, dtype, per_sample, per_class)


def mse_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Weighted squared error.

    .. math::
        \ell_i = w_i\,(x_i - y_i)^2

    ``predictions`` and ``targets`` are real values of one shape ``(N, *)``; ``weights``, ``class_weight`` and
    ``reduction`` (``mean`` divides by the element count, as torch; ``weighted_mean`` by ``Σ w``) follow
    docs/losses.md. Without weights it equals :func:`torch.nn.functional.mse_loss` for every torch reduction.
    """
    check_reduction(reduction)
    class_weight = vector_argument(class_weight)
    fused = fused_regression("mse", predictions, targets, weights, class_weight, 0.0, reduction)
    if fused is not None:
        return fused
    values, totals, _ = mse_statistics(
        predictions, targets, weights, class_weight, class_dim, False, reduction == "none"
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


def l1_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Weighted absolute error.

    .. math::
        \ell_i = w_i\,|x_i - y_i|

    Arguments as :func:`mse_loss`; without weights it equals :func:`torch.nn.functional.l1_loss`.
    """
    check_reduction(reduction)
    class_weight = vector_argument(class_weight)
    fused = fused_regression("l1", predictions, targets, weights, class_weight, 0.0, reduction)
    if fused is not None:
        return fused
    values, totals, _ = l1_statistics(
        predictions, targets, weights, class_weight, class_dim, False, reduction == "none"
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


def huber_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, delta: float = 1.0,
    class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Weighted Huber loss (Huber, "Robust Estimation of a Location Parameter", 1964).

    .. math::
        \ell_i = w_i \begin{cases} \tfrac12 r_i^2 & |r_i| < \delta \\
                                   \delta\,(|r_i| - \tfrac12\delta) & \text{otherwise} \end{cases},
        \qquad r_i = x_i - y_i,\ \delta > 0

    Arguments as :func:`mse_loss`; without weights it equals :func:`torch.nn.functional.huber_loss`.
    """
    check_reduction(reduction)
    class_weight = vector_argument(class_weight)
    fused = fused_regression("huber", predictions, targets, weights, class_weight, delta, reduction)
    if fused is not None:
        return fused
    values, totals, _ = huber_statistics(
        predictions, targets, weights, float_hyperparameter(delta, predictions), class_weight,
        class_dim, False, reduction == "none",
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


def smooth_l1_loss(
    predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, beta: float = 1.0,
    class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
) -> Tensor:
    r"""Weighted smooth L1 loss (Girshick, "Fast R-CNN", ICCV 2015).

    .. math::
        \ell_i = w_i \begin{cases} \tfrac12 r_i^2 / \beta & |r_i| < \beta \\
                                   |r_i| - \tfrac12\beta & \text{otherwise} \end{cases},
        \qquad r_i = x_i - y_i,\ \beta \ge 0

    For ``β > 0`` it is Huber with ``δ = β`` divided by ``β``; ``β = 0`` is L1 (finite gradient). Arguments
    as :func:`mse_loss`; without weights it equals :func:`torch.nn.functional.smooth_l1_loss`.
    """
    check_reduction(reduction)
    class_weight = vector_argument(class_weight)
    fused = fused_regression("smooth_l1", predictions, targets, weights, class_weight, beta, reduction)
    if fused is not None:
        return fused
    values, totals, _ = smooth_l1_statistics(
        predictions, targets, weights, float_hyperparameter(beta, predictions), class_weight,
        class_dim, False, reduction == "none",
    )
    return reduce_elementwise(values, totals, reduction, predictions.dtype)


class MSELoss(ElementwiseLoss):
    r"""Module form of :func:`mse_loss`; ``class_weight`` is a buffer."""

    kernel = staticmethod(mse_statistics)

    def fused_reduction(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
        return fused_regression(
            "mse", predictions, targets, weights, optional_vector(self.class_weight), 0.0, self.reduction
        )


class L1Loss(ElementwiseLoss):
    r"""Module form of :func:`l1_loss`; ``class_weight`` is a buffer."""

    kernel = staticmethod(l1_statistics)

    def fused_reduction(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
        return fused_regression(
            "l1", predictions, targets, weights, optional_vector(self.class_weight), 0.0, self.reduction
        )


class _ThresholdLoss(ElementwiseLoss):
    r"""Huber (``delta``) and smooth L1 (``beta``): one threshold, read at call time. Scripting decides
    ``hasattr`` when it compiles ``statistics`` for a subclass, so each keeps only its own branch."""

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        class_weight = optional_vector(self.class_weight)
        if hasattr(self, "delta"):
            delta = float_hyperparameter(self.delta, predictions)
            return huber_statistics(
                predictions, targets, weights, delta, class_weight, self.class_dim, per_sample, values, per_class
            )
        beta = float_hyperparameter(self.beta, predictions)
        return smooth_l1_statistics(
            predictions, targets, weights, beta, class_weight, self.class_dim, per_sample, values, per_class
        )

    def fused_reduction(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
        class_weight = optional_vector(self.class_weight)
        if hasattr(self, "delta"):
            return fused_regression("huber", predictions, targets, weights, class_weight, self.delta, self.reduction)
        return fused_regression("smooth_l1", predictions, targets, weights, class_weight, self.beta, self.reduction)


class HuberLoss(_ThresholdLoss):
    r"""Module form of :func:`huber_loss`."""

    delta: float

    def __init__(
        self, delta: float = 1.0, class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.delta = DELTA_PARAM.validate(delta, "huber")


class SmoothL1Loss(_ThresholdLoss):
    r"""Module form of :func:`smooth_l1_loss`."""

    beta: float

    def __init__(
        self, beta: float = 1.0, class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1,
    ) -> None:
        super().__init__(class_weight, reduction, class_dim)
        self.beta = BETA_PARAM.validate(beta, "smooth_l1")


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


# What the four regression losses declare alike; their parameters end with _SETTINGS.
_REGRESSION = dict(
    family="regression", predictions="real", targets="real", prediction_shape="(N, *)",
    target_shape="same as predictions", make_inputs=_real_inputs,
)
_SETTINGS = (CLASS_WEIGHT_PARAM, REDUCTION_PARAM, CLASS_DIM_PARAM)

register(LossSpec(
    name="mse", summary="weighted mean squared error", module=MSELoss, function=mse_loss, params=_SETTINGS,
    statistics_kernel=mse_statistics, reference="torch.nn.functional.mse_loss",
    test_params=({}, {"class_weight": torch.tensor([0.5, 2.0, 1.0])}), **_REGRESSION,
))

register(LossSpec(
    name="l1", summary="weighted mean absolute error", module=L1Loss, function=l1_loss, params=_SETTINGS,
    statistics_kernel=l1_statistics, reference="torch.nn.functional.l1_loss",
    test_params=({}, {"class_weight": torch.tensor([1.0, 0.0, 3.0])}), **_REGRESSION,
))

register(LossSpec(
    name="huber", summary="weighted Huber loss, quadratic below delta and linear above", module=HuberLoss,
    function=huber_loss, params=(DELTA_PARAM,) + _SETTINGS, statistics_kernel=huber_statistics,
    reference="torch.nn.functional.huber_loss(delta)",
    test_params=({}, {"delta": 0.5, "class_weight": torch.tensor([0.5, 2.0, 1.0])}, {"delta": 2.5}),
    paper="Huber, Robust Estimation of a Location Parameter, Ann. Math. Statist. 1964", **_REGRESSION,
))

register(LossSpec(
    name="smooth_l1", summary="weighted smooth L1 loss (Huber / beta); beta = 0 is L1", module=SmoothL1Loss,
    function=smooth_l1_loss, params=(BETA_PARAM,) + _SETTINGS, statistics_kernel=smooth_l1_statistics,
    reference="torch.nn.functional.smooth_l1_loss(beta), beta = 0 as l1_loss",
    test_params=({}, {"beta": 0.0}, {"beta": 0.3, "class_weight": torch.tensor([2.0, 1.0, 0.25])}),
    paper="Girshick, Fast R-CNN, ICCV 2015", **_REGRESSION,
))

__all__ = [
    "MSELoss", "L1Loss", "HuberLoss", "SmoothL1Loss", "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss",
    "mse_statistics", "l1_statistics", "huber_statistics", "smooth_l1_statistics",
]
