r"""The ``loss_service.v1.LossService`` servicer (grpc.aio).

Small requests are computed on the event loop; requests above ``inline_elements`` go to the worker
thread pool so that a 1e7-element batch never blocks other calls, with the intra-op threads of
:class:`IntraOpThreads`. Requests arrive as :class:`.wire.ParsedRequest` (:func:`add_to_server`
registers the zero-copy deserializer). Every call logs one JSON line (loss, backend, device,
elements, duration_ms, status, request_id, labels).
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import Executor
from typing import AsyncIterator, Callable, List, Optional, TypeVar

import grpc
import torch

from loss_service import losses
from loss_service.v1 import loss_service_pb2 as pb
from loss_service.v1 import loss_service_pb2_grpc as pb_grpc

from .backends import VariantPending
from .errors import ServiceError
from .logs import LOGGER_NAME, CallLog, monotonic_ms
from .scoring import BACKEND_ENUMS, Scorer, StreamAccumulator, request_field
from .wire import ParsedRequest, parse_request

log = logging.getLogger(f"{LOGGER_NAME}.calls")
T = TypeVar("T")


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name


def request_elements(request: pb.ScoreBatchRequest) -> int:
    r"""Element count of the predictions, read from the shape without decoding anything."""
    return math.prod(request.predictions.shape)


def add_to_server(servicer: "LossServiceServicer", server: grpc.aio.Server) -> None:
    r"""Register ``servicer`` like the generated ``add_LossServiceServicer_to_server``, but with
    :func:`.wire.parse_request` as the request deserializer: the servicer receives
    :class:`.wire.ParsedRequest` objects whose large payloads are views, not copies."""
    handlers = {
        "ScoreBatch": grpc.unary_unary_rpc_method_handler(
            servicer.ScoreBatch,
            request_deserializer=parse_request,
            response_serializer=pb.ScoreBatchResponse.SerializeToString,
        ),
        "ScoreStream": grpc.stream_unary_rpc_method_handler(
            servicer.ScoreStream,
            request_deserializer=parse_request,
            response_serializer=pb.ScoreStreamResponse.SerializeToString,
        ),
        "ListLosses": grpc.unary_unary_rpc_method_handler(
            servicer.ListLosses,
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
        info.backends.extend(BACKEND_ENUMS[name] for name in backends_of(spec.name))
    return response


class LossServiceServicer(pb_grpc.LossServiceServicer):
    r"""Serves ScoreBatch, ScoreStream and ListLosses once :meth:`attach` has given it a scorer."""

    def __init__(self, executor: Executor, inline_elements: int, threads: IntraOpThreads) -> None:
        self._executor = executor
        self._inline_elements = inline_elements
        self._threads = threads
        self.calls = CallLog(log)
        self._scorer: Optional[Scorer] = None
        self._catalogue: Optional[pb.ListLossesResponse] = None

    def attach(self, scorer: Scorer) -> None:
        self._catalogue = loss_catalogue(
            lambda loss: [name for name, backend in scorer.backends.items() if backend.supports(loss)]
        )
        self._scorer = scorer

    async def _ready(self, context: grpc.aio.ServicerContext) -> Scorer:
        if self._scorer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its backends; retry")
        return self._scorer

    async def _run(self, elements: int, function: Callable[..., T], *args) -> T:
        r"""``function(*args)`` inline or in the worker pool; after a :class:`VariantPending`, wait and retry.

        The wait for a graph still being exported is awaited on the event loop, never blocking it
        (other calls and health checks go on). ``function`` changes no state before it raises it.
        """
        while True:
            try:
                if elements <= self._inline_elements:
                    return function(*args)
                return await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._threads.run, elements, function, *args
                )
            except VariantPending as pending:
                # Its outcome is read on the retry: a failed export is then a FAILED_PRECONDITION.
                await asyncio.wait([asyncio.wrap_future(pending.future)])

    async def ScoreBatch(self, parsed: ParsedRequest, context: grpc.aio.ServicerContext) -> pb.ScoreBatchResponse:
        scorer = await self._ready(context)
        start = time.perf_counter()
        request = parsed.message
        elements = request_elements(request)
        try:
            response = await self._run(elements, scorer.score_batch, parsed)
        except ServiceError as error:
            self._log("ScoreBatch", request, start, elements, error.code.name, error.message)
            await context.abort(*_abort_arguments(error))
        except Exception as exc:  # a bug, not a bad request: keep the server up and say so
            log.exception("ScoreBatch failed", extra={"fields": {"loss": request.loss, "request_id": request.request_id}})
            self._log("ScoreBatch", request, start, elements, "INTERNAL", repr(exc))
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")
        self._log("ScoreBatch", request, start, elements, "OK", backend=response.backend, device=response.device)
        return response

    async def ScoreStream(
        self, request_iterator: AsyncIterator[ParsedRequest], context: grpc.aio.ServicerContext
    ) -> pb.ScoreStreamResponse:
        scorer = await self._ready(context)
        start = time.perf_counter()
        accumulator = StreamAccumulator(scorer)
        first = pb.ScoreBatchRequest()
        elements = 0
        try:
            async for parsed in request_iterator:
                if accumulator.num_batches == 0:
                    first = parsed.message
                count = request_elements(parsed.message)
                elements += count
                await self._run(count, accumulator.add, parsed)
            response = accumulator.response()
        except ServiceError as error:
            self._log("ScoreStream", first, start, elements, error.code.name, error.message, batches=accumulator.num_batches)
            await context.abort(*_abort_arguments(error))
        except Exception as exc:
            log.exception("ScoreStream failed", extra={"fields": {"loss": first.loss, "request_id": first.request_id}})
            self._log("ScoreStream", first, start, elements, "INTERNAL", repr(exc))
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")
        self._log(
            "ScoreStream", first, start, elements, "OK", backend=response.backend, device=response.device,
            batches=response.num_batches,
        )
        return response

    async def ListLosses(self, request: pb.ListLossesRequest, context: grpc.aio.ServicerContext) -> pb.ListLossesResponse:
        await self._ready(context)
        return self._catalogue

    def _log(self, method: str, request: pb.ScoreBatchRequest, start: float, elements: int, status: str,
             error: str = "", **fields) -> None:
        self.calls.write(
            method=method,
            loss=request.loss,
            backend=fields.pop("backend", None),
            device=fields.pop("device", None),
            elements=elements,
            duration_ms=monotonic_ms(start),
            status=status,
            request_id=request.request_id,
            labels=dict(request.labels) if request.labels else {},
            **({"error": error} if error else {}),
            **fields,
        )


def _abort_arguments(error: ServiceError):
    status = error.to_status()
    return status.code, status.details, status.trailing_metadata
