r"""Prometheus metrics of one server, and the HTTP endpoint that serves them (``--metrics-port``).

Each server has its own :class:`~prometheus_client.CollectorRegistry`: tests and notebooks run
several servers in one process, whose counts the global default registry would mix (and which
refuses a second metric of the same name). The servicer reports each scoring call where it writes
the call's log line (:meth:`ServerMetrics.call_finished`); everything else -- the calls in flight,
the bytes held by the in-flight budget, the runner caches, process memory -- is read when
Prometheus scrapes. With metrics off the servicer
holds ``None`` instead and a call costs nothing more than that check.

Labels are bounded whatever clients send (each label set is a time series Prometheus keeps):
``loss`` is a registered loss name, :data:`OTHER_LOSS` for a name the server does not know and
:data:`NO_LOSS` when the call never named one (an unreadable body, a stream without batches);
``backend`` is the backend that scored the call, empty when none did; ``code`` a gRPC status code
name; ``method`` the RPC; ``reason`` one of :data:`.errors.REFUSAL_REASONS`.

docs/service.md, "Metrics", lists every metric.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Tuple
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from loss_service import losses

from .errors import REFUSAL_REASONS
from .memory import RequestBudget

if TYPE_CHECKING:
    from .background import VariantExporter
    from .scoring import Scorer

PREFIX = "loss_service_"
OTHER_LOSS = "other"
NO_LOSS = "none"
# From a small request answered on the event loop (~0.1 ms) to a stream or a 5e7-element batch
# on a busy CPU (tens of seconds).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OK = grpc.StatusCode.OK.name

# The children one call updates, bound to its labels: (requests, request bytes, latency, elements
# scored -- None unless the call was answered OK).
_CallSeries = Tuple[Counter, Counter, Histogram, Optional[Counter]]


class ServerMetrics:
    r"""The metrics of one server: what the servicer reports, and its scrape endpoint.

    Call :meth:`call_finished`, :meth:`serving` and :meth:`not_serving` from the server's event
    loop; scrapes run on the endpoint's threads. ``in_flight`` reads the calls in a handler now.
    """

    def __init__(self, budget: RequestBudget, in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        call_labels = ("method", "loss", "backend", "code")
        self._requests = Counter(f"{PREFIX}requests", "Scoring calls ended, by outcome.", call_labels,
                                 registry=registry)
        self._request_bytes = Counter(f"{PREFIX}request_bytes", "Bytes of the request messages the calls received.",
                                      call_labels, registry=registry)
        self._duration = Histogram(f"{PREFIX}request_duration_seconds", "Time from a call's start to its answer.",
                                   ("method", "loss"), buckets=LATENCY_BUCKETS, registry=registry)
        self._elements = Counter(f"{PREFIX}scored_elements", "Prediction elements of the calls answered OK.",
                                 ("method", "loss", "backend"), registry=registry)
        refused = Counter(f"{PREFIX}requests_refused",
                          "Calls refused for what they would cost: memory (the in-flight budget) or size "
                          "(a tensor over --max-elements).", ("reason",), registry=registry)
        self._refused = {reason: refused.labels(reason) for reason in REFUSAL_REASONS}
        Gauge(f"{PREFIX}inflight_requests", "LossService calls started and not yet answered.",
              registry=registry).set_function(in_flight)
        Gauge(f"{PREFIX}inflight_request_bytes", "Request bytes held against the in-flight budget.",
              registry=registry).set_function(lambda: budget.in_use)
        Gauge(f"{PREFIX}inflight_budget_bytes", "The in-flight budget (--max-inflight-bytes).",
              registry=registry).set_function(lambda: budget.limit)
        self._ready = Gauge(f"{PREFIX}ready", "1 while readiness (the LossService health status) is SERVING.",
                            registry=registry)
        self._scorer = ScorerCollector()
        registry.register(self._scorer)
        ProcessCollector(registry=registry)
        self._losses = frozenset(losses.names())
        self._series: Dict[Tuple[str, str, str, str], _CallSeries] = {}
        self._http: Optional[WSGIServer] = None
        self._http_thread: Optional[threading.Thread] = None
        self.port: Optional[int] = None

    def call_finished(self, method: str, loss: str, backend: str, code: str, seconds: float, elements: int,
                      request_bytes: int, refused_for: Optional[str] = None) -> None:
        r"""Count a call that ended with status ``code`` after ``seconds``.

        ``loss`` is the name the request gave (mapped to a bounded label here), ``elements`` its
        prediction elements (counted when the call was answered OK), ``request_bytes`` the bytes of
        its messages, ``refused_for`` the :attr:`.errors.ServiceError.reason` it was refused for.
        """
        if loss not in self._losses:
            loss = OTHER_LOSS if loss else NO_LOSS
        key = (method, loss, backend, code)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._bind(*key)
        requests, received, duration, scored = series
        requests.inc()
        received.inc(request_bytes)
        duration.observe(seconds)
        if scored is not None:
            scored.inc(elements)
        if refused_for is not None:
            self._refused[refused_for].inc()

    def _bind(self, method: str, loss: str, backend: str, code: str) -> _CallSeries:
        # Looking children up by their labels costs more than the increments: done once per label set.
        return (
            self._requests.labels(method, loss, backend, code),
            self._request_bytes.labels(method, loss, backend, code),
            self._duration.labels(method, loss),
            self._elements.labels(method, loss, backend) if code == OK else None,
        )

    def serving(self, scorer: "Scorer", variants: Optional["VariantExporter"]) -> None:
        r"""Readiness turned SERVING with ``scorer``; ``variants`` exports the other ONNX graphs."""
        self._scorer.watch(scorer, variants)
        self._ready.set(1)

    def not_serving(self) -> None:
        self._ready.set(0)

    def expose(self, host: str, port: int) -> int:
        r"""Serve ``/metrics`` over HTTP on ``host:port`` (0 picks a free port) from a daemon thread; the bound port."""
        self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        self.port = self._http.server_port
        return self.port

    def close(self) -> None:
        r"""Stop the endpoint and free its port (blocks up to the HTTP server's 0.5 s poll interval)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join()
            self._http = self._http_thread = None


class ScorerCollector(Collector):
    r"""What the scorer holds, read at each scrape: cached runners per backend, ONNX variants still exporting."""

    def __init__(self) -> None:
        self._scorer: Optional["Scorer"] = None
        self._variants: Optional["VariantExporter"] = None

    def watch(self, scorer: "Scorer", variants: Optional["VariantExporter"]) -> None:
        self._scorer, self._variants = scorer, variants

    def collect(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily(f"{PREFIX}runner_cache_entries", "Configured losses kept ready to run.",
                                    labels=("backend",))
        held = GaugeMetricFamily(f"{PREFIX}runner_cache_bytes", "Bytes the cached runners are counted for.",
                                 labels=("backend",))
        scorer = self._scorer
        for name, backend in (scorer.backends.items() if scorer is not None else ()):
            count, size = backend.cache_usage()
            entries.add_metric((name,), count)
            held.add_metric((name,), size)
        pending = GaugeMetricFamily(f"{PREFIX}onnx_variants_pending",
                                    "ONNX graphs of non-default settings still being exported in the background.")
        pending.add_metric((), len(self._variants.pending()) if self._variants is not None else 0)
        yield from (entries, held, pending)
