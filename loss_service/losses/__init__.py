r"""The loss library: scriptable functions, thin modules, and the registry that describes them.

``build(name, **params)`` returns the ``nn.Module`` of a registered loss, called as
``module(predictions, targets, weights=None)``; ``names()`` lists the registered losses and
``get(name)`` returns a loss's :class:`LossSpec` (parameters, input contract, references).
"""
from ._registry import Forms, LossSpec, ParamSpec, build, get, names, specs
from ._reduction import REDUCTIONS
# Registration order is the order of names(): the classification families, then region
# losses, their combinations and the regression losses.
from . import bce  # noqa: F401,I001  (each import registers its losses)
from . import cross_entropy  # noqa: F401
from . import focal  # noqa: F401
from . import region  # noqa: F401
from . import generalized_dice  # noqa: F401
from . import combo  # noqa: F401
from . import regression  # noqa: F401
from .bce import *  # noqa: F401,F403
from .combo import *  # noqa: F401,F403
from .cross_entropy import *  # noqa: F401,F403
from .focal import *  # noqa: F401,F403
from .generalized_dice import *  # noqa: F401,F403
from .region import *  # noqa: F401,F403
from .regression import *  # noqa: F401,F403

# Everything each family module exports: its modules, functions and statistics kernels.
__all__ = ["Forms", "LossSpec", "ParamSpec", "REDUCTIONS", "build", "get", "names", "specs"] + [
    name for family in (bce, cross_entropy, focal, region, generalized_dice, combo, regression) for name in family.__all__
]
