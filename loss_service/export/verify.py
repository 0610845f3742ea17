r"""Verification of exported artifacts against eager PyTorch, after reloading them from disk.

Checks (each reports ``max_abs`` and ``max_rel`` error; float32 tolerances below):

* ``parity``: several random input sets -- batch sizes, spatial shapes and class counts that differ
  from the traced example, channels-last via ``class_dim=-1`` where the loss has it, every
  ``spec.test_params`` setting (vectors resized to C by repetition), with and without weights
  (per-sample and elementwise), with ~20 % ignored targets where the loss has ``ignore_index`` --
  for every reduction. ONNX: ``loss``, ``values``, ``totals``, ``sample_totals`` and ``class_totals`` against the
  eager module and its ``statistics``. TorchScript: the forward value, the gradient with respect to
  the predictions, and ``statistics``; hyperparameters are set with ``setattr`` on the loaded
  module (what a C++ trainer does).
* ``extreme_logits``: logits of ±1e4 (losses on logits): every output finite, and for
  TorchScript every gradient finite -- catches a stable form rewritten to ``Log(Sigmoid(x))``.
* ``accuracy_1e7``: 1e7-element inputs; ``sum``/``mean``/``weighted_mean`` agree with a float64
  eager reference to ``ACCURACY_RTOL`` -- catches float32 accumulation in a runtime.
* ``onnx_checker`` (``full_check=True``) and ``float64_accumulation``: every ``ReduceSum`` of the
  graph over the batch or spatial dimensions reads a float64 tensor (sums over the C classes are
  small and may stay float32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from loss_service import layout, losses
from loss_service.losses import REDUCTIONS, LossSpec
from loss_service.losses._reduction import REDUCTION_COLUMNS

from .artifacts import quiet

# float32 artifacts against float32 eager PyTorch, elementwise:
# |a - e| <= ATOL·max(1, max|e|) + RTOL·|e|  (max over the compared tensor).
RTOL = 1e-5
ATOL = 1e-6
# 1e7-element reductions against a float64 reference (relative).
ACCURACY_RTOL = 1e-5
ACCURACY_ELEMENTS = 10_000_000
EXTREME_LOGIT = 1e4
LEVELS = ("none", "quick", "standard", "full")


@dataclass
class Check:
    r"""One verification check of one artifact."""

    name: str
    passed: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    cases: int = 0
    failures: List[str] = field(default_factory=list)

    def record(self, actual: Any, expected: Any, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
        a = np.asarray(_numpy(actual), dtype=np.float64)
        e = np.asarray(_numpy(expected), dtype=np.float64)
        self.cases += 1
        if a.shape != e.shape:
            self._fail(f"{what}: shape {list(a.shape)} != expected {list(e.shape)}")
            return
        if a.size == 0:
            return
        if not np.isfinite(a).all() and np.isfinite(e).all():
            self._fail(f"{what}: non-finite output")
            return
        diff = np.abs(a - e)
        # The absolute part scales with the tensor's magnitude: a float32 loss like
        # x - log σ(x) cancels to ~1e-7 of its terms, and weights scale the terms.
        scale = max(1.0, float(np.abs(e).max()))
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_rel = max(self.max_rel, float((diff / np.maximum(np.abs(e), max(atol * scale / rtol, 1e-300))).max()))
        if not bool((diff <= atol * scale + rtol * np.abs(e)).all()):
            self._fail(f"{what}: max abs error {float(diff.max()):.3g}")

    def require_finite(self, actual: Any, what: str) -> None:
        self.cases += 1
        if not np.isfinite(np.asarray(_numpy(actual), dtype=np.float64)).all():
            self._fail(f"{what}: non-finite values")

    def _fail(self, message: str) -> None:
        self.passed = False
        if len(self.failures) < 5:
            self.failures.append(message)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "max_abs_error": _rounded(self.max_abs),
            "max_rel_error": _rounded(self.max_rel),
            "cases": self.cases,
            "failures": list(self.failures),
        }


def _rounded(x: float) -> float:
    # Three significant digits: the manifest stays stable across runs on one machine.
    return float(f"{x:.3g}")


def _numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return x


@dataclass(frozen=True)
class InputCase:
    r"""One shape setting of the parity checks (in the caller's, not the canonical, layout)."""

    batch: int
    num_classes: int
    spatial: Tuple[int, ...]
    channels_last: bool = False


QUICK_CASES = (InputCase(3, 3, (4, 5)),)
# test_params are written for C = 3 (e.g. a balance_index of 2), so no case has fewer classes; the
# traced example has N, C, S = 2, 4, 6.
STANDARD_CASES = (InputCase(3, 3, (4, 5)), InputCase(1, 3, (7,), channels_last=True), InputCase(5, 5, (2, 3, 2)))


def resized(params: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    r"""``params`` with every per-class vector repeated/cut to ``num_classes`` entries."""
    out = {}
    for name, value in params.items():
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() != num_classes:
            value = value.repeat(math.ceil(num_classes / value.numel()))[:num_classes].clone()
        out[name] = value
    return out


def _ignore_some(spec: LossSpec, params: Dict[str, Any], targets: torch.Tensor, seed: int) -> torch.Tensor:
    r"""About 20 % of the targets set to the loss's ``ignore_index`` (unchanged if it has none).

    Only class indices and binary masks are ignorable: an ignored entry inside a probability
    vector is not a valid input.
    """
    if "ignore_index" not in spec.param_names():
        return targets
    if targets.is_floating_point() and not bool(((targets == 0) | (targets == 1)).all()):
        return targets
    ignore_index = params.get("ignore_index", spec.defaults()["ignore_index"])
    if ignore_index is None:
        return targets
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(targets.shape, generator=generator) < 0.2
    return torch.where(mask, torch.full_like(targets, ignore_index), targets)


@dataclass
class Sample:
    r"""One random input set: original-layout tensors, float32, with the params they were drawn for."""

    params: Dict[str, Any]
    predictions: torch.Tensor
    targets: torch.Tensor
    weights: Optional[torch.Tensor]
    label: str


def samples(
    spec: LossSpec, variant: Optional[Dict[str, Any]], cases: Sequence[InputCase], seed: int = 1
) -> Iterable[Sample]:
    r"""Random input sets for one variant (``None``: every ``test_params`` setting, for TorchScript)."""
    settings = list(spec.test_params) or [{}]
    if variant is not None:
        index_targets = variant.get(layout.TARGETS_VARIANT) is None and layout.forms(spec, variant).index_targets
        matching = [s for s in settings if _variant_or_none(spec, s, index_targets) == variant]
        settings = matching or [layout.variant_params(spec, variant)]
    counter = seed
    for params in settings:
        for case in cases:
            counter += 1
            generator = torch.Generator().manual_seed(counter)
            case_params = resized(dict(params), case.num_classes)
            draw_variant = variant if variant is not None else layout.structural_settings(spec, case_params)
            predictions, targets = layout.example_inputs(
                spec, draw_variant, case.batch, case.num_classes, case.spatial, generator, torch.float32, case_params
            )
            # Some settings fix C (a binary dice draws one channel): vectors follow the drawn C.
            case_params = resized(case_params, predictions.shape[1] if predictions.dim() > 1 else 1)
            targets = _ignore_some(spec, case_params, targets, counter)
            if case.channels_last and "class_dim" in spec.param_names():
                predictions = torch.movedim(predictions, 1, -1).contiguous()
                if targets.dim() == predictions.dim():
                    targets = torch.movedim(targets, 1, -1).contiguous()
                case_params["class_dim"] = -1
            module = losses.build(spec.name, **case_params)
            weight_shape = predictions.shape if spec.pixel_weights else module.statistics(
                predictions, targets, None, False
            )[0].shape
            per_sample = torch.rand(case.batch, generator=generator) + 0.1
            elementwise = torch.rand(weight_shape, generator=generator)
            for label, weights in (("no weights", None), ("per-sample weights", per_sample), ("elementwise weights", elementwise)):
                yield Sample(case_params, predictions, targets, weights, f"{params} {case} {label}")


def _variant_or_none(spec: LossSpec, params: Dict[str, Any], index_targets: bool) -> Optional[Dict[str, Any]]:
    try:
        return layout.variant_of(spec, params, index_targets)
    except ValueError:  # a setting with no graph of this target form is verified by other variants
        return None


def _eager(spec: LossSpec, sample: Sample, reduction: str, predictions: Optional[torch.Tensor] = None) -> torch.Tensor:
    module = losses.build(spec.name, **sample.params, reduction=reduction)
    return module(sample.predictions if predictions is None else predictions, sample.targets, sample.weights)


# ---------------------------------------------------------------- TorchScript


def set_hyperparameters(scripted: torch.jit.ScriptModule, spec: LossSpec, params: Dict[str, Any]) -> None:
    r"""Configure a loaded TorchScript loss with ``params`` (others back to defaults) via ``setattr``.

    Tensor settings are buffers (an empty tensor means "not set"); the rest are typed attributes.
    """
    full = dict(spec.defaults(), **spec.validate(params))
    for name, value in full.items():
        current = getattr(scripted, name)
        if isinstance(current, torch.Tensor):
            value = torch.empty(0) if value is None else torch.as_tensor(value, dtype=torch.float32)
        elif isinstance(current, float):
            value = float(value)
        setattr(scripted, name, value)


def verify_torchscript(spec: LossSpec, path: Path, level: str) -> List[Check]:
    with quiet():
        scripted = torch.jit.load(str(path))
    cases = QUICK_CASES if level == "quick" else STANDARD_CASES
    value_check, gradient_check, statistics_check = Check("parity", True), Check("gradient_parity", True), Check(
        "statistics_parity", True
    )
    for sample in samples(spec, None, cases):
        for reduction in REDUCTIONS:
            set_hyperparameters(scripted, spec, dict(sample.params, reduction=reduction))
            eager_input = sample.predictions.clone().requires_grad_(True)
            script_input = sample.predictions.clone().requires_grad_(True)
            expected = _eager(spec, sample, reduction, eager_input)
            actual = scripted(script_input, sample.targets, sample.weights)
            value_check.record(actual, expected, f"{reduction} {sample.label}")
            torch.autograd.backward(expected, torch.ones_like(expected))
            torch.autograd.backward(actual, torch.ones_like(actual))
            gradient_check.record(script_input.grad, eager_input.grad, f"grad {reduction} {sample.label}")
        module = losses.build(spec.name, **sample.params)
        for got, want, what in zip(
            scripted.statistics(sample.predictions, sample.targets, sample.weights, True),
            module.statistics(sample.predictions, sample.targets, sample.weights, True),
            ("values", "totals", "sample_totals"),
        ):
            statistics_check.record(got, want, f"{what} {sample.label}")
        class_totals = scripted.statistics(sample.predictions, sample.targets, sample.weights, False, False, True)[2]
        expected_class_totals = module.statistics(sample.predictions, sample.targets, sample.weights, False, False, True)[2]
        statistics_check.record(class_totals, expected_class_totals, f"class_totals {sample.label}")
        statistics_check.record(
            scripted.class_reductions(class_totals), module.class_reductions(expected_class_totals),
            f"class_reductions {sample.label}",
        )
    checks = [value_check, gradient_check, statistics_check]
    if level != "quick":
        checks.append(_torchscript_extremes(spec, scripted))
    if level == "full":
        checks.append(_torchscript_accuracy(spec, scripted))
    return [c for c in checks if c is not None]


def _extreme_samples(spec: LossSpec, variant: Optional[Dict[str, Any]]) -> Iterable[Sample]:
    for sample in samples(spec, variant, QUICK_CASES, seed=100):
        if sample.weights is not None:
            continue
        signs = torch.where(torch.rand(sample.predictions.shape, generator=torch.Generator().manual_seed(3)) > 0.5, 1.0, -1.0)
        yield Sample(sample.params, signs * EXTREME_LOGIT, sample.targets, None, sample.label)


def _torchscript_extremes(spec: LossSpec, scripted: torch.jit.ScriptModule) -> Optional[Check]:
    if spec.predictions != "logits":
        return None
    check = Check("extreme_logits", True)
    for sample in _extreme_samples(spec, None):
        for reduction in REDUCTIONS:
            set_hyperparameters(scripted, spec, dict(sample.params, reduction=reduction))
            logits = sample.predictions.clone().requires_grad_(True)
            result = scripted(logits, sample.targets, None)
            check.require_finite(result, f"value {reduction} {sample.label}")
            torch.autograd.backward(result, torch.ones_like(result))
            check.require_finite(logits.grad, f"gradient {reduction} {sample.label}")
    return check


def accuracy_inputs(spec: LossSpec, variant: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""About ``ACCURACY_ELEMENTS`` float32 predictions (and their targets) with default settings."""
    batch, num_classes = 8, 3
    # Some settings fix C (a binary dice draws one channel): size S for the C actually drawn.
    drawn = layout.example_inputs(spec, variant, 1, num_classes, (1,), torch.Generator(), torch.float32)[0].shape[1]
    spatial = (ACCURACY_ELEMENTS // (batch * drawn),)
    generator = torch.Generator().manual_seed(7)
    return layout.example_inputs(spec, variant, batch, num_classes, spatial, generator, torch.float32)


def float64_reference(spec: LossSpec, params: Dict[str, Any], predictions, targets) -> torch.Tensor:
    r"""``[sum, mean, weighted_mean]`` in float64 from the float64-cast inputs."""
    module = losses.build(spec.name, **params)
    wide_targets = targets.double() if targets.is_floating_point() else targets
    _, totals, _ = module.statistics(predictions.double(), wide_targets, None, False)
    return module.reductions(totals)


def _torchscript_accuracy(spec: LossSpec, scripted: torch.jit.ScriptModule) -> Check:
    check = Check("accuracy_1e7", True)
    variant = layout.variants(spec)[0]
    predictions, targets = accuracy_inputs(spec, variant)
    reference = float64_reference(spec, {}, predictions, targets)
    with torch.no_grad():
        set_hyperparameters(scripted, spec, {"reduction": "mean"})
        check.record(scripted(predictions, targets, None), reference[1], "forward mean", rtol=ACCURACY_RTOL, atol=0.0)
        _, totals, _ = scripted.statistics(predictions, targets, None, False)
        for column, reduction in enumerate(REDUCTION_COLUMNS):
            check.record(scripted.reductions(totals)[column], reference[column], reduction, rtol=ACCURACY_RTOL, atol=0.0)
    return check


# ---------------------------------------------------------------- ONNX


def onnx_session(path: Path, device: str = "auto"):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=layout.select_providers(device))


def check_onnx_model(path: Path) -> List[Check]:
    r"""``onnx.checker`` (full check) and float64 inputs to every ``ReduceSum`` of the graph."""
    import onnx

    model = onnx.load(str(path))
    checker = Check("onnx_checker", True)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        checker._fail(str(error).splitlines()[0])
    checker.cases = 1
    accumulation = Check("float64_accumulation", True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    shapes = {v.name: v.type.tensor_type.shape for v in
              list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    constants = _constant_values(inferred)
    for node in _all_nodes(inferred):
        if node.op_type in ("ReduceSum", "ReduceMean", "ReduceSumSquare"):
            accumulation.cases += 1
            dtype = types.get(node.input[0])
            if dtype == onnx.TensorProto.DOUBLE or not _reduces_batch_or_space(node, shapes, constants):
                continue
            name = onnx.TensorProto.DataType.Name(dtype) if dtype else "unknown"
            accumulation._fail(f"{node.op_type} {node.name or node.output[0]} accumulates {name} over N or S")
    return [checker, accumulation]


def _constant_values(model) -> Dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _reduces_batch_or_space(node, shapes, constants) -> bool:
    r"""Whether a reduction may sum over a dynamic dimension other than the class count ``C``.

    Sums over the classes (at most a few hundred terms) are accurate in float32; sums over the
    batch or the spatial positions grow with the input and must accumulate in float64. Unknown
    shapes or axes count as large.
    """
    shape = shapes.get(node.input[0])
    if shape is None or not shape.dim:
        return True
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in constants:
            return True
        axes = [int(a) % len(shape.dim) for a in np.asarray(constants[node.input[1]]).reshape(-1)]
    else:
        axes = list(range(len(shape.dim)))
    for axis in axes:
        dim = shape.dim[axis]
        if dim.dim_param and dim.dim_param != "C":
            return True
        if not dim.dim_param and not dim.HasField("dim_value"):
            return True
    return False


def _all_nodes(model) -> Iterable[Any]:
    for node in model.graph.node:
        yield node
    for function in model.functions:
        yield from function.node


def verify_onnx(spec: LossSpec, variant: Dict[str, Any], path: Path, level: str, device: str = "auto") -> List[Check]:
    checks = check_onnx_model(path)
    session = onnx_session(path, device)
    cases = QUICK_CASES if level == "quick" else STANDARD_CASES
    parity = Check("parity", True)
    for sample in samples(spec, variant, cases):
        feeds, restore = layout.to_canonical(spec, sample.params, sample.predictions, sample.targets, sample.weights)
        module = losses.build(spec.name, **sample.params)
        expected_values, expected_totals, expected_samples = module.statistics(
            sample.predictions, sample.targets, sample.weights, True
        )
        expected_classes = module.statistics(sample.predictions, sample.targets, sample.weights, False, False, True)[2]
        for reduction in REDUCTIONS:
            feeds["reduction"] = np.asarray(layout.REDUCTION_CODES[reduction], dtype=np.int64)
            loss, values, totals, sample_totals, class_totals = session.run(layout.ONNX_OUTPUTS, feeds)
            expected = _eager(spec, sample, reduction)
            if reduction == "none":
                parity.record(restore(values), expected, f"values {sample.label}")
                parity.record(loss, module.reductions(expected_totals)[0], f"loss none (the sum) {sample.label}")
            else:
                parity.record(loss, expected, f"loss {reduction} {sample.label}")
        parity.record(totals, expected_totals, f"totals {sample.label}")
        parity.record(sample_totals, expected_samples, f"sample_totals {sample.label}")
        parity.record(class_totals, expected_classes, f"class_totals {sample.label}")
        parity.record(restore(values), expected_values, f"statistics values {sample.label}")
    checks.append(parity)
    if level != "quick" and spec.predictions == "logits":
        extremes = Check("extreme_logits", True)
        for sample in _extreme_samples(spec, variant):
            feeds, _ = layout.to_canonical(spec, sample.params, sample.predictions, sample.targets, None)
            for reduction in REDUCTIONS:
                feeds["reduction"] = np.asarray(layout.REDUCTION_CODES[reduction], dtype=np.int64)
                for name, output in zip(layout.ONNX_OUTPUTS, session.run(layout.ONNX_OUTPUTS, feeds)):
                    extremes.require_finite(output, f"{name} {reduction} {sample.label}")
        checks.append(extremes)
    if level == "full":
        checks.append(_onnx_accuracy(spec, variant, session))
    return checks


def _onnx_accuracy(spec: LossSpec, variant: Dict[str, Any], session) -> Check:
    check = Check("accuracy_1e7", True)
    params = layout.variant_params(spec, variant)
    predictions, targets = accuracy_inputs(spec, variant)
    reference = float64_reference(spec, params, predictions, targets)
    feeds, _ = layout.to_canonical(spec, params, predictions, targets, None)
    del predictions, targets
    feeds["reduction"] = np.asarray(layout.REDUCTION_CODES["mean"], dtype=np.int64)
    loss, totals = session.run(["loss", "totals"], feeds)
    check.record(loss, reference[1], "loss mean", rtol=ACCURACY_RTOL, atol=0.0)
    # The graph's other reductions are float64 arithmetic on these totals.
    from_totals = losses.build(spec.name, **params).reductions(torch.from_numpy(totals))
    for column, reduction in enumerate(REDUCTION_COLUMNS):
        check.record(from_totals[column], reference[column], reduction, rtol=ACCURACY_RTOL, atol=0.0)
    return check


def run_checks(verify: Callable[[], List[Check]]) -> List[Check]:
    r"""Run a verification; an exception becomes a failed check (reported, never swallowed)."""
    try:
        return verify()
    except Exception as error:  # noqa: BLE001 - any failure of the artifact is a verification failure
        failed = Check("verification", False)
        failed.failures.append(f"{type(error).__name__}: {error}")
        return [failed]
