r"""The loss library: scriptable functions, thin modules, and the registry that describes them.

``build(name, **params)`` returns the ``nn.Module`` of a registered loss, called as
``module(predictions, targets, weights=None)``; ``names()`` lists the registered losses and
``get(name)`` returns a loss's :class:`LossSpec` (parameters, input contract, references).
"""
from ._registry import LossSpec, ParamSpec, build, get, names, specs
from ._reduction import REDUCTIONS
from .bce import (
    BCELoss,
    BCEWithLogitsLoss,
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
)

__all__ = [
    "LossSpec",
    "ParamSpec",
    "REDUCTIONS",
    "build",
    "get",
    "names",
    "specs",
    "BCELoss",
    "BCEWithLogitsLoss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
]
