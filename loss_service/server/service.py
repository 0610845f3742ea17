r"""The ``loss_service.v1.LossService`` servicer (grpc.aio).

Requests arrive as the serialized bytes gRPC received (:func:`add_to_server` registers no
deserializer) and are read by :func:`.wire.parse_request`. The event loop only does work that is
small whatever the request: a body under :data:`INLINE_MAX_BYTES` is parsed and planned on it,
and computed on it too when it has at most ``inline_elements`` elements and its runner is built
already (a handoff to a thread costs more than such a loss). Everything else -- parsing large
bodies, building runners (a TorchScript copy takes a noticeable fraction of a second), computing
large batches -- runs in the worker thread pool with the intra-op threads of
:class:`IntraOpThreads`, so health checks and small calls are answered meanwhile.

Every request's body counts against the in-flight budget (:class:`.memory.RequestBudget`) until
its work has ended, also when the client has gone. Every call logs one JSON line (loss, backend,
device, elements, duration_ms, status, request_id, labels), a cancelled one too, and is counted in
the server's metrics (:mod:`.metrics`) when they are on.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import traceback
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError

from loss_service import losses
from loss_service.protocol import BACKENDS, SERVICE_NAME
from loss_service.v1 import loss_service_pb2 as pb
from loss_service.v1 import loss_service_pb2_grpc as pb_grpc

from .backends import VariantPending
from .errors import ServiceError, echo
from .logs import LOGGER_NAME, CallLog, monotonic_ms
from .memory import RequestBudget
from .metrics import ServerMetrics
from .scoring import (
    MAX_REQUEST_ID_CHARACTERS, Plan, Scorer, StreamAccumulator, check_metadata, request_field,
)
from .wire import ParsedRequest, malformed, parse_request

log = logging.getLogger(f"{LOGGER_NAME}.calls")
T = TypeVar("T")

# Bodies below this size are parsed on the event loop: protobuf reads them in well under a
# millisecond whatever their fields; larger ones are parsed in the worker pool.
INLINE_MAX_BYTES = 64 * 1024




def request_elements(request) -> int:
    r"""Element count of the predictions, read from the shape without decoding anything."""
    return math.prod(request.predictions.shape)


def add_to_server(servicer: "LossServiceServicer", server: grpc.aio.Server) -> None:
    r"""Register ``servicer`` like the generated ``add_LossServiceServicer_to_server``, but without
    a request deserializer for the scoring methods: the servicer receives the serialized bytes and
    parses them itself (:mod:`.wire`), off the event loop when they are large, and answers bytes
    that are not a request with ``INVALID_ARGUMENT`` (a deserializer's failure would be UNKNOWN)."""
    handlers = {
        "ScoreBatch": grpc.unary_unary_rpc_method_handler(
            servicer.tracked(servicer.ScoreBatch),
            response_serializer=pb.ScoreBatchResponse.SerializeToString,
        ),
        "ScoreStream": grpc.stream_unary_rpc_method_handler(
            servicer.tracked(servicer.ScoreStream),
            response_serializer=pb.ScoreStreamResponse.SerializeToString,
        ),
        "MergeStatistics": grpc.unary_unary_rpc_method_handler(
            servicer.tracked(servicer.MergeStatistics),
            response_serializer=pb.ScoreStreamResponse.SerializeToString,
        ),
        "ListLosses": grpc.unary_unary_rpc_method_handler(
            servicer.tracked(servicer.ListLosses),
            request_deserializer=pb.ListLossesRequest.FromString,
            response_serializer=pb.ListLossesResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# Below this many elements a request computes with one thread whatever the budget: waking the
# other threads for every op costs more than it saves (bench, focal/bce on 1e5 elements: 2 threads
# 3.4/4.5 ms per request, 1 thread 3.0/3.0 ms; on 1e6 and more, 2 threads are faster).
PARALLEL_MIN_ELEMENTS = 1_000_000


class IntraOpThreads:
    r"""How many torch intra-op threads a large request computes with: all of ``budget`` while it is
    the only one computing (and has at least :data:`PARALLEL_MIN_ELEMENTS` elements), 1 otherwise.

    With one request at a time (a job scoring its batches one by one) its kernels use every core,
    which is otherwise idle while the request computes; concurrent large requests run one thread
    each, side by side on the worker threads, instead of oversubscribing the cores (two requests
    with 2 threads each on 2 cores wait for each other's descheduled threads at every parallel
    op). ``torch.set_num_threads`` sets OpenMP's thread count of the *calling* thread only, so a
    worker's setting never changes the event loop's or another worker's.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._computing = 0
        self._lock = threading.Lock()

    def run(self, elements: int, function: Callable[..., T], *args) -> T:
        with self._lock:
            self._computing += 1
            threads = self.budget if self._computing == 1 and elements >= PARALLEL_MIN_ELEMENTS else 1
        try:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return function(*args)
        finally:
            with self._lock:
                self._computing -= 1


def param_message(value) -> Optional[pb.Param]:
    if value is None:
        return None
    if isinstance(value, bool):
        return pb.Param(bool_value=value)
    if isinstance(value, int):
        return pb.Param(int_value=value)
    if isinstance(value, float):
        return pb.Param(double_value=value)
    if isinstance(value, str):
        return pb.Param(string_value=value)
    return None


def loss_catalogue(backends_of: Callable[[str], List[str]]) -> pb.ListLossesResponse:
    r"""The ``ListLosses`` answer: every registered loss, its parameters and its backends."""
    response = pb.ListLossesResponse()
    for spec in losses.specs():
        info = response.losses.add(
            name=spec.name,
            summary=spec.summary,
            predictions=spec.predictions,
            targets=spec.targets,
            prediction_shape=spec.prediction_shape,
            target_shape=spec.target_shape,
            reference=spec.reference,
            family=spec.family,
        )
        for param in spec.params:
            entry = info.params.add(
                name=param.name,
                kind=param.kind,
                range=param.range_text(),
                doc=param.doc,
                choices=list(param.choices or ()),
                request_field=request_field(param),
            )
            default = param_message(param.default)
            if default is not None:
                entry.default_value.CopyFrom(default)
        info.backends.extend(BACKENDS[name] for name in backends_of(spec.name))
    return response


@dataclass
class CallRecord:
    r"""What one call's log line says of the request (bounded whatever the request held)."""

    method: str
    start: float = field(default_factory=time.perf_counter)
    loss: str = ""
    request_id: str = ""
    labels: Dict[str, str] = field(default_factory=dict)
    elements: int = 0
    # Bytes of the request messages received (all batches of a stream).
    request_bytes: int = 0
    identified: bool = False
    # Batches a stream has added (None for ScoreBatch).
    batches: Optional[int] = None

    def identify(self, parsed: ParsedRequest) -> int:
        r"""Take the request's identity from its first message; the message's element count."""
        request = parsed.message
        if not self.identified:
            self.identified = True
            self.loss = echo(request.loss)
            self.request_id = request.request_id[:MAX_REQUEST_ID_CHARACTERS]
            try:
                check_metadata(parsed)
                self.labels = parsed.labels
            except ServiceError:
                self.labels = {}  # over the limits: the call is refused for them, not logged with them
        return request_elements(request)


class LossServiceServicer(pb_grpc.LossServiceServicer):
    r"""Serves ScoreBatch, ScoreStream, MergeStatistics and ListLosses once :meth:`attach` has given it a scorer."""

    def __init__(self, executor: Executor, inline_elements: int, threads: IntraOpThreads, budget: RequestBudget,
                 metrics: Optional[ServerMetrics] = None) -> None:
        self._executor = executor
        self._inline_elements = inline_elements
        self._threads = threads
        self.budget = budget
        self.calls = CallLog(log)
        self._metrics = metrics
        # Calls in a handler now, and time.monotonic() when the last one reached it (the shutdown
        # waits for arrivals to stop, then for these to end).
        self.in_flight = 0
        self.last_call_started = 0.0
        self._scorer: Optional[Scorer] = None
        self._catalogue: Optional[pb.ListLossesResponse] = None

    def attach(self, scorer: Scorer) -> None:
        self._catalogue = loss_catalogue(
            lambda loss: [name for name, backend in scorer.backends.items() if backend.supports(loss)]
        )
        self._scorer = scorer

    def tracked(self, handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        r"""``handler`` counted in :attr:`in_flight` while it runs."""

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> T:
            self.in_flight += 1
            self.last_call_started = time.monotonic()
            try:
                return await handler(request, context)
            finally:
                self.in_flight -= 1

        return counted

    def _ready(self) -> Scorer:
        if self._scorer is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is still loading its backends; retry")
        return self._scorer

    async def _run(self, inline: bool, function: Callable[..., T], *args) -> T:
        r"""``function(*args)`` on the event loop or in the worker pool; after a :class:`VariantPending`,
        wait (on the event loop, never blocking it) and call it again.

        ``function`` changes no state before it raises :class:`VariantPending`. Work in the pool
        runs to its end even when the call is cancelled meanwhile: the caller's budget is held
        until then, since the work still holds the request's memory.
        """
        while True:
            try:
                if inline:
                    return function(*args)
                work = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
                try:
                    return await asyncio.shield(work)
                except asyncio.CancelledError:
                    await asyncio.wait([work])
                    raise
            except VariantPending as pending:
                # Its outcome is read on the retry: a failed export is then a FAILED_PRECONDITION.
                await asyncio.wait([asyncio.wrap_future(pending.future)])

    def _inline(self, plan: Optional[Plan], elements: int) -> bool:
        r"""Whether a request of ``elements`` with ``plan`` is computed on the event loop: a small one
        whose runner is built (building one may take long)."""
        return plan is not None and plan.runner is not None and elements <= self._inline_elements

    async def _answer(self, context: grpc.aio.ServicerContext, call: CallRecord, work: Awaitable[T]) -> Optional[T]:
        r"""The response ``work`` computes, logged and counted; a refused call's status is set on ``context``
        (the handler then returns ``None``). Every call ends here or in :meth:`_log_cancelled`."""
        try:
            response = await work
        except ServiceError as error:
            return self._refuse(context, call, error)
        except asyncio.CancelledError:
            self._log_cancelled(context, call)
            raise
        except Exception as error:  # a bug, not a bad request: keep the server up and say so
            log.exception(f"{call.method} failed", extra={"fields": {"loss": call.loss, "request_id": call.request_id}})
            return self._refuse(context, call, error)
        self._log(call, "OK", backend=response.backend, device=response.device)
        return response

    async def ScoreBatch(self, body: bytes, context: grpc.aio.ServicerContext) -> Optional[pb.ScoreBatchResponse]:
        call = CallRecord("ScoreBatch", request_bytes=len(body))
        return await self._answer(context, call, self._score_batch(body, call))

    async def _score_batch(self, body: bytes, call: CallRecord) -> pb.ScoreBatchResponse:
        scorer = self._ready()
        with self.budget.holding(len(body)):
            if len(body) >= INLINE_MAX_BYTES:
                return await self._run(False, self._parse_and_score, scorer, body, call)
            parsed = parse_request(body)
            call.elements = call.identify(parsed)
            plan = scorer.plan(parsed)
            if self._inline(plan, call.elements):
                return await self._run(True, scorer.score_batch, parsed, plan)
            return await self._run(False, self._threads.run, call.elements, scorer.score_batch, parsed, plan)

    def _parse_and_score(self, scorer: Scorer, body: bytes, call: CallRecord) -> pb.ScoreBatchResponse:
        parsed = parse_request(body)
        call.elements = call.identify(parsed)
        return self._threads.run(call.elements, scorer.score_batch, parsed, scorer.plan(parsed))

    async def ScoreStream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> Optional[pb.ScoreStreamResponse]:
        call = CallRecord("ScoreStream", batches=0)
        return await self._answer(context, call, self._score_stream(request_iterator, call))

    async def _score_stream(self, request_iterator: AsyncIterator[bytes], call: CallRecord) -> pb.ScoreStreamResponse:
        accumulator = StreamAccumulator(self._ready())
        async for body in request_iterator:
            call.request_bytes += len(body)
            try:
                with self.budget.holding(len(body)):
                    call.elements += await self._add_batch(accumulator, body, call)
            except ServiceError as error:
                raise error.in_batch(accumulator.num_batches) from None
            call.batches = accumulator.num_batches
        return accumulator.response()

    async def _add_batch(self, accumulator: StreamAccumulator, body: bytes, call: CallRecord) -> int:
        r"""Add one batch to ``accumulator``; its element count."""
        if len(body) >= INLINE_MAX_BYTES:
            return await self._run(False, self._parse_and_add, accumulator, body, call)
        parsed = parse_request(body)
        elements = call.identify(parsed)
        if self._inline(accumulator.plan, elements):
            await self._run(True, accumulator.add, parsed)
        else:
            await self._run(False, self._threads.run, elements, accumulator.add, parsed)
        return elements

    def _parse_and_add(self, accumulator: StreamAccumulator, body: bytes, call: CallRecord) -> int:
        parsed = parse_request(body)
        elements = call.identify(parsed)
        self._threads.run(elements, accumulator.add, parsed)
        return elements

    async def MergeStatistics(self, body: bytes, context: grpc.aio.ServicerContext) -> Optional[pb.ScoreStreamResponse]:
        call = CallRecord("MergeStatistics", request_bytes=len(body))
        return await self._answer(context, call, self._merge(body, call))

    async def _merge(self, body: bytes, call: CallRecord) -> pb.ScoreStreamResponse:
        scorer = self._ready()
        with self.budget.holding(len(body)):
            return await self._run(len(body) < INLINE_MAX_BYTES, self._parse_and_merge, scorer, body, call)

    def _parse_and_merge(self, scorer: Scorer, body: bytes, call: CallRecord) -> pb.ScoreStreamResponse:
        try:
            request = pb.MergeStatisticsRequest.FromString(body)
        except DecodeError:
            raise malformed(f"not a valid {pb.MergeStatisticsRequest.DESCRIPTOR.full_name} in protobuf's wire format") from None
        if request.statistics:
            call.loss = echo(request.statistics[0].loss)
        call.batches = len(request.statistics)
        return scorer.merge(request)

    async def ListLosses(self, request: pb.ListLossesRequest, context: grpc.aio.ServicerContext) -> Optional[pb.ListLossesResponse]:
        try:
            self._ready()
        except ServiceError as error:
            return _set_status(context, error)
        return self._catalogue

    def _refuse(self, context: grpc.aio.ServicerContext, call: CallRecord, error: Exception) -> None:
        r"""Answer the call with ``error``'s status (``INTERNAL`` for anything but a :class:`ServiceError`).

        The status is set, not raised (``context.abort``): an exception leaving the handler would
        carry its frame, and with it the request, into reference cycles inside grpc.
        """
        release_frames(error)
        if not isinstance(error, ServiceError):
            error = ServiceError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        self._log(call, error.code.name, error.message, refused_for=error.reason)
        return _set_status(context, error)

    def _log_cancelled(self, context: grpc.aio.ServicerContext, call: CallRecord) -> None:
        r"""Log a call grpc cancelled (the client cancelled it, or its deadline passed): the client has its status."""
        remaining = context.time_remaining()
        status = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        self._log(call, status.name)

    def _log(self, call: CallRecord, status: str, error: str = "", refused_for: Optional[str] = None,
             backend: Optional[str] = None, device: Optional[str] = None) -> None:
        r"""Write the call's log line, and count it in the metrics: every call ends here, once."""
        if self._metrics is not None:
            self._metrics.call_finished(call.method, call.loss, backend or "", status, time.perf_counter() - call.start,
                                        call.elements, call.request_bytes, refused_for)
        self.calls.write(
            method=call.method,
            loss=call.loss,
            backend=backend,
            device=device,
            elements=call.elements,
            duration_ms=monotonic_ms(call.start),
            status=status,
            request_id=call.request_id,
            labels=call.labels,
            **({"error": error} if error else {}),
            **({"batches": call.batches} if call.batches is not None else {}),
        )


# What a client learns of a server bug: nothing of the server's internals (the log has the trace).
INTERNAL_MESSAGE = "internal error; the server logged it with the call's request_id"


def release_frames(error: BaseException) -> None:
    r"""Drop the local variables of the finished frames that ``error`` (and the errors it was raised
    from) passed through.

    They hold the request -- its body, its decoded tensors, the module built for it -- and
    tracebacks form reference cycles that only the cyclic garbage collector frees, at a time of
    its choosing: a refused request must not keep its memory until then.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _set_status(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    r"""The status of a refused call, set on ``context``: the handler then returns ``None``."""
    status = error.to_status()
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
