r"""The bases of the loss modules: what every one of them has, written once (docs/architecture.md, "Modules").

:class:`Loss` owns ``forward`` (the statistics, their reductions, the chosen one); :class:`ElementwiseLoss`
adds ``reduction``, ``class_dim``, the ``class_weight`` buffer and ``reductions``. A loss module is its
hyperparameters (attributes read at call time, so ``module.setattr("gamma", 3.0)`` from C++ works on a
scripted module) and its kernel. Scripting compiles the base's methods for each concrete module, so the
base's ``self.statistics`` (and ``self.kernel``) is the loss's own.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._reduction import (
    check_reduction, elementwise_reductions, optional_vector, reduce_elementwise, select_reduction, vector_buffer,
)


class Loss(nn.Module):
    r"""A loss module: ``forward`` is the reduction, chosen by ``self.reduction``, of the loss's own
    ``statistics`` and ``reductions``."""

    def forward(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        # The reduction is read at call time: C++ may have set it since construction.
        check_reduction(self.reduction)
        fused = self.fused_reduction(predictions, targets, weights)
        if fused is not None:
            return fused
        values, totals, _ = self.statistics(predictions, targets, weights, False, self.reduction == "none", False)
        return self.reduced(values, totals, predictions.dtype)

    def fused_reduction(self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
        r"""``forward``'s result computed by torch's own fused loss and reduction, where torch has this loss with
        these settings and a reduction that is ``self.reduction`` (:func:`~._reduction.torch_reduction`), outside
        export; ``None`` elsewhere, and ``forward`` reduces the statistics. A small batch pays for every op after
        the loss's kernel, and a large one for the float64 totals that ``forward`` reads back
        (docs/architecture.md, "Modules")."""
        return None

    def reduced(self, values: Tensor, totals: Tensor, dtype: torch.dtype) -> Tensor:
        r"""``forward``'s result from the statistics, in ``dtype``: ``values`` for ``none``, else the chosen column
        of the loss's ``reductions``; of elementwise totals that column alone (:func:`reduce_elementwise`: the
        others' ops cost a small batch more than its arithmetic)."""
        if self.elementwise_totals():
            return reduce_elementwise(values, totals, self.reduction, dtype)
        return select_reduction(values, self.reductions(totals), self.reduction, dtype)

    def elementwise_totals(self) -> bool:
        r"""Whether the totals are elementwise, ``[Σ w·ℓ, Σ w, Σ d, n]`` reduced by ``elementwise_reductions``."""
        return False

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        r"""``(values, totals, sample_totals)`` of the loss's statistics kernel (see :mod:`._reduction`);
        with ``values=False`` the values may be empty (a caller that reads only the totals); with
        ``per_class`` the third output is the class totals ``(C, K_c)`` (``Forms.class_totals``)."""
        raise NotImplementedError("a loss module implements statistics")

    @torch.jit.export
    def reductions(self, totals: Tensor) -> Tensor:
        r"""``[sum, mean, weighted_mean]`` of ``(..., K)`` totals (see :mod:`._reduction`)."""
        raise NotImplementedError("a loss module implements reductions")

    @torch.jit.export
    def class_reductions(self, class_totals: Tensor) -> Tensor:
        r"""``(C, 3)`` ``[sum, mean, weighted_mean]`` of each class's loss from ``(C, K_c)`` class totals, and for
        a loss with an overlap index ``(C, 4)``, the class's index (e.g. its Dice score) in column 3."""
        raise NotImplementedError("a loss module implements class_reductions")


class ElementwiseLoss(Loss):
    r"""A loss with one value per element, reduced by :func:`elementwise_reductions`."""

    def __init__(self, class_weight: Optional[Tensor] = None, reduction: str = "mean", class_dim: int = 1) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.class_dim = class_dim
        # A buffer, empty when unset: it follows module.to(device) and C++ can replace it.
        self.register_buffer("class_weight", vector_buffer(class_weight))

    @torch.jit.export
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor] = None, per_sample: bool = False,
        values: bool = True, per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        r"""The class's ``kernel = staticmethod(<loss>_statistics)``, for a loss without hyperparameters of its
        own; a loss with some overrides ``statistics`` to pass them."""
        class_weight = optional_vector(self.class_weight)
        return self.kernel(predictions, targets, weights, class_weight, self.class_dim, per_sample, values, per_class)

    def elementwise_totals(self) -> bool:
        return True

    @torch.jit.export
    def reductions(self, totals: Tensor) -> Tensor:
        return elementwise_reductions(totals)

    @torch.jit.export
    def class_reductions(self, class_totals: Tensor) -> Tensor:
        r"""A class's elementwise totals reduce as a batch's."""
        return elementwise_reductions(class_totals)
