r"""The canonical ONNX layout: how a request's tensors are fed to an exported ``<loss>.onnx`` graph.

An ONNX graph has a fixed rank, while the losses accept ``(N, C, *)`` (or ``(N, *, C)`` with
``class_dim=-1``, or ``(N,)``). Every exported graph therefore runs on one canonical layout:

============== ================================================================================
graph input    canonical shape / dtype
============== ================================================================================
predictions    ``(N, C, S)`` float32: the class dimension moved to 1, the other non-batch
               dimensions flattened into ``S``; ``(N,)`` becomes ``(N, 1, 1)``
targets        dense targets ``(N, C, S)`` float32, or class indices ``(N, S)`` int64 (decided by
               rank: targets with one dimension less than the predictions are class indices)
weights        float32 with exactly the canonical shape of the weighted tensor (the ``values``
               output, or the predictions for region losses); ``None`` is fed as ones; ``(N,)``
               weights are materialised to that shape, except for region losses (below)
sample_weights region losses only (``spec.pixel_weights``), right after ``weights``:
               ``(N,)`` float32 per-sample weights. Region losses give ``(N,)`` weights a
               per-sample meaning (they weight a sample's overlap) that pixel weights cannot
               express, so a request's ``(N,)`` weights go here with ``weights`` all ones, and
               any other weights go to ``weights`` with ``sample_weights`` all ones
<param>        every ``graph_input=True`` hyperparameter but ``reduction``: float → 0-d float32,
               int → 0-d int64 (an unset optional one: ``UNSET_INT``), bool → 0-d bool, a string
               choice → 0-d int64, its index in ``choices``,
               vector → ``(C,)`` float32 (unset vectors are fed as ones); float_or_vector → ``(C,)``, or 0-d in its ``<name>=scalar`` variant
reduction      0-d int64 code: ``REDUCTION_CODES`` (none=0, mean=1, sum=2, weighted_mean=3)
============== ================================================================================

Outputs (``ONNX_OUTPUTS``): ``loss`` -- float64 scalar, the reduction selected by the code (for
``none`` it holds the ``sum``); ``values`` -- float32 weighted unreduced losses in the canonical
layout; ``totals`` -- float64 additive statistics ``(K,)``; ``sample_totals`` -- float64 ``(N, K)``;
``class_totals`` -- float64 ``(C, K_c)``, one row per class (``Forms.class_totals``).

``graph_input=False`` parameters (string choices such as a dice ``mode``) select an exported
*variant* (``spec.variants``); ``class_dim`` is absorbed by the layout (graphs use class_dim=1).
A loss whose targets may be class indices or probabilities gets a ``targets=probabilities``
variant besides the class-index graph, and a ``float_or_vector`` parameter (focal's ``alpha``) a
``<name>=scalar`` variant taking it as a 0-d input.

Usage (the server's ONNX backend)::

    feeds, restore = to_canonical(spec, params, predictions, targets, weights)
    variant = request_variant(spec, params, predictions.shape, targets.shape)
    session = sessions[onnx_file_name(spec, variant)]   # e.g. "focal.onnx"; names in manifest.json
    loss, values, totals, sample_totals, class_totals = session.run(ONNX_OUTPUTS, feeds)
    values = restore(values)          # back to the caller's layout

float16 / bfloat16 / float64 requests are cast to float32: the graphs are float32 and accumulate
every reduction in float64.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .losses import Forms, LossSpec, ParamSpec
from .losses._reduction import (
    UNSET_INT,
    label_map_hint,
    multiclass_mode_hint,
    one_target_per_prediction_hint,
    shape_mismatch_message,
)

REDUCTION_CODES: Dict[str, int] = {"none": 0, "mean": 1, "sum": 2, "weighted_mean": 3}
ONNX_OUTPUTS: List[str] = ["loss", "values", "totals", "sample_totals", "class_totals"]
LAYOUT_PARAMS = ("class_dim",)
TARGETS_VARIANT = "targets"
SCALAR_FORM = "scalar"
PROBABILITY_TARGETS = "probabilities"
SAMPLE_WEIGHTS = "sample_weights"

Restore = Callable[[np.ndarray], np.ndarray]


def structural_params(spec: LossSpec) -> List[ParamSpec]:
    r"""The ``graph_input=False`` parameters that select a variant (``class_dim`` is the layout's)."""
    return [p for p in spec.params if not p.graph_input and p.name not in LAYOUT_PARAMS]


def graph_params(spec: LossSpec) -> List[ParamSpec]:
    r"""The hyperparameters that are ONNX graph inputs, in input order (``reduction`` excluded)."""
    return [p for p in spec.params if p.graph_input and p.name != "reduction"]


def _structural_variants(spec: LossSpec) -> List[Dict[str, Any]]:
    r"""``spec.variants`` without layout parameters, deduplicated, default (``{}``) first."""
    names = {p.name for p in structural_params(spec)}
    found: List[Dict[str, Any]] = []
    for variant in spec.variants:
        cleaned = {k: v for k, v in variant.items() if k in names}
        if cleaned not in found:
            found.append(cleaned)
    if {} in found:
        found.remove({})
    return [{}] + found


def variants(spec: LossSpec) -> List[Dict[str, Any]]:
    r"""Every exported ONNX variant of ``spec``, default first.

    A variant is a dict of structural parameter settings (``spec.variants`` without layout
    parameters), plus ``{"targets": "probabilities"}`` for the settings of a loss that accepts both
    target forms whose natural targets are class indices (e.g. ``cross_entropy``, a multiclass
    dice; a multilabel dice already takes dense targets).
    """
    found = _structural_variants(spec)
    found = found + [
        dict(v, **{TARGETS_VARIANT: PROBABILITY_TARGETS}) for v in found if forms(spec, v).probabilities_besides_indices
    ]
    for param in scalar_form_params(spec):
        found = found + [dict(v, **{param.name: SCALAR_FORM}) for v in found]
    return found


def scalar_form_params(spec: LossSpec) -> List[ParamSpec]:
    r"""``float_or_vector`` graph inputs: a scalar may mean more than C copies (focal's ``alpha``
    with ``balance_index``), so the scalar form is its own variant with a 0-d input."""
    return [p for p in graph_params(spec) if p.kind == "float_or_vector"]


def forms(spec: LossSpec, variant: Dict[str, Any]) -> Forms:
    r"""The declared :class:`~loss_service.losses.Forms` of a variant's structural settings."""
    return spec.forms_of(structural_settings(spec, variant))


def structural_settings(spec: LossSpec, variant: Dict[str, Any]) -> Dict[str, Any]:
    r"""The structural parameter settings of a variant (without its target / scalar-form keys)."""
    names = {p.name for p in structural_params(spec)}
    return {k: v for k, v in variant.items() if k in names}


def variant_params(spec: LossSpec, variant: Dict[str, Any]) -> Dict[str, Any]:
    r"""Parameters a variant is computed with by default: its structural settings, and for a
    scalar-form key the parameter's default if it is a number, else the middle of its range."""
    params = structural_settings(spec, variant)
    for param in scalar_form_params(spec):
        if variant.get(param.name) == SCALAR_FORM:
            if isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
                params[param.name] = float(param.default)
            else:
                low = 0.0 if param.low is None else param.low
                high = low + 1.0 if param.high is None else param.high
                params[param.name] = (low + high) / 2
    return params


def variant_key(variant: Dict[str, Any]) -> str:
    r"""``""`` for the default variant, else ``"mode=multiclass,targets=probabilities"`` (sorted)."""
    return ",".join(f"{k}={_text(variant[k])}" for k in sorted(variant))


def onnx_file_name(spec: LossSpec, variant: Dict[str, Any]) -> str:
    r"""``<loss>.onnx`` for the default variant, else ``<loss>--<key>--<key>.onnx``."""
    if not variant:
        return f"{spec.name}.onnx"
    return spec.name + "".join(f"--{k}={_text(variant[k])}" for k in sorted(variant)) + ".onnx"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def targets_are_indices(predictions_shape: Sequence[int], targets_shape: Sequence[int]) -> bool:
    r"""Class-index targets have one dimension less than the predictions; dense targets the same rank."""
    if len(targets_shape) == len(predictions_shape) - 1:
        return True
    if len(targets_shape) == len(predictions_shape):
        return False
    raise ValueError(
        "targets must have the rank of predictions (dense targets) or one dimension less (class indices): "
        f"predictions {list(predictions_shape)} vs targets {list(targets_shape)}"
    )


class NoExportedGraph(ValueError):
    r"""Valid settings that no exported ONNX graph computes (other losses' errors are plain ``ValueError``\ s)."""


def variant_of(
    spec: LossSpec, params: Dict[str, Any], index_targets: bool, shapes: Optional[Tuple[Sequence[int], Sequence[int]]] = None
) -> Dict[str, Any]:
    r"""The exported variant that computes ``spec`` with ``params`` on this target form.

    Raises ``ValueError`` when the setting does not take this target form (given the request's
    ``(predictions, targets)`` ``shapes``, with the eager kernel's message), and
    :class:`NoExportedGraph` naming the setting when no exported graph has it.
    """
    defaults = spec.defaults()
    structural = structural_params(spec)
    wanted = {p.name: params.get(p.name, defaults[p.name]) for p in structural}
    for base in _structural_variants(spec):
        if {p.name: base.get(p.name, defaults[p.name]) for p in structural} != wanted:
            continue
        base_forms = forms(spec, base)
        natural_index = base_forms.index_targets
        scalar_forms = {
            p.name: SCALAR_FORM for p in scalar_form_params(spec) if _is_number(params.get(p.name, defaults[p.name]))
        }
        if index_targets == natural_index:
            return dict(base, **scalar_forms)
        if base_forms.probabilities_besides_indices:
            return dict(base, **{TARGETS_VARIANT: PROBABILITY_TARGETS}, **scalar_forms)
        if shapes is not None and not natural_index:
            raise ValueError(shape_mismatch(spec, dict(defaults, **params), False, *shapes))
        raise ValueError(
            f"{spec.name} with {variant_key(base) or 'the default settings'} takes "
            f"{'class-index' if natural_index else 'dense'} targets, got {'class-index' if index_targets else 'dense'} targets"
        )
    raise NoExportedGraph(
        f"{spec.name}: no exported ONNX graph for {variant_key(wanted)}; exported settings: "
        f"{', '.join(variant_key(v) or '(default)' for v in _structural_variants(spec))}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def has_sample_weights_input(spec: LossSpec) -> bool:
    r"""Whether the graphs of ``spec`` take a ``sample_weights`` ``(N,)`` input next to ``weights``
    (``spec.pixel_weights``: the region losses)."""
    return spec.pixel_weights


def weight_input_names(spec: LossSpec) -> List[str]:
    r"""``["weights"]``, or ``["weights", "sample_weights"]`` for :func:`has_sample_weights_input`."""
    return ["weights", SAMPLE_WEIGHTS] if has_sample_weights_input(spec) else ["weights"]


def onnx_input_names(spec: LossSpec) -> List[str]:
    r"""Graph input names in order: predictions, targets, weights, [sample_weights], hyperparameters,
    reduction; the same for every variant of a loss."""
    return ["predictions", "targets"] + weight_input_names(spec) + [p.name for p in graph_params(spec)] + ["reduction"]


def example_inputs(
    spec: LossSpec,
    variant: Dict[str, Any],
    batch: int,
    num_classes: int,
    spatial: Tuple[int, ...],
    generator: torch.Generator,
    dtype: torch.dtype,
    params: Optional[Dict[str, Any]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Valid random ``(predictions, targets)`` of shape ``(batch, num_classes, *spatial)`` for a variant.

    ``spec.make_inputs`` with the variant's settings; for the ``targets=probabilities`` variant the
    class indices it draws are replaced by random probability vectors along dim 1.
    """
    settings = variant_params(spec, variant)
    settings.update(params or {})
    predictions, targets = spec.make_inputs(batch, num_classes, tuple(spatial), generator, dtype, settings)
    if variant.get(TARGETS_VARIANT) == PROBABILITY_TARGETS and targets.dim() == predictions.dim() - 1:
        logits = torch.randn(predictions.shape, generator=generator, dtype=torch.float64)
        targets = torch.softmax(logits, dim=1).to(dtype)
    return predictions, targets


def values_layout(spec: LossSpec, variant: Dict[str, Any]) -> str:
    r"""Shape of the ``values`` output in the canonical layout: ``"NCS"``, ``"NS"``, ``"NC"``, ``"C"``, ``"N"`` or
    ``"1"``."""
    return forms(spec, variant).values


def weights_layout(spec: LossSpec, variant: Dict[str, Any]) -> str:
    r"""Canonical shape of the ``weights`` input: the predictions' for pixel weights, else the values'."""
    return "NCS" if spec.pixel_weights else values_layout(spec, variant)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def shape_mismatch(
    spec: LossSpec, params: Dict[str, Any], takes_class_indices: bool, predictions_shape, targets_shape
) -> str:
    r"""The eager kernels' message for targets of the wrong shape (:func:`shape_mismatch_message`),
    with the hint the loss's kernel gives: ``params`` are the request's, defaults filled in;
    ``takes_class_indices`` says whether this setting also takes class indices."""
    if takes_class_indices:
        hint = label_map_hint()
    elif any(forms(spec, v).index_targets for v in _structural_variants(spec)):
        hint = multiclass_mode_hint()  # another setting takes class indices: a region loss's multiclass mode
    else:
        hint = one_target_per_prediction_hint()
    return shape_mismatch_message(list(predictions_shape), list(targets_shape), params.get("class_dim", 1), hint)


def _class_dim(spec: LossSpec, params: Dict[str, Any], ndim: int) -> int:
    value = params.get("class_dim", spec.defaults().get("class_dim", 1))
    if ndim < 2:
        return 1
    dim = value + ndim if value < 0 else value
    if dim < 1 or dim >= ndim:
        raise ValueError(
            f"class_dim must index a non-batch dimension of the {ndim}-d predictions (1..{ndim - 1} or "
            f"-{ndim - 1}..-1), got {value}"
        )
    return dim


def _float32(x: np.ndarray, name: str) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise ValueError(f"{name} must be a real tensor, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _hyperparameter_feed(param: ParamSpec, value: Any, num_classes: int, loss: str) -> np.ndarray:
    kind = param.kind
    if kind in ("vector", "float_or_vector"):
        if value is None:
            return np.ones([num_classes], dtype=np.float32)
        if kind == "float_or_vector" and _is_number(value):
            return np.asarray(value, dtype=np.float32)
        vector = _to_numpy(value).astype(np.float32).reshape(-1)
        if vector.size == 1 and num_classes == 1:
            return np.full([num_classes], vector[0], dtype=np.float32)
        if vector.size != num_classes:
            raise ValueError(
                f"{loss}: parameter '{param.name}' must have one entry per class: expected {num_classes}, "
                f"got {vector.size}"
            )
        return vector
    if kind == "float":
        return np.asarray(value, dtype=np.float32)
    if kind == "int":
        return np.asarray(UNSET_INT if value is None else value, dtype=np.int64)
    if kind == "bool":
        return np.asarray(value, dtype=np.bool_)
    if kind == "str" and param.choices is not None:
        return np.asarray(param.choices.index(value), dtype=np.int64)
    raise ValueError(f"{loss}: parameter '{param.name}' of kind {kind} cannot be a graph input")


def to_canonical(
    spec: LossSpec,
    params: Dict[str, Any],
    predictions: Any,
    targets: Any,
    weights: Any = None,
) -> Tuple[Dict[str, np.ndarray], Restore]:
    r"""The ONNX feeds of one request in the canonical layout, and the inverse map of ``values``.

    Args:
        spec: the loss (``losses.get(name)``).
        params: the request's hyperparameters (validated here with ``spec.validate``; missing ones
            take their defaults, including ``reduction``).
        predictions: ``(N, C, *)``, ``(N, *, C)`` with ``class_dim=-1``, or ``(N,)``; numpy or torch.
        targets: same shape (dense) or without the class dimension (class indices).
        weights: ``None``, ``(N,)`` per sample, or broadcastable to the loss's elementwise shape
            (for region losses: to the predictions; their ``(N,)`` weights feed ``sample_weights``).

    Returns:
        ``(feeds, restore)``: ``feeds`` maps every name of :func:`onnx_input_names` to a numpy
        array; ``restore(values)`` reshapes the graph's ``values`` output to the request's layout.
        The graph to run is ``onnx_file_name(spec, request_variant(spec, params, predictions.shape,
        targets.shape))``.
    """
    params = spec.validate(params)
    full = dict(spec.defaults(), **params)
    p, t = _to_numpy(predictions), _to_numpy(targets)
    index_targets = targets_are_indices(p.shape, t.shape)
    variant = variant_of(spec, params, index_targets, (p.shape, t.shape))
    if p.ndim == 0:
        raise ValueError("predictions must have a batch dimension: expected (N, C, *) or (N,), got a scalar")
    grid = _Grid(p, t, index_targets, forms(spec, variant).single_channel, lambda ndim: _class_dim(spec, full, ndim))
    if index_targets:
        if tuple(grid.targets.shape) != grid.shapes["NS"]:
            raise ValueError(
                f"class-index targets must have the shape of predictions without the class dimension: "
                f"expected {list(grid.shapes['NS'])}, got {list(grid.targets.shape)}"
            )
        if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
            raise ValueError(f"class-index targets must be integers, got dtype {t.dtype}")
        canonical_t = np.ascontiguousarray(grid.targets.reshape(grid.batch, grid.size), dtype=np.int64)
    else:
        if grid.targets.shape != grid.predictions.shape:
            takes_class_indices = variant.get(TARGETS_VARIANT) == PROBABILITY_TARGETS
            raise ValueError(shape_mismatch(spec, full, takes_class_indices, p.shape, t.shape))
        canonical_t = _float32(grid.forward(grid.targets, "NCS"), "targets")
    feeds = {"predictions": _float32(grid.forward(grid.predictions, "NCS"), "predictions"), "targets": canonical_t}
    feeds.update(_weight_feeds(spec, variant, grid, weights))
    for param in graph_params(spec):
        feeds[param.name] = _hyperparameter_feed(param, full[param.name], grid.num_classes, spec.name)
    feeds["reduction"] = np.asarray(REDUCTION_CODES[full["reduction"]], dtype=np.int64)
    v_layout = values_layout(spec, variant)
    return feeds, lambda values: grid.restore(values, v_layout)


class _Grid:
    r"""A request's predictions and targets on the canonical grid ``(N, C, S)``: the class dimension
    ``dim`` and the shape of each layout in the request's terms (``shapes``)."""

    def __init__(self, p: np.ndarray, t: np.ndarray, index_targets: bool, single_channel: bool,
                 class_dim: Callable[[int], int]) -> None:
        self.request_shape, self.one_d = tuple(p.shape), p.ndim == 1
        if p.ndim == 1 or (single_channel and p.shape[1] != 1 and t.shape == p.shape):
            # No class dimension: one channel, every non-batch dimension spatial (as the kernels read it).
            p = p.reshape((p.shape[0], 1) + p.shape[1:])
            t = t if index_targets else t.reshape((t.shape[0], 1) + t.shape[1:])
        self.predictions, self.targets, self.dim = p, t, class_dim(p.ndim)
        self.batch, self.num_classes = p.shape[0], p.shape[self.dim]
        self.spatial = tuple(np.moveaxis(p, self.dim, 1).shape[2:])
        self.size = math.prod(self.spatial)
        index_shape = (self.batch,) + tuple(s for i, s in enumerate(p.shape) if i not in (0, self.dim))
        self.shapes = {"NCS": tuple(p.shape), "NS": index_shape, "NC": (self.batch, self.num_classes),
                       "N": (self.batch,), "C": (self.num_classes,), "1": (1,), "": ()}

    def forward(self, x: np.ndarray, layout: str) -> np.ndarray:
        r"""``x`` of the request's ``layout`` shape in the canonical layout."""
        if layout == "NCS":
            return np.moveaxis(x, self.dim, 1).reshape(self.batch, self.num_classes, self.size)
        if layout == "NS":
            return x.reshape(self.batch, self.size)
        return x

    def restore(self, values: np.ndarray, layout: str) -> np.ndarray:
        r"""The inverse of :meth:`forward` for the graph's ``values``."""
        if layout == "NCS":
            out = np.moveaxis(values.reshape((self.batch, self.num_classes) + self.spatial), 1, self.dim)
            return out.reshape(self.batch) if self.one_d else out
        if layout == "NS":
            return values.reshape(self.shapes["NS"])
        return values


def _weight_feeds(spec: LossSpec, variant: Dict[str, Any], grid: _Grid, weights: Any) -> Dict[str, np.ndarray]:
    r"""``weights`` (and ``sample_weights``) feeds: ones where the request sends none."""
    w_layout = weights_layout(spec, variant)
    w_shape = grid.shapes[w_layout]
    w = None if weights is None else _float32(_to_numpy(weights), "weights")
    per_sample = w is not None and w.ndim == 1 and w.shape[0] == grid.batch and not grid.one_d
    if w is not None and not grid.one_d and grid.predictions.shape != grid.request_shape and not per_sample:
        # Weights broadcast against the request's shape, before its channel is inserted.
        w = _broadcast_weights(w, grid.request_shape, grid.batch).reshape(grid.predictions.shape)
    feeds = {}
    if has_sample_weights_input(spec):
        # The rule of the region kernels (region.split_weights): (N,) weights of predictions with
        # more than one dimension weight samples; a graph cannot decide that per request, so they
        # have their own input and the pixel weights are fed as ones.
        feeds[SAMPLE_WEIGHTS] = np.ascontiguousarray(w) if per_sample else np.ones((grid.batch,), dtype=np.float32)
        w = None if per_sample else w
    if w is None:
        canonical = np.ones(grid.forward(np.empty(w_shape, np.float32), w_layout).shape, dtype=np.float32)
    else:
        canonical = np.ascontiguousarray(grid.forward(_broadcast_weights(w, w_shape, grid.batch), w_layout),
                                         dtype=np.float32)
    return {"weights": canonical, **feeds}


def _broadcast_weights(w: np.ndarray, shape: Tuple[int, ...], batch: int) -> np.ndarray:
    r"""``w`` (``(N,)`` per sample, or broadcastable) expanded to ``shape``; ``ValueError`` otherwise."""
    if w.ndim == 1 and len(shape) > 1 and w.shape[0] == batch:
        w = w.reshape((batch,) + (1,) * (len(shape) - 1))
    try:
        return np.broadcast_to(w, shape)
    except ValueError:
        raise ValueError(
            f"weights of shape {list(w.shape)} cannot be applied to the loss's elementwise shape "
            f"{list(shape)}: expected ({batch},) for one weight per sample or a shape that broadcasts "
            f"to {list(shape)}"
        ) from None


def request_variant(spec: LossSpec, params: Dict[str, Any], predictions_shape, targets_shape) -> Dict[str, Any]:
    r"""The variant (and so :func:`onnx_file_name`) that :func:`to_canonical`'s feeds are for."""
    shapes = (predictions_shape, targets_shape)
    return variant_of(spec, spec.validate(params), targets_are_indices(*shapes), shapes)


def select_providers(
    device: str = "auto",
    available: Optional[Sequence[str]] = None,
    gpu_present: Optional[bool] = None,
) -> List[str]:
    r"""ONNX Runtime execution providers for ``device`` (``"auto"``, ``"cpu"`` or ``"cuda"``).

    CUDA is requested only when ONNX Runtime offers ``CUDAExecutionProvider`` *and* a GPU is present
    (``torch.cuda.is_available()`` unless ``gpu_present`` is given), so CPU-only machines with the
    GPU wheel get no provider errors; CPU is always the fallback. ``device="cuda"`` without a usable
    GPU raises ``ValueError``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    if gpu_present is None:
        gpu_present = torch.cuda.is_available()
    cuda_usable = "CUDAExecutionProvider" in available and bool(gpu_present)
    if device == "cuda" and not cuda_usable:
        raise ValueError(
            "device 'cuda' requested but "
            + ("no GPU is present" if "CUDAExecutionProvider" in available else "ONNX Runtime has no CUDAExecutionProvider")
        )
    if device != "cpu" and cuda_usable:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


__all__ = [
    "NoExportedGraph",
    "REDUCTION_CODES",
    "ONNX_OUTPUTS",
    "graph_params",
    "structural_params",
    "structural_settings",
    "scalar_form_params",
    "variant_params",
    "forms",
    "variants",
    "variant_key",
    "variant_of",
    "request_variant",
    "onnx_file_name",
    "onnx_input_names",
    "has_sample_weights_input",
    "weight_input_names",
    "SAMPLE_WEIGHTS",
    "targets_are_indices",
    "example_inputs",
    "values_layout",
    "weights_layout",
    "to_canonical",
    "select_providers",
]
