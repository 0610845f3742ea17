r"""Shared, scriptable machinery for weights, class vectors and reductions (docs/architecture.md).

Every loss is a *statistics kernel*, ``(predictions, targets, weights, hyperparameters)`` to ``values`` (the
unreduced, weighted losses of ``reduction="none"``), ``totals`` (a float64 vector of *additive* sufficient
statistics: those of concatenated batches are the sum of theirs, which makes ``ScoreStream`` exact) and
``sample_totals`` (the same per sample, ``(N, K)``, when asked; with ``values=False`` a caller reads the
totals alone, and a kernel may return empty values: :func:`sums_only`); and a *reductions kernel*, totals
``(..., K)`` to ``(..., 3)`` = ``[sum, mean, weighted_mean]`` in float64. Elementwise totals are
``[Σ w·ℓ, Σ w, Σ d, n]``: the weighted loss sum, the sum of the full effective weights ``w``, of the ``mean``
denominators ``d`` (1 per counted element, or the target's class weight for CE/NLL/focal, as in torch) and
the element count.

Hyperparameters enter kernels as 0-d tensors: one code is scripted, and traced for ONNX with them as graph
inputs, never branching on their values. Outside export a kernel may read one on the host, use torch's fused
ops and update its own temporaries in place (``if is_tracing(): <export form> else: <fast form>``, the same
formula), where that is at least 1.5x faster on 1e6 elements (``python bench/bench_kernels.py --forms``);
in eager Python, :mod:`._autograd` adds closed-form backward passes under the same rule. A kernel sums its
totals alone with torch's fused kernel (:func:`sums_only`) where that is faster or, within 10 % of the
time, holds less memory (``python bench/bench_kernels.py --sums``; docs/benchmarks.md, "values=False").
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

REDUCTIONS: List[str] = ["none", "mean", "sum", "weighted_mean"]
# Column of each scalar reduction in the output of a reductions kernel.
REDUCTION_COLUMNS: List[str] = ["sum", "mean", "weighted_mean"]


def unset_int() -> int:
    r"""The value an optional integer hyperparameter left unset (``None``) has in an exported graph, whose inputs
    are tensors: int64's smallest, which its ParamSpec's range excludes. (A function: scripted code cannot read
    a global.)"""
    return -9223372036854775807 - 1


UNSET_INT = unset_int()


def is_tracing() -> bool:
    r"""True while ``torch.export`` (and so the ONNX exporter) or ``torch.compile`` traces the code.

    A tracer cannot follow a value read on the host back into Python without a graph break, so a
    kernel then takes its traceable form (no ``if`` on a tensor's value, no ``.item()``) and skips the
    value checks that need a host sync: an exported graph receives inputs the server has validated,
    and a compiled module is checked by running it eagerly. Never true in TorchScript, whose trainers
    (``setattr`` from C++) keep every check.
    """
    if not torch.jit.is_scripting():
        return torch.compiler.is_compiling()
    return False


def check_reduction(reduction: str) -> str:
    # Spelled out: TorchScript cannot read module-level lists.
    if reduction not in ["none", "mean", "sum", "weighted_mean"]:
        raise ValueError("reduction must be one of 'none', 'mean', 'sum', 'weighted_mean', got '{}'".format(reduction))
    return reduction


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    r"""The dtype a loss is computed in: float16/bfloat16 are promoted to float32."""
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return torch.float32
    if dtype == torch.float32 or dtype == torch.float64:
        return dtype
    raise ValueError(
        "predictions must be a floating-point tensor (float16, bfloat16, float32 or float64), got {}".format(dtype)
    )


def check_range(value: Tensor, name: str, high: float, expected: str) -> Optional[float]:
    r"""``ValueError`` unless ``0 <= value <= high``, outside export: one host read and Python comparisons (NaN
    fails both) rather than a tensor expression. The number read (``None`` while tracing); ``value`` may be that
    Python number already."""
    if is_tracing():
        return None
    number = float(value)
    if not (number >= 0.0 and number <= high):
        raise ValueError("{} must be {}, got {}".format(name, expected, number))
    return number


def as_float(x: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    r"""``x`` converted to the compute dtype; integer and bool tensors are accepted as values."""
    if x.is_complex():
        raise ValueError("{} must be a real tensor, got {}".format(name, x.dtype))
    return in_dtype(x, dtype)


def in_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    r"""``x.to(dtype)``, without the call where ``x`` has that dtype: a conversion that changes nothing still costs
    a dispatch, which a small batch notices."""
    if x.dtype == dtype:
        return x
    return x.to(dtype)


def eager_python() -> bool:
    r"""True in eager Python: neither TorchScript nor a tracer (:func:`is_tracing`). There a kernel takes its
    hyperparameters as Python numbers (the ``*_hyperparameter`` functions): a 0-d tensor costs an op at each
    use, and a read on the host to branch on it, which a small batch notices. The kernels read a hyperparameter
    with ``float``, ``int`` and ``bool`` (which take both) and :func:`hyperparameter_in`."""
    if not torch.jit.is_scripting():
        return not is_tracing()
    return False


def float_hyperparameter(value: float, predictions: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""A float hyperparameter as a kernel takes it: a 0-d tensor of ``dtype``, by default the compute dtype (not
    the predictions': ``label_smoothing=0.1`` stays exact to float32 for float16 inputs), the Python ``float`` in
    eager Python (:func:`eager_python`)."""
    if not torch.jit.is_scripting():
        if eager_python():
            return float(value)
    tensor_dtype = compute_dtype(predictions.dtype) if dtype is None else dtype
    return torch.full([], value, dtype=tensor_dtype, device=predictions.device)


def int_hyperparameter(value: int, predictions: Tensor) -> Tensor:
    r"""An integer hyperparameter (``ignore_index``, ``balance_index``) as a 0-d int64 tensor, the ``int`` in eager
    Python."""
    if not torch.jit.is_scripting():
        if eager_python():
            return int(value)
    return torch.full([], value, dtype=torch.int64, device=predictions.device)


def bool_hyperparameter(value: bool, predictions: Tensor) -> Tensor:
    r"""A boolean hyperparameter as a 0-d bool tensor, the ``bool`` in eager Python."""
    if not torch.jit.is_scripting():
        if eager_python():
            return bool(value)
    return torch.full([], value, dtype=torch.bool, device=predictions.device)


def hyperparameter_in(value: Tensor, dtype: torch.dtype) -> Tensor:
    r"""A hyperparameter of the ``*_hyperparameter`` functions in ``dtype`` (e.g. to compare a tensor of that dtype
    with it); a Python number as it is."""
    if not torch.jit.is_scripting():
        if not isinstance(value, Tensor):
            return value
    return in_dtype(value, dtype)


def optional_ignore_index(ignore_index: Optional[int], ignored_in_mean: bool, predictions: Tensor) -> Tuple[
    Optional[Tensor], Optional[Tensor]
]:
    r"""A binary loss's ``(ignore_index, ignored_in_mean)`` as its kernel takes them: ``(None, None)`` when nothing
    is ignored, so that such a call builds no mask (the exporter passes tensors always: graph inputs)."""
    if ignore_index is None:
        return None, None
    return int_hyperparameter(ignore_index, predictions), bool_hyperparameter(ignored_in_mean, predictions)


def binary_kept(targets: Tensor, ignore_index: Optional[Tensor]) -> Optional[Tensor]:
    r"""Where dense ``targets`` are not ``ignore_index`` (bool, their shape); ``None`` when nothing can be ignored.
    An exported graph always has the input: :data:`UNSET_INT` there means that nothing is ignored."""
    if ignore_index is None:
        return None
    kept = targets != hyperparameter_in(ignore_index, targets.dtype)
    if is_tracing():
        kept = kept | (ignore_index == unset_int())
    return kept


def ignored_targets_zeroed(targets: Tensor, kept: Optional[Tensor]) -> Tensor:
    r"""Binary ``targets`` with 0 where ignored: an ignored value (255, -100) never enters a formula."""
    if kept is None:
        return targets
    return torch.where(kept, targets, torch.zeros_like(targets))


def vector_argument(value: Optional[Tensor]) -> Optional[Tensor]:
    r"""A per-class vector argument of a loss function as a tensor: eager callers may also pass a
    list, a tuple or a numpy array, as the modules take them (scripted code has a tensor already)."""
    if not torch.jit.is_scripting():
        if value is not None and not isinstance(value, Tensor):
            return torch.as_tensor(value)
    return value


def accumulate(x: Tensor, dims: Optional[List[int]] = None) -> Tensor:
    r"""Sum ``x`` (over ``dims``, or everything) into float64. PyTorch's float32 sums are cascaded (about 1e-8
    relative on 1.6e7 elements) and cast after, as a float64 copy costs 20x the sum; ONNX Runtime's ReduceSum
    accumulates naively, so while exporting the values are cast to float64 before the sum."""
    if is_tracing():
        x = x.to(torch.float64)
        return x.sum() if dims is None else x.sum(dims)
    return (x.sum() if dims is None else x.sum(dims)).to(torch.float64)


def normalize_class_dim(class_dim: int, ndim: int) -> int:
    if ndim < 2:
        raise ValueError(
            "predictions need a class dimension: expected at least 2 dimensions (N, C, *), got {}".format(ndim)
        )
    dim = class_dim + ndim if class_dim < 0 else class_dim
    if dim < 1 or dim >= ndim:
        raise ValueError(
            "class_dim must index a non-batch dimension of the {}-d predictions (1..{} or -{}..-1), got {}".format(
                ndim, ndim - 1, ndim - 1, class_dim
            )
        )
    return dim


def class_vector(vec: Tensor, num_classes: int, ndim: int, class_dim: int, name: str) -> Tensor:
    r"""A per-class weight, 1-d of length ``C`` (or a single value), viewed along ``class_dim`` of an ``ndim``-d
    tensor; a tensor already shaped to broadcast (e.g. ``(C, 1, 1)``) keeps torch's broadcasting meaning."""
    if vec.dim() == 0:
        return vec
    if vec.dim() == 1:
        if vec.numel() != num_classes:
            raise ValueError(
                "{} must have one entry per class: expected {} (the size of dim {} of predictions), got {}".format(
                    name, num_classes, class_dim, vec.numel()
                )
            )
        shape = [1] * ndim
        shape[class_dim] = vec.numel()
        return vec.reshape(shape)
    if vec.dim() > ndim:
        raise ValueError(
            "{} of shape {} has more dimensions than the {}-d predictions".format(name, list(vec.shape), ndim)
        )
    return vec


def class_setting(vec: Tensor, shape: List[int], class_dim: int, name: str) -> Tensor:
    r"""A per-class setting (``class_weight``, ``pos_weight``, ``alpha``) shaped for ``shape``; predictions
    without a class dimension (``(N,)``) take a scalar or a one-element vector."""
    if vec.dim() == 0:
        return vec
    if len(shape) < 2:
        if vec.numel() != 1:
            raise ValueError(
                "{} must be a single value for predictions of shape {} (no class dimension), got {} values".format(
                    name, shape, vec.numel()
                )
            )
        return vec.reshape([1] * len(shape))
    dim = normalize_class_dim(class_dim, len(shape))
    return class_vector(vec, shape[dim], len(shape), dim, name)


def broadcastable(shape: List[int], target: List[int]) -> bool:
    if len(shape) > len(target):
        return False
    offset = len(target) - len(shape)
    for i in range(len(shape)):
        if shape[i] != 1 and shape[i] != target[offset + i]:
            return False
    return True


def check_real(weights: Tensor, name: str) -> None:
    if weights.is_complex() or weights.dtype == torch.bool:
        raise ValueError("{} must be a real floating-point or integer tensor, got {}".format(name, weights.dtype))


def sample_or_element_weights(weights: Tensor, shape: List[int]) -> Tensor:
    r"""Call-time ``weights`` as a tensor that broadcasts to the loss's elementwise ``shape``: ``(N,)`` is one
    weight per sample, along dim 0 whatever the rank; any other shape must broadcast to ``shape``."""
    check_real(weights, "weights")
    if len(shape) > 1 and weights.dim() == 1 and weights.shape[0] == shape[0]:
        view = [1] * len(shape)
        view[0] = shape[0]
        return weights.reshape(view)
    if not broadcastable(list(weights.shape), shape):
        raise ValueError(
            "weights of shape {} cannot be applied to the loss's elementwise shape {}: expected ({},) for one weight "
            "per sample or a shape that broadcasts to {}".format(
                list(weights.shape), shape, shape[0] if len(shape) > 0 else 0, shape
            )
        )
    return weights


def effective_weight(
    shape: List[int], weights: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int, dtype: torch.dtype,
) -> Optional[Tensor]:
    r"""``weights · class_weight`` (:func:`sample_or_element_weights`, :func:`class_setting`) shaped to broadcast to
    ``shape``; ``None`` if neither is set."""
    weight: Optional[Tensor] = None
    if weights is not None:
        weight = sample_or_element_weights(weights, shape).to(dtype)
    if class_weight is not None:
        vec = class_setting(class_weight.to(dtype), shape, class_dim, "class_weight")
        weight = vec if weight is None else weight * vec
    return weight


def weighted_statistics(
    loss: Tensor, weights: Optional[Tensor], class_weight: Optional[Tensor], class_dim: int, dtype: torch.dtype,
    per_sample: bool, per_class: bool = False, kept: Optional[Tensor] = None, ignored_in_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Statistics of the unreduced ``loss`` weighted by :func:`effective_weight`, each element counting 1
    in the ``mean`` denominator (as torch's elementwise losses); with ``per_class`` the class totals of its
    channels (:func:`class_totals`). ``kept`` (:func:`binary_kept`) gives ignored elements weight 0 and, unless
    ``ignored_in_mean``, no place in the ``mean`` denominator. ``loss`` is the caller's own temporary: outside
    export and autograd it is weighted in place."""
    weight = effective_weight(list(loss.shape), weights, class_weight, class_dim, dtype)
    denominator: Optional[Tensor] = None
    if kept is not None:
        keep = kept.to(dtype)
        weight = keep if weight is None else weight * keep
        denominator = ignored_denominator(keep, ignored_in_mean)
    if weight is not None:
        recording = torch.is_grad_enabled() and loss.requires_grad
        loss = loss * weight if is_tracing() or recording else loss.mul_(weight)
    dim = normalize_class_dim(class_dim, loss.dim()) if per_class and loss.dim() > 1 else 0
    return elementwise_statistics(loss, weight, denominator, per_sample, per_class, dim)


def ignored_denominator(keep: Tensor, ignored_in_mean: Optional[Tensor]) -> Optional[Tensor]:
    r"""The ``mean`` denominator of a loss with ignored elements: ``keep`` (1 where not ignored), or 1 everywhere
    (``None``) with ``ignored_in_mean`` (read on the host outside export)."""
    if ignored_in_mean is None:
        return keep
    if is_tracing():
        return torch.where(ignored_in_mean, torch.ones_like(keep), keep)
    if bool(ignored_in_mean):
        return None
    return keep


# The hints of shape_mismatch_message, by what a loss makes of targets that look like class indices.
# Functions rather than constants: scripted code cannot read a global str.
def one_target_per_prediction_hint() -> str:
    r"""Binary and regression losses: one target per prediction."""
    return (
        "these targets look like class indices, and this loss takes one target per prediction: "
        'use cross_entropy, focal, or a region loss with mode="multiclass" for class indices'
    )


def multiclass_mode_hint() -> str:
    r"""Region losses in binary or multilabel mode."""
    return 'these targets look like class indices: set mode="multiclass" for (N, C, *) logits with class-index targets'


def label_map_hint() -> str:
    r"""Losses that take class indices without a class dimension (cross_entropy, focal)."""
    return "class-index targets have no class dimension: squeeze out its size-1 dimension"


def shape_mismatch_message(predictions_shape: List[int], targets_shape: List[int], class_dim: int, hint: str) -> str:
    r"""Why ``targets_shape`` does not fit, with ``hint`` when the targets look like class indices:
    the predictions' shape without their class dimension, or with it of size 1."""
    message = "targets must have the shape of predictions: predictions {} vs targets {}".format(
        predictions_shape, targets_shape
    )
    rank = len(predictions_shape)
    dim = class_dim + rank if class_dim < 0 else class_dim
    if rank < 2 or dim < 1 or dim >= rank or predictions_shape[dim] < 2:
        return message
    without_classes = predictions_shape[:dim] + predictions_shape[dim + 1:]
    one_channel = predictions_shape[:dim] + [1] + predictions_shape[dim + 1:]
    if targets_shape == without_classes or targets_shape == one_channel:
        return message + "; " + hint
    return message


def check_same_shape(predictions: Tensor, targets: Tensor, class_dim: int, hint: str) -> None:
    r"""``ValueError`` (:func:`shape_mismatch_message`) unless ``targets`` has the predictions' shape."""
    if predictions.shape != targets.shape:
        raise ValueError(shape_mismatch_message(list(predictions.shape), list(targets.shape), class_dim, hint))


def power(base: Tensor, exponent: Tensor) -> Tensor:
    r"""``base ** exponent`` for a 0-d hyperparameter ``exponent`` (e.g. the focal ``γ``). With a 0-d tensor
    exponent ``torch.pow`` is ~15x slower than with a Python number (which also takes the ``x·x`` shortcut for
    2), so the exponent is read on the host (or taken as the Python number it may be), except while exporting (the
    graph keeps it as an input)."""
    if is_tracing():
        return torch.pow(base, exponent.to(base.dtype))
    return torch.pow(base, float(exponent))


def _element_count(shape: List[int]) -> float:
    count = 1.0
    for size in shape:
        count *= size
    return count


def _left_padded(x: Tensor, ndim: int) -> Tensor:
    r"""``x`` viewed with ``ndim`` dimensions, as broadcasting aligns it (size-1 dims in front)."""
    if x.dim() == ndim:
        return x
    return x.reshape([1] * (ndim - x.dim()) + list(x.shape))


def total_sum(x: Optional[Tensor], shape: List[int], device: torch.device) -> Tensor:
    r"""Float64 sum of ``x`` broadcast to ``shape`` (``None`` counts 1 per element). Outside export a broadcast
    ``x`` (per-sample weights, a class vector) is summed as it is, times its repetition by broadcasting."""
    if x is None:
        return _element_count_tensor(shape, device)
    if is_tracing():
        return accumulate(x.expand(shape))
    # max(.., 1): an empty x sums to 0 whatever the factor.
    repeats = _element_count(shape) / max(_element_count(list(x.shape)), 1.0)
    if repeats == 1.0:
        return accumulate(x)
    return accumulate(x) * repeats


def per_sample_sum(x: Optional[Tensor], shape: List[int], device: torch.device) -> Tensor:
    r"""Float64 sums of ``x`` broadcast to ``shape`` over every dimension but the first."""
    if x is None:
        return torch.full([shape[0]], _element_count(shape[1:]), dtype=torch.float64, device=device)
    if len(shape) == 1:
        return x.expand(shape).to(torch.float64)
    if is_tracing():
        return accumulate(x.expand(shape), list(range(1, len(shape))))
    # As in total_sum: sum x where it is stored and scale by its repetition over dims 1.. .
    x = _left_padded(x, len(shape))
    repeats = _element_count(shape[1:]) / max(_element_count(list(x.shape[1:])), 1.0)
    return (accumulate(x, list(range(1, len(shape)))) * repeats).expand(shape[0])


def class_totals(
    weighted_loss: Tensor, weight: Optional[Tensor], denominator: Optional[Tensor], class_dim: int,
    membership: Optional[Tensor] = None,
) -> Tensor:
    r"""``(C, 4)`` per-class elementwise totals ``[Σ m·w·ℓ, Σ m·w, Σ m·d, Σ m]`` in float64.

    Without ``membership`` each element belongs to its own class along ``class_dim`` of ``weighted_loss``
    (a dense loss: a channel is a class; no class dimension, ``(N,)``, is one class). With it, ``membership``
    ``m`` (float, the predictions' shape, classes along ``class_dim``) says how much of each element of
    ``weighted_loss`` (which has no class dimension) counts for each class: the one-hot of its target class
    (nothing where ignored), or its class probabilities, which split it."""
    shape = list(weighted_loss.shape)
    device = weighted_loss.device
    if membership is None:
        if len(shape) < 2:
            return torch.stack(
                [
                    accumulate(weighted_loss), total_sum(weight, shape, device), total_sum(denominator, shape, device),
                    total_sum(None, shape, device),
                ]
            ).unsqueeze(0)
        ones = torch.ones_like(weighted_loss)
        dims = _dims_but(len(shape), class_dim)
        return torch.stack(
            [
                accumulate(weighted_loss, dims), accumulate(_or_ones(weight, ones), dims),
                accumulate(_or_ones(denominator, ones), dims), accumulate(ones, dims),
            ],
            dim=1,
        )
    dims = _dims_but(membership.dim(), class_dim)
    return torch.stack(
        [
            accumulate(membership * weighted_loss.unsqueeze(class_dim), dims),
            accumulate(_member_share(membership, weight, shape, class_dim), dims),
            accumulate(_member_share(membership, denominator, shape, class_dim), dims), accumulate(membership, dims),
        ],
        dim=1,
    )


def _dims_but(ndim: int, excluded: int) -> List[int]:
    dims: List[int] = []
    for dim in range(ndim):
        if dim != excluded:
            dims.append(dim)
    return dims


def _or_ones(x: Optional[Tensor], ones: Tensor) -> Tensor:
    r"""``x`` broadcast to ``ones``' shape; ``ones`` for ``None``."""
    if x is None:
        return ones
    return x.expand(ones.shape)


def _member_share(membership: Tensor, x: Optional[Tensor], shape: List[int], class_dim: int) -> Tensor:
    r"""``m · x`` of :func:`class_totals`, ``x`` (``None``: 1) broadcast to the elementwise ``shape``."""
    if x is None:
        return membership
    return membership * x.expand(shape).unsqueeze(class_dim)


def elementwise_statistics(
    weighted_loss: Tensor, weight: Optional[Tensor], denominator: Optional[Tensor], per_sample: bool,
    per_class: bool = False, class_dim: int = 1, membership: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``(values, totals, sample_totals)`` of an elementwise loss: ``weighted_loss`` is ``w·ℓ`` per element,
    ``weight`` the full effective weight ``w`` and ``denominator`` the ``mean`` denominator ``d`` (both broadcast
    to ``weighted_loss``; ``None`` is 1 per element). Totals are ``[Σ w·ℓ, Σ w, Σ d, n]`` in float64. With
    ``per_class`` the third output is :func:`class_totals` (of ``class_dim`` and ``membership``) instead."""
    values, totals, parts = _elementwise_statistics(weighted_loss, weight, denominator, per_sample and not per_class)
    if per_class:
        parts = class_totals(weighted_loss, weight, denominator, class_dim, membership)
    return values, totals, parts


def _elementwise_statistics(
    weighted_loss: Tensor, weight: Optional[Tensor], denominator: Optional[Tensor], per_sample: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    shape = list(weighted_loss.shape)
    device = weighted_loss.device
    if per_sample and len(shape) > 0 and not is_tracing():
        # Each full-size tensor is read once: the batch totals are the (small) per-sample sums'
        # sum, in float64. The exported graph keeps its own ReduceSums (in float64) for totals.
        sample_totals = _sample_totals(weighted_loss, weight, denominator, shape, device)
        return weighted_loss, sample_totals.sum(0), sample_totals
    if is_tracing():
        totals = torch.stack(
            [
                accumulate(weighted_loss), total_sum(weight, shape, device), total_sum(denominator, shape, device),
                total_sum(None, shape, device),
            ]
        )
    else:
        totals = _eager_totals(weighted_loss, weight, denominator, shape, device)
    if not per_sample or len(shape) == 0:
        sample_totals = totals.unsqueeze(0) if per_sample else totals.new_zeros([0, totals.shape[0]])
        return weighted_loss, totals, sample_totals
    return weighted_loss, totals, _sample_totals(weighted_loss, weight, denominator, shape, device)


def sums_only(values: bool, per_sample: bool) -> bool:
    r"""Whether a kernel may return its totals alone, summed by a fused torch kernel that writes no values:
    the caller reads only the totals (``values=False``: ``forward`` with a scalar reduction), not per sample,
    and the code is not being traced (the export form keeps the formula)."""
    return not values and not per_sample and not is_tracing()


def summed_statistics(
    loss_sum: Tensor, weight: Optional[Tensor], denominator: Optional[Tensor], shape: List[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The statistics of :func:`sums_only`: no values, the totals of :func:`elementwise_statistics` from
    ``loss_sum`` = :math:`\sum w\ell` over an elementwise ``shape``, no sample totals."""
    return totals_alone(loss_sum, _eager_totals(loss_sum, weight, denominator, shape, loss_sum.device))


def weight_summed_statistics(loss_sum: Tensor, weight_sum: Tensor, shape: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    r""":func:`summed_statistics` of a fused kernel that sums the weights too: ``weight_sum`` = :math:`\sum w`, also
    the ``mean`` denominator (torch's ``nll_loss`` total weight, :math:`\sum a_y` of cross-entropy and nll)."""
    count = _element_count_tensor(shape, loss_sum.device)
    return totals_alone(loss_sum, torch.stack([loss_sum, weight_sum, weight_sum, count]))


def totals_alone(like: Tensor, totals: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The statistics of :func:`sums_only`: no values (empty, of ``like``'s dtype), ``totals``, no sample totals."""
    return like.new_empty([0]), totals, totals.new_zeros([0, totals.shape[0]])


def _element_count_tensor(shape: List[int], device: torch.device) -> Tensor:
    return torch.full([], _element_count(shape), dtype=torch.float64, device=device)


def _eager_totals(
    weighted_loss: Tensor, weight: Optional[Tensor], denominator: Optional[Tensor], shape: List[int],
    device: torch.device,
) -> Tensor:
    r"""``[Σ w·ℓ, Σ w, Σ d, n]`` outside export (``weighted_loss`` may be its 0-d sum already): one stack of the
    sums and the element count, float64 by type promotion (the cast accumulate makes).
    On a small batch an op costs more than its arithmetic: columns that count 1 per element need no op, and a
    weight that is also the denominator (CE/NLL/focal without call-time weights) is summed once."""
    count = _element_count_tensor(shape, device)
    loss_sum = weighted_loss if weighted_loss.dim() == 0 else weighted_loss.sum()
    weight_sum = count if weight is None else total_sum(weight, shape, device)
    if denominator is None:
        denominator_sum = count
    elif denominator is weight:
        denominator_sum = weight_sum
    else:
        denominator_sum = total_sum(denominator, shape, device)
    return torch.stack([loss_sum, weight_sum, denominator_sum, count])


def _sample_totals(
    weighted_loss: Tensor, weight: Optional[Tensor], denominator: Optional[Tensor], shape: List[int],
    device: torch.device,
) -> Tensor:
    r"""``(N, 4)`` per-sample ``[Σ w·ℓ, Σ w, Σ d, n]`` of an elementwise loss of ``shape``."""
    return torch.stack(
        [
            per_sample_sum(weighted_loss, shape, device), per_sample_sum(weight, shape, device),
            per_sample_sum(denominator, shape, device), per_sample_sum(None, shape, device),
        ],
        dim=1,
    )


def smoothed_binary_targets(targets: Tensor, label_smoothing: Optional[Tensor]) -> Tensor:
    r"""Binary targets smoothed towards 1/2: :math:`t\,(1 - \varepsilon) + \varepsilon / 2`, torch's label smoothing of
    two outcomes (``cross_entropy``'s :math:`(1 - \varepsilon)\,t + \varepsilon / C` with ``C = 2``). ``targets`` unchanged
    without smoothing (``None``), and for ``ε = 0`` outside export (read on the host: no full-size pass)."""
    if label_smoothing is None:
        return targets
    read = check_range(label_smoothing, "label_smoothing", 1.0, "in [0, 1]")
    if read is not None and read == 0.0:
        return targets
    epsilon = hyperparameter_in(label_smoothing, targets.dtype)
    return targets * (1.0 - epsilon) + 0.5 * epsilon


def unless_ignored(x: Tensor, kept: Optional[Tensor]) -> Tensor:
    r"""``x`` with 0 wherever ``kept`` (bool, broadcast to ``x``; ``None``: everywhere) is False: whatever an
    ignored position holds (padding often holds garbage, NaN or inf), it then adds nothing to the loss, and
    neither NaN nor inf to the gradient, which is 0 there (kornia masks its inputs so too)."""
    if kept is None:
        return x
    return torch.where(kept, x, torch.zeros_like(x))


def safe_divide(numerator: Tensor, denominator: Tensor, otherwise: float = 0.0) -> Tensor:
    r"""``numerator / denominator``, and ``otherwise`` where the denominator is 0 (0: no counted elements); the
    denominator is replaced before dividing so that the gradient stays finite as well."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1.0), otherwise)


def elementwise_reductions(totals: Tensor) -> Tensor:
    r"""``(..., 4)`` elementwise totals to ``(..., 3)`` = ``[sum, mean, weighted_mean]``: ``mean`` is
    ``Σ w·ℓ / Σ d`` and ``weighted_mean`` ``Σ w·ℓ / Σ w``, 0 when nothing is counted (torch's NaN): the quotient
    of column 0 by column :func:`denominator_column` of the reduction."""
    if is_tracing():
        loss_sum = totals[..., 0]
        return torch.stack(
            [
                loss_sum, safe_divide(loss_sum, totals[..., denominator_column(1)]),
                safe_divide(loss_sum, totals[..., denominator_column(2)]),
            ],
            dim=-1,
        )
    if host_totals(totals):
        # One request's totals (what the server reduces): the same float64 divisions on the host, one read
        # and one small tensor instead of a chain of tiny ops.
        sums: List[float] = totals.tolist()
        return host_tensor(host_reductions(sums), totals.device)
    # Batched totals (per-sample reductions) and autograd: the export form's values in half its ops, both
    # quotients at once by the [Σ d, Σ w] columns (denominator_column(1), denominator_column(2): columns 1-2
    # flipped), with safe_divide's guard (finite gradients).
    sums = totals.narrow(-1, 0, 1)
    return torch.cat([sums, safe_divide(sums, totals.narrow(-1, 1, 2).flip(-1))], -1)


def denominator_column(column: int) -> int:
    r"""The column of elementwise totals ``[Σ w·ℓ, Σ w, Σ d, n]`` that divides ``Σ w·ℓ`` for the reduction in
    ``column`` of :data:`REDUCTION_COLUMNS`: ``Σ d`` for ``mean`` (1), ``Σ w`` for ``weighted_mean`` (2)."""
    return 3 - column


def _one_call_on_cpu(totals: Tensor) -> bool:
    r"""Whether elementwise ``totals`` are one call's float64 totals on the CPU: then a host read of them is
    cheaper than any op on them."""
    return totals.dim() == 1 and totals.dtype == torch.float64 and totals.device.type == "cpu"


def host_totals(totals: Tensor) -> bool:
    r"""Whether ``totals`` can be read on the host instead of reduced by ops: :func:`_one_call_on_cpu`, and
    without autograd."""
    return _one_call_on_cpu(totals) and not (torch.is_grad_enabled() and totals.requires_grad)


def host_reductions(totals: List[float]) -> List[float]:
    r""":func:`elementwise_reductions` of one call's totals read on the host (:func:`host_totals`)."""
    return [totals[0], _host_quotient(totals, 1), _host_quotient(totals, 2)]


def host_tensor(values: List[float], device: torch.device) -> Tensor:
    r"""Float64 ``values`` computed on the host as a tensor. TorchScript's ``torch.tensor(list)`` and item
    assignment pass through the default dtype, float32: there each value is filled into its element."""
    if not torch.jit.is_scripting():
        return torch.tensor(values, dtype=torch.float64, device=device)
    result = torch.empty([len(values)], dtype=torch.float64, device=device)
    for position, value in enumerate(values):
        result[position].fill_(value)
    return result


def _host_quotient(totals: List[float], column: int) -> float:
    r"""The reduction in ``column`` of totals read on the host, 0 for a zero denominator."""
    denominator = totals[denominator_column(column)]
    return totals[0] / denominator if denominator != 0.0 else 0.0


def torch_reduction(reduction: str, weight_is_denominator: bool, count: int) -> str:
    r"""The reduction of torch's own (``sum`` or ``mean``, of a loss function or of a tensor) that computes an
    elementwise loss's ``reduction`` over ``count`` elements, for ``forward`` to take it (``Loss.fused_reduction``)
    rather than reduce the statistics' float64 totals; ``""`` where there is none: for ``none``, for
    ``weighted_mean`` unless the loss's weights are its ``mean`` denominators (no weights at all, or
    cross-entropy's class weights: :math:`w = d = a_y`), for a mean of no elements (torch's NaN, our 0), and
    while tracing (the export form keeps the formula)."""
    if is_tracing() or reduction == "none":
        return ""
    if reduction == "sum":
        return reduction
    if count == 0 or (reduction == "weighted_mean" and not weight_is_denominator):
        return ""
    return "mean"


def sum_reduction(total: Tensor, how: str, count: int) -> Tensor:
    r"""A :func:`torch_reduction` ``how`` of ``count`` values from their sum ``total``: the sum itself, or divided
    for ``mean``. The backward of a tensor's ``mean`` writes a full-size gradient (``grad / n``), a sum's is a
    view of one number."""
    if how == "mean":
        return total / count
    return total


def reduce_elementwise(values: Tensor, totals: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    r"""An elementwise loss's result (``forward``'s, the functional forms') from its statistics: ``values`` for
    ``none``, else the column of :func:`elementwise_reductions` that ``reduction`` names, computed alone (the
    others cost ops that a small batch notices), in ``dtype``."""
    if reduction == "none":
        return values.to(dtype)
    column = ["sum", "mean", "weighted_mean"].index(reduction)
    if not is_tracing() and host_totals(totals):
        sums: List[float] = totals.tolist()
        value = sums[0] if column == 0 else _host_quotient(sums, column)
        return torch.full([], value, dtype=dtype, device=totals.device)
    loss_sum = totals[..., 0]
    if column == 0:
        return loss_sum.to(dtype)
    denominator = totals[..., denominator_column(column)]
    if not is_tracing() and _one_call_on_cpu(totals):
        # Autograd records the totals: a host read picks safe_divide's branch, whose gradient is the quotient's.
        if float(denominator.item()) != 0.0:
            return (loss_sum / denominator).to(dtype)
    return safe_divide(loss_sum, denominator).to(dtype)


def select_reduction(values: Tensor, reductions: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    r"""The user-facing result: ``values`` for ``none``, else the chosen column of ``reductions``."""
    if reduction == "none":
        return values.to(dtype)
    return reductions[..., ["sum", "mean", "weighted_mean"].index(reduction)].to(dtype)


def vector_buffer(value: Optional[Tensor]) -> Tensor:
    r"""A per-class tensor setting as a buffer, empty for "not set": unlike an ``Optional`` attribute it follows
    ``module.to(device)`` and C++ can replace it (``module.setattr("class_weight", tensor)``)."""
    if value is None:
        return torch.empty(0)
    return torch.as_tensor(value)


def optional_vector(buffer: Tensor) -> Optional[Tensor]:
    r"""The inverse of :func:`vector_buffer`."""
    if buffer.numel() == 0:
        return None
    return buffer
