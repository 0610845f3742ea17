r"""The hyperparameters that several losses share, each declared once: name, kind, default, range
and the text the docs, ``ListLosses`` and the error messages use.

A family's own hyperparameters (a Dice ``smooth_nr``, a Huber ``delta``) stay in its module; a
shared one whose meaning a family narrows gets its own text with :func:`dataclasses.replace`.
"""
from ._registry import ParamSpec
from ._reduction import REDUCTIONS, UNSET_INT

REDUCTION_PARAM = ParamSpec(
    "reduction", "str", "mean",
    "how values are reduced: none, mean, sum or weighted_mean (each loss's mean: docs/losses.md)",
    choices=tuple(REDUCTIONS),
)
CLASS_DIM_PARAM = ParamSpec(
    "class_dim", "int", 1,
    "dimension of the predictions that holds the classes (1 for (N, C, *), -1 for channels-last)", graph_input=False,
)
CLASS_WEIGHT_PARAM = ParamSpec(
    "class_weight", "vector", None, "per-class weight, length C, applied along class_dim", low=0.0
)
POS_WEIGHT_PARAM = ParamSpec(
    "pos_weight", "vector", None, "weight of positive examples per class (length C along class_dim)", low=0.0
)
IGNORE_INDEX_PARAM = ParamSpec(
    "ignore_index", "int", -100,
    "target value that contributes nothing, neither loss nor mean denominator: a class index, or a mask "
    "value such as 255",
)
# Binary losses ignore nothing by default: their targets need no pass to look for ignored values.
OPTIONAL_IGNORE_INDEX_PARAM = ParamSpec(
    "ignore_index", "int", None,
    "target value (e.g. 255) whose elements contribute nothing: weight 0, and not counted in mean unless "
    "ignored_in_mean; None ignores nothing",
    low=UNSET_INT + 1,
)
IGNORED_IN_MEAN_PARAM = ParamSpec(
    "ignored_in_mean", "bool", False,
    "count ignored elements in mean's denominator, as kornia's binary_focal_loss_with_logits and "
    "segmentation_models_pytorch's SoftBCEWithLogitsLoss do (False: as torch's cross_entropy and smp's FocalLoss)",
)
LABEL_SMOOTHING_PARAM = ParamSpec(
    "label_smoothing", "float", 0.0, "torch's label smoothing: target distribution (1-ε)·onehot + ε/C", low=0.0, high=1.0
)
GAMMA_PARAM = ParamSpec("gamma", "float", 2.0, "focusing parameter γ of (1 - p_t)^γ", low=0.0)
