r"""The one registry of losses that the exporter, the server, the docs and the tests all read."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._reduction import elementwise_reductions

PREDICTION_KINDS = ("logits", "probabilities", "log_probabilities", "real")
TARGET_KINDS = ("class_indices", "class_indices_or_probabilities", "probabilities", "binary_masks", "real")
PARAM_KINDS = ("float", "int", "bool", "str", "vector", "float_or_vector")
# Kernels compute float32 inputs in float32: a hyperparameter beyond its range would become inf.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class ParamSpec:
    r"""One hyperparameter of a loss: its type, default, valid range and a one-line doc.

    ``kind`` is one of ``float``, ``int``, ``bool``, ``str`` (with ``choices``), ``vector`` (a
    per-class tensor, ``None`` when unset) or ``float_or_vector``.
    ``graph_input`` says whether the ONNX graph takes it as an input (a string choice as the 0-d int64 index of
    its value in ``choices``, which the kernel reads as that code); the others (string choices that change the
    computation's structure, ``class_dim``) are fixed per exported variant.
    """

    name: str
    kind: str
    default: Any
    doc: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    choices: Optional[Tuple[str, ...]] = None
    graph_input: bool = True

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"ParamSpec {self.name}: unknown kind {self.kind!r}")

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is None and self.high is None:
            return "any"
        lo = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + _fmt(self.low)
        hi = "inf)" if self.high is None else _fmt(self.high) + ("]" if self.high_inclusive else ")")
        return f"{lo}, {hi}"

    def validate(self, value: Any, loss: str = "") -> Any:
        r"""Coerce ``value`` to this parameter's kind or raise ``ValueError`` naming the parameter."""
        where = f"{loss}: " if loss else ""
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{where}parameter '{self.name}' must not be None")
        kind = self.kind
        if kind == "float_or_vector":
            kind = "float" if _is_number(value) else "vector"
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where}parameter '{self.name}' must be a bool, got {type(value).__name__}")
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"{where}parameter '{self.name}' must be a string, got {type(value).__name__}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"{where}parameter '{self.name}' must be {self.range_text()}, got {value!r}")
            return value
        if kind == "vector":
            tensor = torch.as_tensor(value)
            if tensor.is_complex() or tensor.dtype == torch.bool:
                raise ValueError(
                    f"{where}parameter '{self.name}' must be a floating-point or integer vector, got dtype {tensor.dtype}"
                )
            if tensor.dim() == 0:
                raise ValueError(f"{where}parameter '{self.name}' must be a per-class vector, got a scalar")
            if tensor.numel() == 0:
                # Modules keep an empty buffer for "not set"; an empty vector must not pass as that.
                raise ValueError(f"{where}parameter '{self.name}' must have one entry per class, got an empty vector")
            tensor = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}parameter '{self.name}' must be finite")
            if any(self._out_of_range(entry) for entry in tensor.reshape(-1).tolist()):
                raise ValueError(f"{where}parameter '{self.name}' must have every entry in {self.range_text()}")
            return tensor
        if not _is_number(value):
            raise ValueError(f"{where}parameter '{self.name}' must be a number ({kind}), got {type(value).__name__}")
        if kind == "int":
            if not isinstance(value, numbers.Integral):
                if not float(value).is_integer():
                    raise ValueError(f"{where}parameter '{self.name}' must be an integer, got {value}")
            value = int(value)
            if not -(2**63) <= value < 2**63:
                raise ValueError(f"{where}parameter '{self.name}' must fit in int64, got {value}")
        else:
            value = float(value)
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise ValueError(f"{where}parameter '{self.name}' must be finite in float32 (|x| <= 3.4e38), got {value}")
        if self._out_of_range(value):
            raise ValueError(f"{where}parameter '{self.name}' must be in {self.range_text()}, got {value}")
        return value

    def _out_of_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return True
        if self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)):
            return True
        return False

    def describe(self) -> Dict[str, Any]:
        default = self.default
        if isinstance(default, torch.Tensor):
            default = default.tolist()
        return {
            "name": self.name, "kind": self.kind, "default": default, "range": self.range_text(), "doc": self.doc,
            "graph_input": self.graph_input,
        }


def _is_number(value: Any) -> bool:
    r"""A real number, numpy scalars included; not a bool (``True`` is no hyperparameter value)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _fmt(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() else repr(x)


InputMaker = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
TARGET_FORMS = ("dense", "class_indices", "probabilities")
VALUES_LAYOUTS = ("NCS", "NS", "NC", "C", "N", "1")
# The blocks totals are made of, by the names of their entries (docs/architecture.md): an elementwise
# block is [Σ w·ℓ, Σ w, Σ d, n]; an overlap block (a region loss with batch=True) [TP_c…, P_c…, T_c…].
ELEMENTWISE_TOTALS = ("loss_sum", "weight_sum", "denominator", "count")
OVERLAP_TOTALS = ("true_positive", "predicted", "target")
TOTALS_BLOCKS = ("elementwise", "overlap")


@dataclass(frozen=True)
class Forms:
    r"""What a loss takes and returns under one setting of its structural (``graph_input=False``) parameters,
    for the layout, the exporter and the server.

    * ``targets`` -- the target forms it takes, natural first: ``dense`` (the predictions' shape),
      ``class_indices`` (without the class dimension), ``probabilities`` (of the predictions' shape).
    * ``values`` -- the layout of ``values`` (:mod:`loss_service.layout`): ``NCS``, ``NS``, ``NC``, ``C``, ``N``,
      or ``1`` (one value for the whole batch).
    * ``totals`` -- the blocks the totals are made of, in order: ``elementwise`` (``[Σ w·ℓ, Σ w, Σ d, n]``)
      or ``overlap`` (``[TP_c…, P_c…, T_c…]``), as ``"<term>:<block>"`` when a loss combines terms
      (:meth:`totals_layout` names the entries); ``class_totals`` -- the blocks of one class's row of the class
      totals ``(C, K_c)`` (``statistics(..., per_class=True)``), an ``overlap`` block ``[TP_c, P_c, T_c]``; ``indices_with_channel`` -- class indices may also come as ``(N, 1, *)``; ``single_channel`` -- every
      non-batch dimension is spatial, ``(N, *)`` has no class dimension (a binary region loss).
    """

    targets: Tuple[str, ...]
    values: str
    totals: Tuple[str, ...] = ("elementwise",)
    class_totals: Tuple[str, ...] = ("elementwise",)
    indices_with_channel: bool = False
    single_channel: bool = False

    def __post_init__(self) -> None:
        if not self.targets or not set(self.targets) <= set(TARGET_FORMS) or self.values not in VALUES_LAYOUTS:
            raise ValueError(f"Forms: targets {self.targets} must be among {TARGET_FORMS}, values in {VALUES_LAYOUTS}")
        for blocks in (self.totals, self.class_totals):
            if not blocks or any(block.rpartition(":")[2] not in TOTALS_BLOCKS for block in blocks):
                raise ValueError(f"Forms: totals {blocks} must be blocks among {TOTALS_BLOCKS}")

    @property
    def elementwise_totals(self) -> bool:
        r"""Whether the totals begin with ``[Σ w·ℓ, Σ w, Σ d, n]``."""
        return self.totals[0].rpartition(":")[2] == "elementwise"

    def totals_layout(self, num_classes: int) -> Tuple[str, ...]:
        r"""The name of each entry of the totals with ``num_classes`` classes, e.g. ``("loss_sum", "weight_sum",
        "denominator", "count")`` or ``("true_positive[0]", …, "target[C-1]")``; ``term.`` in front for a term."""
        names: List[str] = []
        for block in self.totals:
            term, _, kind = block.rpartition(":")
            prefix = f"{term}." if term else ""
            if kind == "elementwise":
                names += [prefix + name for name in ELEMENTWISE_TOTALS]
            else:
                names += [f"{prefix}{name}[{c}]" for name in OVERLAP_TOTALS for c in range(num_classes)]
        return tuple(names)

    def classes_of(self, length: int) -> Optional[int]:
        r"""The number of classes of totals of ``length`` entries (0 without an overlap block); ``None`` if
        no number of classes gives that length."""
        overlap_blocks = sum(block.endswith("overlap") for block in self.totals)
        elementwise_entries = len(ELEMENTWISE_TOTALS) * (len(self.totals) - overlap_blocks)
        per_class = len(OVERLAP_TOTALS) * overlap_blocks
        if per_class == 0:
            return 0 if length == elementwise_entries else None
        if length <= elementwise_entries or (length - elementwise_entries) % per_class:
            return None
        return (length - elementwise_entries) // per_class

    def classes_of_layout(self, layout: Tuple[str, ...]) -> Optional[int]:
        r"""The number of classes whose :meth:`totals_layout` is ``layout``; ``None`` if none is."""
        num_classes = self.classes_of(len(layout))
        if num_classes is None or self.totals_layout(num_classes) != tuple(layout):
            return None
        return num_classes

    def class_totals_layout(self) -> Tuple[str, ...]:
        r"""The name of each column of the class totals ``(C, K_c)`` (one row per class): the entries of its blocks,
        e.g. ``("loss_sum", "weight_sum", "denominator", "count", "true_positive", "predicted", "target")``."""
        names: List[str] = []
        for block in self.class_totals:
            term, _, kind = block.rpartition(":")
            prefix = f"{term}." if term else ""
            names += [prefix + name for name in (ELEMENTWISE_TOTALS if kind == "elementwise" else OVERLAP_TOTALS)]
        return tuple(names)

    @property
    def class_index(self) -> bool:
        r"""Whether a class has an overlap index (its Dice score, ...) beside its loss: class totals with an
        overlap block."""
        return any(block.endswith("overlap") for block in self.class_totals)

    @property
    def index_targets(self) -> bool:
        r"""Whether the natural targets are class indices."""
        return self.targets[0] == "class_indices"

    @property
    def probabilities_besides_indices(self) -> bool:
        r"""Whether class probabilities are taken besides the natural class indices (their own ONNX graph)."""
        return self.index_targets and "probabilities" in self.targets


# The forms of a loss whose forms follow from its ``targets`` kind alone.
_FORMS_OF_TARGETS = {
    "class_indices": Forms(("class_indices",), "NS"),
    "class_indices_or_probabilities": Forms(("class_indices", "probabilities"), "NS"),
}
_DENSE_FORMS = Forms(("dense",), "NCS")


@dataclass(frozen=True)
class LossSpec:
    r"""Everything the project knows about one registered loss (the fields: docs/architecture.md).

    * ``module`` -- the ``nn.Module``, built with the hyperparameters as keywords: ``forward(predictions,
      targets, weights=None)`` and the scriptable ``statistics(predictions, targets, weights, per_sample,
      values=True)`` and ``reductions(totals)``; ``function(predictions, targets, weights=None, **params)``.
    * ``statistics_kernel(predictions, targets, weights, *, per_sample, **params)`` -- what ``statistics``
      calls, every parameter but ``reduction`` by name: float/int/bool ones as 0-d tensors, vectors as
      tensors (``None`` is all ones), ``graph_input=False`` ones as Python values. The ONNX exporter traces
      it with the hyperparameters as graph inputs, so it never branches in Python on their values.
    * ``reductions_kernel(totals, **params)`` -- ``(..., K)`` totals to ``(..., 3)`` ``[sum, mean,
      weighted_mean]`` in float64, with the parameters it needs by name (default: the elementwise rule).
    * ``constants`` -- kernel arguments that are no hyperparameters (a region loss's overlap index:
      ``overlap_scale`` and fixed ``alpha``, ``beta``, ``gamma``), numbers as 0-d float64 tensors.
    * ``pixel_weights`` -- call-time weights are pixel weights and ``(N,)`` weights weight a sample's share
      (region losses): ``statistics_kernel`` and the ONNX graphs take ``(predictions, targets, weights,
      sample_weights, ...)``, as a traced graph cannot tell them apart per request. Otherwise ``(N,)``
      weights weight every element of their sample.
    * ``forms(settings)`` -- the :class:`Forms` of a setting of the structural parameters (defaults filled
      in); ``None`` derives them from ``targets``.
    * ``make_inputs(batch, num_classes, spatial, generator, dtype, params)`` -- valid random ``(predictions,
      targets)``; ``test_params`` -- the settings every generated test and export check covers;
      ``variants`` -- structural settings with their own ONNX graph, the first (``{}``) ``<name>.onnx``.
    * ``logits_alternative`` -- the loss on logits for the same targets (``bce`` -> ``bce_with_logits``).
    * ``target_range`` -- the closed interval dense targets lie in, ``ignore_index`` excepted (``None``: any
      finite value): checked by the eager kernel, and by the server for every backend.
    """

    name: str
    family: str
    summary: str
    module: type
    function: Callable[..., torch.Tensor]
    predictions: str
    targets: str
    prediction_shape: str
    target_shape: str
    params: Tuple[ParamSpec, ...]
    make_inputs: InputMaker
    statistics_kernel: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    reference: str
    reductions_kernel: Callable[..., torch.Tensor] = elementwise_reductions
    test_params: Tuple[Dict[str, Any], ...] = ({},)
    variants: Tuple[Dict[str, Any], ...] = ({},)
    # "elementwise": totals are [Σ w·ℓ, Σ w, Σ d, n]; "region": Dice-like statistics.
    kind: str = "elementwise"
    paper: str = ""
    notes: str = ""
    constants: Dict[str, Optional[float]] = field(default_factory=dict)
    pixel_weights: bool = False
    forms: Optional[Callable[[Dict[str, Any]], Forms]] = None
    target_range: Optional[Tuple[float, float]] = None
    logits_alternative: str = ""

    def __post_init__(self) -> None:
        if self.predictions not in PREDICTION_KINDS:
            raise ValueError(f"{self.name}: predictions kind {self.predictions!r} not in {PREDICTION_KINDS}")
        if self.targets not in TARGET_KINDS:
            raise ValueError(f"{self.name}: targets kind {self.targets!r} not in {TARGET_KINDS}")

    def forms_of(self, settings: Dict[str, Any]) -> Forms:
        r"""The :class:`Forms` of this loss with ``settings`` (missing parameters take their defaults)."""
        if self.forms is not None:
            return self.forms(dict(self.defaults(), **settings))
        return _FORMS_OF_TARGETS.get(self.targets, _DENSE_FORMS)

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(self._unknown_param_message(name))

    def param_names(self) -> List[str]:
        return [p.name for p in self.params]

    def _unknown_param_message(self, name: str) -> str:
        return f"{self.name}: unknown parameter '{name}'; valid parameters: {', '.join(self.param_names()) or '(none)'}"

    def validate(self, params: Dict[str, Any]) -> Dict[str, Any]:
        r"""Check names, kinds and ranges; return the coerced values (defaults not filled in)."""
        out = {}
        for name, value in params.items():
            if name not in self.param_names():
                raise ValueError(self._unknown_param_message(name))
            out[name] = self.param(name).validate(value, self.name)
        return out

    def defaults(self) -> Dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.name, "family": self.family, "summary": self.summary, "predictions": self.predictions,
            "targets": self.targets, "prediction_shape": self.prediction_shape, "target_shape": self.target_shape,
            "params": [p.describe() for p in self.params], "reference": self.reference, "paper": self.paper,
            "kind": self.kind,
        }


_REGISTRY: Dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"loss '{spec.name}' is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> List[str]:
    r"""The registered loss names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> LossSpec:
    r"""The :class:`LossSpec` of ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; valid losses: {', '.join(_REGISTRY)}") from None


def specs() -> List[LossSpec]:
    return list(_REGISTRY.values())


def build(name: str, **params: Any) -> torch.nn.Module:
    r"""Build the ``nn.Module`` of loss ``name`` with validated hyperparameters."""
    spec = get(name)
    return spec.module(**spec.validate(params))


__all__ = ["Forms", "ParamSpec", "LossSpec", "register", "names", "get", "specs", "build"]
