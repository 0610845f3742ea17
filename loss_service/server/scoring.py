r"""From a ``ScoreBatchRequest`` to a result: parse, decode, validate, compute, summarize.

Everything here is synchronous and free of gRPC context so that it runs on the event loop (small
requests) or in the worker pool (large ones) alike; errors are :class:`ServiceError`.

Validation is split by cost. Per-request settings (loss, parameters, reduction, backend) are
checked first. Each tensor is checked while it is decoded (dtype, shape, byte length, element
limit), then the values in one ``aminmax`` pass per tensor (no temporaries): NaN/Inf in
predictions, targets and weights, negative weights, probabilities outside ``[0, 1]``. Everything
that needs the loss's own knowledge (shape agreement, weight broadcasting, class-vector lengths,
class indices) is raised by the loss library as ``ValueError`` and mapped to the field it names.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from loss_service import evaluation, losses, protocol
from loss_service.codec import TensorError, dtype_name, read_statistics, statistics_message, to_message, to_tensor
from loss_service.evaluation import REDUCTION_COLUMN, summarize
from loss_service.losses import Forms, LossSpec
from loss_service.statistics import INT64_MAX, Statistics, merge
from loss_service.v1 import loss_service_pb2 as pb

from .backends import DEFAULT_CACHE_SIZE, Backend, BackendUnavailable, Runner, config_key
from .errors import (
    echo,
    from_library_message,
    invalid,
    library_value_error,
    protocol_dtype_names,
    too_large,
    unavailable_backend,
)
from .wire import ParsedRequest

# A request's reduction and backend by their names; an unspecified reduction is the mean.
REDUCTIONS: Dict[int, str] = {
    pb.REDUCTION_UNSPECIFIED: "mean", **{wire: name for name, wire in protocol.REDUCTIONS.items()}}
BACKEND_NAMES: Dict[int, str] = {wire: name for name, wire in protocol.BACKENDS.items()}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# What a request may carry for the log line (request_id, labels): enough for ids and job names,
# bounded so that no request makes the log (or the event loop writing it) pay for its size.
MAX_REQUEST_ID_CHARACTERS = 256
MAX_LABELS = 64
MAX_LABEL_KEY_CHARACTERS = 128
MAX_LABEL_VALUE_CHARACTERS = 256
# The Param fields that may carry each scalar kind (ints are exact in double_value too).
PARAM_FIELDS: Dict[str, Tuple[str, ...]] = {
    "float": ("double_value", "int_value"),
    "int": ("int_value", "double_value"),
    "bool": ("bool_value",),
    "str": ("string_value",),
    "float_or_vector": ("double_value", "int_value"),
}


# Validated plans are kept for requests whose settings repeat (a job scores its batches with one configuration):
# as many as runners, and only for settings of at most PLAN_KEY_MAX_BYTES (their key holds those bytes).
PLAN_CACHE_SIZE = DEFAULT_CACHE_SIZE
PLAN_KEY_MAX_BYTES = 4096


def request_field(param: losses.ParamSpec) -> str:
    r"""The ``ScoreBatchRequest`` field that carries a parameter (``ParamInfo.request_field``)."""
    if param.name == "reduction":
        return "reduction"
    if param.name == "class_weight":
        return "class_weights"
    if param.name == "pos_weight":
        return "pos_weight"
    if param.kind in ("vector", "float_or_vector"):
        # A float_or_vector parameter also accepts a scalar in `params`.
        return "tensor_params"
    return "params"


def decode(tensor: pb.Tensor, field: str, max_elements: int, data: Optional[bytes] = None) -> Tensor:
    r"""The request's tensor ``field`` (:func:`loss_service.codec.to_tensor`: a read-only view of its
    bytes); what cannot be read is ``INVALID_ARGUMENT``, or ``RESOURCE_EXHAUSTED`` over ``max_elements``."""
    try:
        return to_tensor(tensor, field, max_elements, data)
    except TensorError as error:
        raise (too_large if error.too_large else invalid)(error.field, error.description) from None


def param_value(message: pb.Param) -> Any:
    which = message.WhichOneof("value")
    if which is None:
        return None
    return getattr(message, which)


@dataclass
class Plan:
    r"""A request's validated settings; shared by every batch of a stream."""

    spec: LossSpec
    params: Dict[str, Any]
    reduction: str
    backend: Backend
    # The request field that carried each given parameter (e.g. "params.gamma", "class_weights").
    fields: Dict[str, str] = field(default_factory=dict)
    # The runner cache's key of (loss, params): computed once per request.
    key: Hashable = None
    # The backend's runner of (loss, params) when it has one built (looked up once per request;
    # set once a runner built for the plan has served it).
    runner: Optional[Runner] = None
    # What the loss takes and returns with these params (LossSpec.forms_of), read once per request.
    forms: Forms = field(init=False)

    def __post_init__(self) -> None:
        self.forms = self.spec.forms_of(self.params)

    def error_fields(self) -> List[Tuple[str, str]]:
        r"""``(name the loss library uses in messages, request field)`` pairs for mapping library errors.

        Built only when a library error needs mapping, not for every request.
        """
        pairs = [(name, self.fields.get(name, request_field(self.spec.param(name)))) for name in self.spec.param_names()]
        return pairs + [("predictions", "predictions"), ("targets", "targets"), ("weights", "weights")]


@dataclass
class BatchResult:
    values: Tensor
    totals: Tensor
    reductions: List[float]
    sample_reductions: Optional[Tensor]
    # With group_ids: the group labels and the (N, K) sample totals they sum.
    groups: Optional[Tuple[np.ndarray, Tensor]] = None
    # With return_per_class: the float64 (C, K_c) class totals.
    class_totals: Optional[Tensor] = None


class Scorer:
    r"""Turns requests into results with the configured backends."""

    def __init__(self, backends: Mapping[str, Backend], default_backend: str, max_elements: int) -> None:
        self.backends = dict(backends)
        self.default_backend = default_backend
        self.max_elements = max_elements
        # settings_key -> a plan whose runner its backend keeps (LRU; plan() runs on the loop and in workers).
        self._plans: "OrderedDict[Tuple, Plan]" = OrderedDict()
        self._plans_lock = threading.Lock()

    # -- settings ---------------------------------------------------------------------------
    def plan(self, parsed: ParsedRequest) -> Plan:
        r"""The request's validated settings. Settings seen before (the same bytes) whose runner is still kept
        reuse that plan: validating them again and looking up their runner cost a small request a few percent of
        its time. The plan is shared and never changed (it has its runner); ``request_id`` and ``labels`` are
        checked for every request."""
        check_metadata(parsed)
        key = settings_key(parsed)
        if key is not None:
            with self._plans_lock:
                plan = self._plans.get(key)
                if plan is not None:
                    self._plans.move_to_end(key)
            if plan is not None and plan.backend.supports(plan.spec.name) and plan.backend.kept(plan.key) is plan.runner:
                return plan
        plan = self._new_plan(parsed)
        if key is not None and plan.runner is not None:
            with self._plans_lock:
                self._plans[key] = plan
                if len(self._plans) > PLAN_CACHE_SIZE:
                    self._plans.popitem(last=False)
        return plan

    def _new_plan(self, parsed: ParsedRequest) -> Plan:
        request = parsed.message
        if not request.loss:
            raise invalid("loss", f"must be set; expected one of {', '.join(losses.names())}")
        try:
            spec = losses.get(request.loss)
        except ValueError:
            raise invalid("loss", f"unknown loss '{echo(request.loss)}'; expected one of {', '.join(losses.names())}") from None
        reduction = REDUCTIONS.get(request.reduction)
        if reduction is None:
            raise invalid("reduction", f"unknown value {request.reduction}; expected one of {', '.join(pb.Reduction.keys())}")
        backend = self._backend(request.backend, spec)
        params, fields = self._params(parsed, spec)
        key = config_key(spec.name, params)
        return Plan(spec, params, reduction, backend, fields, key, backend.kept(key))

    def _backend(self, value: int, spec: LossSpec) -> Backend:
        if value == pb.BACKEND_UNSPECIFIED:
            name = self.default_backend
        else:
            name = BACKEND_NAMES.get(value)
            if name is None:
                raise invalid("backend", f"unknown value {value}; expected one of {', '.join(pb.Backend.keys())}")
        backend = self.backends.get(name)
        if backend is None:
            raise unavailable_backend("backend", f"backend '{name}' is not enabled on this server; enabled: {', '.join(self.backends)}")
        if not backend.supports(spec.name):
            raise unavailable_backend("backend", f"backend '{name}' has no artifact for loss '{spec.name}'")
        return backend

    def _params(self, parsed: ParsedRequest, spec: LossSpec) -> Tuple[Dict[str, Any], Dict[str, str]]:
        request = parsed.message
        raw: Dict[str, Any] = {}
        fields: Dict[str, str] = {}
        valid = spec.param_names()

        def known(name: str, where: str) -> losses.ParamSpec:
            r"""The spec of parameter ``name`` sent in ``where``: a parameter of the loss, given once,
            in the request field that carries it."""
            if name not in valid or name == "reduction":
                hint = "; set the reduction with the `reduction` field" if name == "reduction" else ""
                listed = ", ".join(n for n in valid if n != "reduction") or "(none)"
                raise invalid(where, f"unknown parameter '{echo(name)}' for loss '{spec.name}'; valid parameters: {listed}{hint}")
            if name in raw:
                raise invalid(where, f"parameter '{name}' is given twice (also as {fields[name]})")
            param = spec.param(name)
            expected = request_field(param)
            # A float_or_vector parameter also accepts a scalar in `params`.
            carriers = {expected, "params"} if param.kind == "float_or_vector" else {expected}
            if where.split(".", 1)[0] not in carriers:
                raise invalid(where, f"parameter '{name}' ({param.kind}) of loss '{spec.name}' is sent in `{expected}`")
            fields[name] = where
            return param

        for name, message in parsed.params.items():
            where = f"params.{echo(name)}"
            param = known(name, where)
            which = message.WhichOneof("value")
            if which is None:
                raise invalid(where, "must hold a double, int, bool or string value")
            if which not in PARAM_FIELDS[param.kind]:
                raise invalid(where, f"parameter '{name}' ({param.kind}) is sent as {' or '.join(PARAM_FIELDS[param.kind])}, got {which}")
            raw[name] = getattr(message, which)
        for name, message in parsed.tensor_params.items():
            where = f"tensor_params.{echo(name)}"
            param = known(name, where)
            tensor = decode(message, where, self.max_elements)
            raw[name] = float(tensor) if param.kind == "float_or_vector" and tensor.dim() == 0 else class_vector(tensor, where)
        for name, where in (("class_weight", "class_weights"), ("pos_weight", "pos_weight")):
            if request.HasField(where):
                if name not in valid:
                    raise invalid(where, f"loss '{spec.name}' has no '{name}' parameter; valid parameters: {', '.join(valid)}")
                known(name, where)
                raw[name] = class_vector(decode(getattr(request, where), where, self.max_elements), where)
        params = {}
        for name, value in raw.items():
            try:
                params[name] = spec.param(name).validate(value, spec.name)
            except ValueError as exc:
                raise invalid(fields[name], protocol_dtype_names(str(exc))) from None
        return params, fields

    # -- tensors ----------------------------------------------------------------------------
    def decode_inputs(self, parsed: ParsedRequest, plan: Plan) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        request = parsed.message
        if not request.HasField("predictions"):
            raise invalid("predictions", "must be set")
        if not request.HasField("targets"):
            raise invalid("targets", "must be set")
        predictions = decode(request.predictions, "predictions", self.max_elements, parsed.data("predictions"))
        if predictions.dim() == 0:
            raise invalid("predictions.shape", "must have a batch dimension: expected (N, ...) as ListLosses says, got a scalar")
        targets = decode(request.targets, "targets", self.max_elements, parsed.data("targets"))
        weights = None
        if request.HasField("weights"):
            weights = decode(request.weights, "weights", self.max_elements, parsed.data("weights"))
        targets_range = RangeOnce(targets)
        check_values(plan.spec, predictions, targets_range, weights)
        targets = channel_indices_as_indices(plan, predictions, targets)
        check_class_indices(plan, predictions, targets, targets_range)
        check_target_range(plan, predictions, targets, targets_range)
        return predictions, targets, weights

    def decode_groups(self, parsed: ParsedRequest, predictions: Tensor) -> Optional[np.ndarray]:
        r"""The request's ``group_ids`` as int64 labels ``(N,)``, ``None`` when it has none."""
        if not parsed.message.HasField("group_ids"):
            return None
        group_ids = decode(parsed.message.group_ids, "group_ids", self.max_elements)
        try:
            return evaluation.group_labels(group_ids, predictions.shape[0])
        except ValueError as exc:
            raise invalid("group_ids", protocol_dtype_names(str(exc)).removeprefix("group_ids ")) from None

    # -- compute ----------------------------------------------------------------------------
    def compute(
        self, plan: Plan, predictions: Tensor, targets: Tensor, weights: Optional[Tensor], per_sample: bool,
        want_values: bool, group_labels: Optional[np.ndarray] = None, per_class: bool = False,
    ) -> BatchResult:
        r"""The statistics of one batch (per sample too with ``per_sample``; per group with ``group_labels``; per
        class with ``per_class``); the values when ``want_values``."""
        backend = plan.backend
        device = backend.torch_device
        if device.type != "cpu":
            predictions, targets = predictions.to(device), targets.to(device)
            weights = weights.to(device) if weights is not None else None
        runner = plan.runner or backend.build(plan.spec, plan.params)
        try:
            with torch.inference_mode():
                by_sample = per_sample or group_labels is not None
                values, totals, sample_totals = runner.statistics(
                    predictions, targets, weights, by_sample, want_values, per_class and not by_sample
                )
                class_totals = None
                if per_class:
                    if by_sample:
                        # One breakdown per kernel call: the class totals take a second pass.
                        _, _, class_totals = runner.statistics(predictions, targets, weights, False, False, True)
                    else:
                        class_totals = sample_totals
                    class_totals = class_totals.to("cpu", torch.float64)
                reductions = runner.reductions(totals)
                sample_reductions = runner.reductions(sample_totals) if per_sample else None
        except BackendUnavailable as exc:
            raise unavailable_backend("backend", f"backend '{backend.name}' cannot run this request: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - torch.jit.Error is no RuntimeError; non-library errors re-raise
            message = library_value_error(exc)
            if message is None:
                raise
            raise from_library_message(message, plan.error_fields(), "predictions") from None
        if plan.runner is None:
            # Only now: a runner built for a request that turned out invalid is never kept.
            backend.keep(plan.key, runner, plan.params)
            plan.runner = runner
        # Results of inference mode carry no autograd history: no detach() needed.
        return BatchResult(
            values=values,
            totals=totals.to("cpu", torch.float64),
            reductions=reductions.tolist(),
            sample_reductions=None if sample_reductions is None else sample_reductions.cpu(),
            groups=None if group_labels is None else (group_labels, sample_totals),
            class_totals=class_totals,
        )

    def score_batch(self, parsed: ParsedRequest, plan: Plan) -> pb.ScoreBatchResponse:
        r"""The answer to one request whose settings :meth:`plan` has validated."""
        request = parsed.message
        predictions, targets, weights = self.decode_inputs(parsed, plan)
        group_labels = self.decode_groups(parsed, predictions)
        result = self.compute(
            plan, predictions, targets, weights, request.return_per_sample, plan.reduction == "none", group_labels,
            request.return_per_class,
        )
        column = REDUCTION_COLUMN[plan.reduction]
        weight_sum, denominator, num_elements = summarize(plan.forms, result.totals)
        response = pb.ScoreBatchResponse(
            loss=result.reductions[column],
            weight_sum=weight_sum,
            denominator=denominator,
            num_elements=num_elements,
            backend=plan.backend.name,
            device=plan.backend.device_of(plan.spec, plan.params),
            request_id=request.request_id,
        )
        if plan.reduction == "none":
            # The values in the predictions' dtype, as the loss module's reduction="none" returns;
            # `loss` is their float64 sum (for combined losses the "sum" reduction is another number).
            values = result.values.to(predictions.dtype)
            response.values.CopyFrom(to_message(values))
            response.loss = float(result.values.sum(dtype=torch.float64))
        if result.sample_reductions is not None:
            response.per_sample.CopyFrom(to_message(result.sample_reductions[:, column]))
        if result.groups is not None or result.class_totals is not None or request.return_statistics:
            stats = evaluation.make_statistics(
                plan.spec, plan.params, plan.reduction, plan.forms, result.totals, result.groups,
                class_totals=result.class_totals,
            )
            set_statistics_fields(response, stats, request.return_statistics)
        return response

    def merge(self, request: pb.MergeStatisticsRequest) -> pb.ScoreStreamResponse:
        r"""The answer to ``MergeStatistics``: the value of the merged statistics, with them."""
        if not request.statistics:
            raise invalid("statistics", "must hold at least one Statistics message")
        items = []
        for index, message in enumerate(request.statistics):
            try:
                items.append(read_statistics(message, f"statistics[{index}]", self.max_elements))
            except TensorError as error:
                raise (too_large if error.too_large else invalid)(error.field, error.description) from None
        try:
            merged = merge(items)
        except ValueError as exc:
            field, _, description = str(exc).partition(": ")
            raise invalid(field, description) from None
        if merged.loss not in losses.names():
            raise invalid("statistics[0].loss", f"unknown loss '{echo(merged.loss)}'; expected one of {', '.join(losses.names())}")
        spec = losses.get(merged.loss)
        for name, value in merged.params.items():
            # Client text reaches the library's messages quoted through echo only (bounded, printable).
            if name not in spec.param_names() or name == "reduction":
                listed = ", ".join(n for n in spec.param_names() if n != "reduction")
                raise invalid("statistics[0].params", f"unknown parameter '{echo(name)}' for loss '{spec.name}'; valid parameters: {listed}")
            if isinstance(value, str) and echo(value) != value:
                raise invalid("statistics[0].params", f"parameter '{name}' must be {spec.param(name).range_text()}, got '{echo(value)}'")
        response = pb.ScoreStreamResponse(num_batches=merged.num_batches, backend="eager", device="cpu")
        try:
            evaluated = set_statistics_fields(response, merged, True)
        except ValueError as exc:
            raise invalid("statistics[0]", protocol_dtype_names(str(exc))) from None
        if not -INT64_MAX - 1 <= evaluated.num_elements <= INT64_MAX:
            raise invalid("statistics[0].totals", f"count {evaluated.num_elements} does not fit the response's int64")
        response.loss = evaluated.loss
        response.weight_sum, response.denominator = evaluated.weight_sum, evaluated.denominator
        response.num_elements = evaluated.num_elements
        return response


def set_statistics_fields(response: Any, stats: Statistics, with_statistics: bool) -> evaluation.Evaluation:
    r"""The group and class fields of a response from ``stats``, and ``statistics`` itself when asked; their
    :class:`~loss_service.evaluation.Evaluation`. Groups, classes and merges are reduced by the library
    (:func:`loss_service.evaluation.evaluate`, float64 on the host), a batch or stream by its backend."""
    evaluated = evaluation.evaluate(stats)
    if stats.grouped:
        response.group_ids.CopyFrom(to_message(stats.group_ids))
        response.group_losses.CopyFrom(to_message(evaluated.group_losses))
    if evaluated.class_losses is not None:
        response.class_losses.CopyFrom(to_message(evaluated.class_losses))
    if evaluated.class_scores is not None:
        response.class_scores.CopyFrom(to_message(evaluated.class_scores))
    if with_statistics:
        response.statistics.CopyFrom(statistics_message(stats))
    return evaluated


def setting(spec: LossSpec, params: Dict[str, Any], name: str, fallback: Any = None) -> Any:
    r"""The request's value of parameter ``name``, else its default, else ``fallback`` (no such parameter)."""
    if name in params:
        return params[name]
    for param in spec.params:
        if param.name == name:
            return param.default
    return fallback


class RangeOnce:
    r"""``value_range`` of the targets, read by whichever check needs it first and shared by the others."""

    __slots__ = ("tensor", "_range")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self._range: Optional[Tuple[float, float]] = None

    def __call__(self) -> Tuple[float, float]:
        if self._range is None:
            self._range = value_range(self.tensor)
        return self._range


def check_values(spec: LossSpec, predictions: Tensor, targets: RangeOnce, weights: Optional[Tensor]) -> None:
    r"""Value checks that need no knowledge of the loss beyond its input kinds: one pass per tensor."""
    if predictions.dtype not in FLOAT_DTYPES:
        raise invalid(
            "predictions.dtype",
            f"loss '{spec.name}' expects floating-point predictions (DTYPE_FLOAT32, DTYPE_FLOAT64, DTYPE_FLOAT16 "
            f"or DTYPE_BFLOAT16), got {dtype_name(predictions.dtype)}",
        )
    low, high = value_range(predictions)
    check_finite("predictions", low, high)
    if spec.predictions == "probabilities" and (low < 0.0 or high > 1.0):
        raise invalid(
            "predictions",
            f"loss '{spec.name}' expects probabilities in [0, 1], got values in [{low}, {high}]"
            + (f"; use {spec.logits_alternative} for logits" if spec.logits_alternative else ""),
        )
    if targets.tensor.dtype in FLOAT_DTYPES:
        check_finite("targets", *targets())
    if weights is not None and weights.dtype != torch.bool:
        low, high = value_range(weights)
        check_finite("weights", low, high)
        if low < 0.0:
            raise invalid("weights", f"must be >= 0, got a minimum of {low}")


def channel_indices_as_indices(plan: Plan, predictions: Tensor, targets: Tensor) -> Tensor:
    r"""Class indices sent as ``(N, 1, *)`` integers, viewed as ``(N, *)``, for a loss that takes both
    forms (``Forms.indices_with_channel``: the region losses, as MONAI's label maps have the channel).

    The eager kernel squeezes the channel itself, but the ONNX graphs tell class indices from class
    probabilities by rank. Squeezing here gives every backend the same input and lets
    :func:`check_class_indices` check the indices for all of them.
    """
    if "class_indices" not in plan.forms.targets or not plan.forms.indices_with_channel:
        return targets
    if targets.dim() != predictions.dim() or targets.dim() < 2 or targets.shape == predictions.shape:
        return targets
    if targets.shape[1] != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
        return targets  # not class indices with a channel: the loss names what is wrong
    return targets.squeeze(1)


def check_class_indices(plan: Plan, predictions: Tensor, targets: Tensor, targets_range: RangeOnce) -> None:
    r"""Class-index targets must be integers in ``[0, C)`` or the loss's ``ignore_index``.

    Checked here rather than left to the loss so that every backend rejects them the same way:
    the exported ONNX graphs skip value checks (they would need a host sync while tracing).
    Targets with the predictions' rank are dense (probabilities) and are not class indices.
    """
    if "class_indices" not in plan.forms.targets:
        return
    if predictions.dim() < 2 or targets.dim() != predictions.dim() - 1:
        return
    if targets.dtype in FLOAT_DTYPES or targets.dtype == torch.bool:
        raise invalid(
            "targets.dtype",
            f"class-index targets (the predictions' shape without the class dimension) must be integers "
            f"(DTYPE_INT64, DTYPE_INT32, DTYPE_INT16, DTYPE_INT8 or DTYPE_UINT8), got {dtype_name(targets.dtype)}",
        )
    if targets.numel() == 0:
        return
    class_dim = setting(plan.spec, plan.params, "class_dim", 1)
    if not -predictions.dim() < class_dim < predictions.dim() or class_dim in (0, -predictions.dim()):
        return  # the loss names the bad class_dim
    num_classes = predictions.shape[class_dim]
    ignore_index = setting(plan.spec, plan.params, "ignore_index")
    outside = counted_range_outside(
        targets, targets_range, ignore_index, lambda low, high: low >= 0 and high < num_classes
    )
    if outside is None:
        return
    low, high = outside
    ignored = "" if ignore_index is None else f" or the ignore_index {ignore_index}"
    raise invalid(
        "targets",
        f"class indices must be in [0, {num_classes}){ignored} ({num_classes} classes along dim {class_dim} of "
        f"predictions), got values in [{int(low)}, {int(high)}]",
    )


def check_target_range(plan: Plan, predictions: Tensor, targets: Tensor, targets_range: RangeOnce) -> None:
    r"""Dense targets within the loss's ``target_range``, values equal to its ``ignore_index`` excepted.

    The eager kernel checks this too; checking it here makes every backend refuse the same requests
    (the exported graphs check no values). Class indices (a multiclass region loss's targets with one
    dimension fewer than the predictions) are :func:`check_class_indices`'s, and targets of another
    size than the predictions the loss's (it names their shape, the first thing to fix).
    """
    spec = plan.spec
    if spec.target_range is None or targets.dtype == torch.bool or targets.numel() == 0:
        return
    if targets.numel() != predictions.numel():
        return
    if targets.dim() != predictions.dim() and "class_indices" in plan.forms.targets:
        return
    allowed_low, allowed_high = spec.target_range
    ignore_index = setting(spec, plan.params, "ignore_index")
    outside = counted_range_outside(
        targets, targets_range, ignore_index, lambda low, high: low >= allowed_low and high <= allowed_high
    )
    if outside is None:
        return
    low, high = outside
    ignored = "" if ignore_index is None else f" or equal its ignore_index {ignore_index}"
    raise invalid(
        "targets",
        f"loss '{spec.name}' takes targets in [{allowed_low:g}, {allowed_high:g}]{ignored}, got values in [{low:g}, {high:g}]",
    )


def counted_range_outside(
    targets: Tensor, targets_range: RangeOnce, ignore_index: Optional[int], allowed: Callable[[float, float], bool]
) -> Optional[Tuple[float, float]]:
    r"""``(min, max)`` of the targets other than ``ignore_index`` when ``allowed(min, max)`` fails;
    ``None`` when it holds (no pass of its own when every target is allowed: ``targets_range`` is read once
    per request; a second pass only to set the ignored ones aside)."""
    low, high = targets_range()
    if allowed(low, high):
        return None
    counted = targets if ignore_index is None else targets[targets != ignore_index]
    low, high = value_range(counted)
    if counted.numel() == 0 or allowed(low, high):
        return None
    return low, high


def settings_key(parsed: ParsedRequest) -> Optional[Tuple]:
    r"""What :meth:`Scorer.plan` reads of a request, as a hashable key: its :func:`plan_settings`. ``None`` for
    settings over :data:`PLAN_KEY_MAX_BYTES` (large class vectors), which are planned anew each time."""
    settings = plan_settings(parsed)
    entries = (settings["params"] or ()) + (settings["tensor_params"] or ())
    size = len(parsed.message.loss) + sum(len(name) + len(data) for name, data in entries)
    size += len(settings["class_weights"] or b"") + len(settings["pos_weight"] or b"")
    if size > PLAN_KEY_MAX_BYTES:
        return None
    return tuple(settings.values())


def check_metadata(parsed: ParsedRequest) -> None:
    r"""``request_id`` and ``labels`` within the sizes a log line carries."""
    request_id = parsed.message.request_id
    if len(request_id) > MAX_REQUEST_ID_CHARACTERS:
        raise invalid("request_id", f"has {len(request_id)} characters; expected at most {MAX_REQUEST_ID_CHARACTERS}")
    if len(parsed.labels) > MAX_LABELS:
        raise invalid("labels", f"has {len(parsed.labels)} entries; expected at most {MAX_LABELS}")
    for key, value in parsed.labels.items():
        if len(key) > MAX_LABEL_KEY_CHARACTERS:
            raise invalid("labels", f"key '{echo(key)}' is longer than {MAX_LABEL_KEY_CHARACTERS} characters")
        if len(value) > MAX_LABEL_VALUE_CHARACTERS:
            raise invalid(f"labels[{echo(key)}]", f"has {len(value)} characters; expected at most {MAX_LABEL_VALUE_CHARACTERS}")


def class_vector(tensor: Tensor, where: str) -> Tensor:
    r"""A per-class vector parameter as sent: 1-D with one entry per class (a private copy)."""
    if tensor.dim() != 1:
        raise invalid(where, f"must be a 1-D vector with one entry per class, got shape {list(tensor.shape)}")
    if tensor.numel() == 0:
        raise invalid(where, "must have one entry per class, got an empty vector")
    return tensor.clone()


def class_axis(plan: Plan, predictions: Tensor) -> Optional[Tuple[int, int]]:
    r"""``(dimension, size)`` of the classes a batch is scored with; ``None`` when it has no class axis.

    Losses with a ``class_dim`` parameter have their classes there (from 2-D predictions on), the
    others along dim 1 unless their :class:`~loss_service.losses.Forms` say there is one channel.
    """
    if "class_dim" in plan.spec.param_names():
        if predictions.dim() < 2:
            return None
        dim = setting(plan.spec, plan.params, "class_dim")
        dim = dim + predictions.dim() if dim < 0 else dim
        return (dim, predictions.shape[dim]) if 0 < dim < predictions.dim() else None
    if plan.forms.single_channel or predictions.dim() < 2:
        return None
    return 1, predictions.shape[1]


def value_range(tensor: Tensor) -> Tuple[float, float]:
    r"""``(min, max)`` in one pass; NaN anywhere makes both NaN. ``(0, 0)`` for an empty tensor."""
    if tensor.numel() == 0:
        return 0.0, 0.0
    low, high = torch.aminmax(tensor)
    return float(low), float(high)


def check_finite(field: str, low: float, high: float) -> None:
    if math.isnan(low) or math.isnan(high):
        raise invalid(field, "must be finite, found NaN")
    if math.isinf(low) or math.isinf(high):
        raise invalid(field, "must be finite, found Inf")


class StreamAccumulator:
    r"""Dataset-level scoring over the batches of one ``ScoreStream`` call.

    Batch 0 fixes the settings (loss, params, tensor parameters, reduction, backend). A later batch
    may leave any of them unset, which means "as in batch 0", or repeat them unchanged; a different
    value is an error. The batches' :class:`~loss_service.statistics.Statistics` are merged (totals summed in
    float64, groups label by label); the answer is ``reductions(Σ totals)``, which equals ``ScoreBatch`` on
    the concatenated batches for every loss, Dice-like ones included. ``group_ids`` are sent with every
    batch or with none.
    """

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.plan: Optional[Plan] = None
        self._settings: Dict[str, Any] = {}
        self.statistics: Optional[Statistics] = None
        self.num_batches = 0
        # The class axis of batch 0: every later batch must have the same classes.
        self._classes: Optional[Tuple[int, int]] = None

    def add(self, parsed: ParsedRequest) -> None:
        r"""Add one batch; a :class:`ServiceError` (the caller locates it in the stream) changes nothing."""
        request = parsed.message
        if request.return_per_sample:
            raise invalid("return_per_sample", "ScoreStream returns one dataset-level value; expected false")
        settings = stream_settings(parsed)
        plan = self.plan
        if plan is None:
            plan = self.scorer.plan(parsed)
        else:
            check_metadata(parsed)
            for name, value in settings.items():
                if value is not None and value != self._settings[name]:
                    raise invalid(name, "must be the same in every batch of a stream (or unset); it differs from batch 0")
        if self.statistics is not None and request.HasField("group_ids") != self.statistics.grouped:
            raise invalid(
                "group_ids",
                f"must be sent with every batch of a stream or with none; batch 0 {'had' if self.statistics.grouped else 'had none'}",
            )
        predictions, targets, weights = self.scorer.decode_inputs(parsed, plan)
        group_labels = self.scorer.decode_groups(parsed, predictions)
        classes = class_axis(plan, predictions)
        if self.num_batches > 0 and classes != self._classes:
            raise invalid(
                "predictions.shape",
                f"has {classes_text(classes)}, batch 0 had {classes_text(self._classes)}: every batch of a stream "
                f"must have the same classes (shape {list(predictions.shape)})",
            )
        per_class = bool((settings if self.plan is None else self._settings)["return_per_class"])
        result = self.scorer.compute(plan, predictions, targets, weights, False, False, group_labels, per_class)
        try:
            batch = evaluation.make_statistics(
                plan.spec, plan.params, plan.reduction, plan.forms, result.totals, result.groups,
                class_totals=result.class_totals,
            )
            statistics = batch if self.statistics is None else merge([self.statistics, batch])
        except ValueError as exc:  # the stream's distinct groups over the bound
            raise invalid("group_ids", str(exc).removeprefix("group_ids: ")) from None
        if self.plan is None:
            self.plan, self._settings, self._classes = plan, settings, classes
        self.statistics = statistics
        self.num_batches += 1

    def response(self) -> pb.ScoreStreamResponse:
        if self.plan is None or self.statistics is None:
            raise invalid("batches", "a stream needs at least one batch (which names the loss)")
        plan = self.plan
        totals = torch.from_numpy(self.statistics.totals)
        with torch.inference_mode():
            reductions = plan.runner.reductions(totals.to(plan.backend.torch_device)).cpu().tolist()
        weight_sum, denominator, num_elements = summarize(plan.forms, totals)
        response = pb.ScoreStreamResponse(
            loss=reductions[REDUCTION_COLUMN[plan.reduction]],
            weight_sum=weight_sum,
            denominator=denominator,
            num_elements=num_elements,
            num_batches=self.num_batches,
            backend=plan.backend.name,
            device=plan.backend.device_of(plan.spec, plan.params),
        )
        if self.statistics.grouped or self.statistics.per_class or self._settings["return_statistics"]:
            set_statistics_fields(response, self.statistics, bool(self._settings["return_statistics"]))
        return response


def classes_text(classes: Optional[Tuple[int, int]]) -> str:
    return "no class dimension" if classes is None else f"{classes[1]} classes along dim {classes[0]}"


def plan_settings(parsed: ParsedRequest) -> Dict[str, Any]:
    r"""The settings a request's plan is made of -- loss, parameters (the bytes sent for them), reduction,
    backend -- ``None`` where unset (comparable across requests)."""
    request = parsed.message

    def message_map(entries) -> Optional[Tuple]:
        return tuple(sorted((k, v.SerializeToString(deterministic=True)) for k, v in entries.items())) or None

    return {
        "loss": request.loss or None,
        "params": message_map(parsed.params),
        "tensor_params": message_map(parsed.tensor_params),
        "class_weights": request.class_weights.SerializeToString(deterministic=True) if request.HasField("class_weights") else None,
        "pos_weight": request.pos_weight.SerializeToString(deterministic=True) if request.HasField("pos_weight") else None,
        "reduction": request.reduction or None,
        "backend": request.backend or None,
    }


def stream_settings(parsed: ParsedRequest) -> Dict[str, Any]:
    r"""The per-stream settings of a request, ``None`` where unset (comparable across batches): its
    :func:`plan_settings` and what it asks back."""
    request = parsed.message
    return {
        **plan_settings(parsed),
        "return_statistics": request.return_statistics or None,
        "return_per_class": request.return_per_class or None,
    }
