r"""Assembling and running the server: backends, health, reflection, security, signals.

``create_server(address, config)`` binds the port and registers the services; ``start()`` sets
the torch threads and opens the port at once (liveness ``""`` answers SERVING), then
:meth:`LossServer.load` prepares the artifacts (exporting the missing or stale TorchScript modules
and default ONNX graphs in worker processes, verifying the manifest's signature if a key is set,
the checksums and that each artifact is the loss its entry says), loads every backend,
runs each loss once per backend (:func:`smoke_check`), turns readiness
(``loss_service.v1.LossService``) SERVING, and only then starts exporting the other ONNX variants
in the background (:mod:`.background`). With ``metrics_port`` set, ``start()`` also opens the
Prometheus endpoint (:mod:`.metrics`) and ``stop()`` closes it last.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Tuple

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loss_service import export, losses
from loss_service.protocol import SERVICE_NAME

from .artifacts import prepare_artifacts
from .background import VariantExporter
from .backends import Backend, EagerBackend, OnnxBackend, TorchScriptBackend, config_key
from .config import ServerConfig, host_port, select_device
from .logs import LOGGER_NAME, event
from .memory import IdleTrim, RequestBudget, trim_malloc, tune_malloc
from .metrics import ServerMetrics
from .reflection import enable_reflection
from .scoring import Scorer
from .security import address_host, load_server_security

log = logging.getLogger(f"{LOGGER_NAME}.server")
# How long the server must have had no request in flight before it returns freed memory.
IDLE_TRIM_SECONDS = 2.0
# On shutdown, calls that reached the server before it stopped are still taken in while they keep
# arriving (until none has for ARRIVAL_QUIET_SECONDS, at most ARRIVAL_MAX_SECONDS): gRPC cancels
# calls it has received but not yet handed to the servicer once its shutdown begins.
ARRIVAL_QUIET_SECONDS = 0.25
ARRIVAL_MAX_SECONDS = 1.0


class _WatchEnded(Exception):
    r"""Raised by :class:`_EndingWatch` once a Watch stream has told its client the server is stopping."""


class _EndingWatch:
    r"""A Watch call's context whose stream ends after its first write once the server is stopping."""

    def __init__(self, context: grpc.aio.ServicerContext, health: "HealthService") -> None:
        self._context = context
        self._health = health

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(response)
        if self._health.stopping:
            raise _WatchEnded


class HealthService(health.aio.HealthServicer):
    r"""``grpc.health.v1.Health`` whose Watch streams end once they have sent the statuses of a
    shutdown (NOT_SERVING): they never end by themselves, and a graceful stop waits for every call,
    so they would hold the server for its whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = False

    async def enter_graceful_shutdown(self) -> None:
        self.stopping = True
        await super().enter_graceful_shutdown()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            await super().Watch(request, _EndingWatch(context, self))
        except _WatchEnded:
            return


class LossServer:
    r"""A bound, not yet started ``grpc.aio`` server with LossService, health and (if configured) reflection."""

    def __init__(self, address: str, config: ServerConfig) -> None:
        from .service import IntraOpThreads, LossServiceServicer, add_to_server

        self.config = config
        self.device = select_device(config.device, torch.cuda.is_available(), torch.cuda.device_count())
        security = load_server_security(config, address)
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="loss-worker")
        self.health = HealthService()
        self.budget = RequestBudget(config.max_inflight_bytes)
        self.idle_trim = IdleTrim(self.budget, self.executor, IDLE_TRIM_SECONDS)
        self.metrics = (ServerMetrics(self.budget, lambda: self.servicer.in_flight)
                        if config.metrics_port is not None else None)
        self.servicer = LossServiceServicer(self.executor, config.inline_elements, IntraOpThreads(config.torch_threads),
                                            self.budget, self.metrics)
        self.server = grpc.aio.server(options=config.grpc_options(), interceptors=security.interceptors)
        add_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            enable_reflection((SERVICE_NAME, health.SERVICE_NAME), self.server)
        self.port = security.add_port(self.server, address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self.health_server: Optional[grpc.aio.Server] = None
        self.health_port: Optional[int] = None
        if config.health_port is not None:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            health_address = host_port(address_host(address), config.health_port)
            self.health_port = self.health_server.add_insecure_port(health_address)
            if self.health_port == 0:
                raise OSError(f"could not bind {health_address}")
        self.address = address
        self.scorer: Optional[Scorer] = None
        self.variants: Optional[VariantExporter] = None

    async def start(self) -> None:
        # The event loop computes only small requests (below torch's parallel grain size): one
        # thread. The workers set their own count per large request (service.IntraOpThreads).
        torch.set_num_threads(1)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.metrics is not None:
            self.metrics.expose(self.config.metrics_host, self.config.metrics_port)

    async def load(self) -> Scorer:
        r"""Build the backends in the worker pool, attach them, turn readiness SERVING, start the variants."""
        loop = asyncio.get_running_loop()
        scorer, variants = await loop.run_in_executor(self.executor, self._build_scorer)
        # Start-up (exports, loads, the smoke check) leaves freed memory behind: serve from a lean heap.
        await loop.run_in_executor(self.executor, trim_malloc)
        self.servicer.attach(scorer)
        self.scorer = scorer
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics is not None:
            self.metrics.serving(scorer, variants)
        if variants is not None:
            self.variants = variants
            variants.start()
        return scorer

    def _build_scorer(self) -> Tuple[Scorer, Optional[VariantExporter]]:
        start = time.perf_counter()
        jobs = export.default_jobs() if self.config.export_jobs is None else self.config.export_jobs
        artifacts = prepare_artifacts(self.config.artifacts, export_missing=self.config.export_missing, jobs=jobs)
        onnx = OnnxBackend(self.device, artifacts.graphs, explicit_device=self.config.device != "auto")
        backends: Dict[str, Backend] = {
            "eager": EagerBackend(self.device),
            "torchscript": TorchScriptBackend(self.device, artifacts.scripts),
            "onnx": onnx,
        }
        loaded = time.perf_counter()
        event(log, "backends_loaded", seconds=round(loaded - start, 3), device=self.device,
              exported=len(artifacts.exported), export_failures=artifacts.failed, pending_variants=len(artifacts.pending))
        smoke_check(backends)
        event(log, "smoke_checked", seconds=round(time.perf_counter() - loaded, 3))
        variants = None
        if artifacts.pending:
            variants = VariantExporter(Path(self.config.artifacts), artifacts.pending, onnx.add_graph, artifacts.opset)
            onnx.pending = variants
        return Scorer(backends, self.config.default_backend(), self.config.max_elements), variants

    async def stop(self, grace: Optional[float]) -> None:
        r"""Readiness NOT_SERVING, stop accepting calls, let in-flight ones finish within ``grace`` s.

        Between the two, calls already on their way are let in (:data:`ARRIVAL_QUIET_SECONDS`): a
        load balancer sees NOT_SERVING at once, and no call that reached the server is cancelled
        by its shutdown, only those that arrive once it no longer listens (UNAVAILABLE).
        """
        self.idle_trim.closed = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.health.enter_graceful_shutdown()
        if self.metrics is not None:
            self.metrics.not_serving()
        if grace:
            settle_until = started + min(grace, ARRIVAL_MAX_SECONDS)
            while loop.time() < settle_until and time.monotonic() - self.servicer.last_call_started < ARRIVAL_QUIET_SECONDS:
                await asyncio.sleep(ARRIVAL_QUIET_SECONDS / 5)
            grace = max(0.0, grace - (loop.time() - started))
        await self.server.stop(grace)
        if self.health_server is not None:
            # Probes saw NOT_SERVING on it throughout the stop; its Watch streams have ended.
            await self.health_server.stop(0)
        self.servicer.calls.flush()
        if self.variants is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.variants.stop)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.metrics.close)


def smoke_check(backends: Dict[str, Backend]) -> None:
    r"""Run every loss once on every backend, default settings, tiny input; disable what fails.

    The check behind readiness: a loss is offered on a backend (ListLosses ``backends``) only if
    its artifact loaded, ran, and agreed with eager PyTorch on this input (float32 statistics,
    rtol 1e-4). A TorchScript module that is not its loss's (``ArtifactError`` on its first load)
    stops the start instead, like a checksum mismatch: the folder is not what its manifest says.
    Stale artifacts need no sweep over every setting: the manifest's fingerprint already sends
    them back to the exporter, and the checksums guard the bytes. The run also takes
    one-time costs (TorchScript's first run, creating each default ONNX session) off the first
    requests; the sessions of the other variants are created on their first request (~30 ms).
    """
    reference = backends["eager"]
    for spec in losses.specs():
        predictions, targets = spec.make_inputs(2, 3, (4,), torch.Generator().manual_seed(0), torch.float32, {})
        predictions, targets = predictions.to(reference.torch_device), targets.to(reference.torch_device)
        with torch.inference_mode():
            runner = reference.build(spec, {})
            _, expected, _ = runner.statistics(predictions, targets, None, False, True)
        reference.keep(config_key(spec.name, {}), runner, {})
        for backend in backends.values():
            if backend is reference:
                continue
            if not backend.supports(spec.name):
                _unavailable(backend, spec.name, "no artifact")
                continue
            try:
                runner = backend.build(spec, {})
                with torch.inference_mode():
                    _, totals, _ = runner.statistics(predictions, targets, None, False, True)
                    runner.reductions(totals)
                torch.testing.assert_close(totals.cpu(), expected.cpu(), rtol=1e-4, atol=1e-5, check_dtype=False)
            except export.ArtifactError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported, and the loss is not offered there
                _unavailable(backend, spec.name, f"start-up check failed: {exc}")
            else:
                # The first requests with default settings find their runner built.
                backend.keep(config_key(spec.name, {}), runner, {})


def _unavailable(backend: Backend, loss: str, reason: str) -> None:
    backend.disable(loss, reason)
    log.error("loss unavailable", extra={"fields": {"loss": loss, "backend": backend.name, "reason": reason}})


def create_server(address: str, config: ServerConfig) -> Tuple[LossServer, int]:
    r"""A :class:`LossServer` bound to ``address`` (port 0 picks a free port) and the bound port.

    Call it from the thread that runs the asyncio event loop; then ``await server.start()`` and
    ``await server.load()``.
    """
    server = LossServer(address, config)
    return server, server.port


async def serve(config: ServerConfig) -> int:
    r"""Run until SIGTERM/SIGINT; returns the process exit code (0 after a graceful shutdown)."""
    started = time.perf_counter()
    tuned = tune_malloc()
    server, port = create_server(config.address, config)
    await server.start()
    ports = {} if server.metrics is None else {"metrics_host": config.metrics_host, "metrics_port": server.metrics.port}
    if server.health_port is not None:
        ports["health_port"] = server.health_port
    event(log, "listening", host=config.host, port=port, device=server.device, malloc_tuned=tuned,
          default_backend=config.default_backend(), torch_threads=config.torch_threads, **ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loading = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        log.error("start failed", exc_info=loading.exception(), extra={"fields": {"port": port}})
        await server.stop(0)
        return 1
    if loading.done():
        event(log, "ready", port=port, seconds=round(time.perf_counter() - started, 3))
    await stopping
    event(log, "shutting_down", grace_seconds=config.grace_seconds)
    loading.cancel()
    await server.stop(config.grace_seconds)
    event(log, "stopped")
    return 0


class BackgroundServer:
    r"""A server on its own event-loop thread (tests, notebooks): ``with BackgroundServer(cfg) as s:``.

    Entering returns once readiness is SERVING; ``s.port`` is the bound port.
    """

    def __init__(self, config: ServerConfig, address: Optional[str] = None) -> None:
        self.config = config
        self.address = address or config.address
        self.port = 0
        self.server: Optional[LossServer] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loss-service", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    async def _start(self) -> None:
        self.server, self.port = create_server(self.address, self.config)
        await self.server.start()
        await self.server.load()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: Optional[float] = 0) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
            self.server = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __exit__(self, *exc) -> None:
        self.stop()
