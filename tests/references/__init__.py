r"""Independent reference implementations, one module per loss family.

Each module registers ``reference(name)``-decorated functions
``fn(predictions, targets, weights, params, reduction) -> Tensor`` written from torch.nn.functional,
the paper's formula or a published library's documented convention -- never by calling
``loss_service``. The generated suite in ``test_losses.py`` fails for a registered loss that has
no reference here.
"""
import importlib
import pkgutil
from typing import Any, Callable, Dict, Optional

import torch

Reference = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Dict[str, Any], str], torch.Tensor]
REFERENCES: Dict[str, Reference] = {}


def reference(name: str) -> Callable[[Reference], Reference]:
    def register(fn: Reference) -> Reference:
        if name in REFERENCES:
            raise ValueError(f"two references for {name}")
        REFERENCES[name] = fn
        return fn

    return register


def reduce(values: torch.Tensor, reduction: str, denominator: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
    r"""The project's documented reduction rule, written out for references."""
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / denominator if float(denominator) != 0 else torch.zeros_like(total)
    return total / weight_sum if float(weight_sum) != 0 else torch.zeros_like(total)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
