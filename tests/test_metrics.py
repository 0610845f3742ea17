r"""The Prometheus endpoint (``--metrics-port``): scraped over HTTP after real calls.

One in-process server with metrics on, small limits (4096 elements per tensor, a 30 kB in-flight
budget) so that refusals are cheap to cause, and every request computed in the worker pool
(``inline_elements=0``) so that a request held at a gate inside the scorer keeps the event loop,
and with it the endpoint's numbers, live. Each test compares scrapes taken before and after its
calls, so the tests do not depend on each other's counts. The command line is tested on a
subprocess, like the README's command.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loss_service.client import build_request
from loss_service.server import SERVICE_NAME, BackgroundServer, ServerConfig
from loss_service.server.errors import REFUSED_FOR_MEMORY, REFUSED_FOR_SIZE
from loss_service.server.memory import RequestBudget
from loss_service.server.metrics import ServerMetrics
from tests.test_server_process import REPO, ServerProcess, _flags, listening_ports
from tests.test_server_resources import gate_scorer

SCORE_BATCH = f"/{SERVICE_NAME}/ScoreBatch"
SCORE_STREAM = f"/{SERVICE_NAME}/ScoreStream"
MAX_ELEMENTS = 4096
INFLIGHT_BYTES = 30_000
# Bounds of the polling loops: a released call ends within this.
SETTLE_SECONDS = 30


@pytest.fixture(scope="module")
def gate():
    with pytest.MonkeyPatch.context() as patch:
        yield gate_scorer(patch)


@pytest.fixture(scope="module")
def server(server_artifacts, gate):
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), export_missing=server_artifacts.export_missing,
                          workers=2, max_elements=MAX_ELEMENTS, max_inflight_bytes=INFLIGHT_BYTES, inline_elements=0,
                          metrics_port=0)
    with BackgroundServer(config, address="127.0.0.1:0") as running:
        try:
            yield running
        finally:
            gate[0].set()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as connected:
        yield connected


def scrape(port):
    r"""``{(sample name, sorted label items): value}`` of one scrape of ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def changes(before, after, *names):
    r"""The samples called one of ``names`` that changed between two scrapes, by how much."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()
            if key[0] in names and value != before.get(key, 0.0)}


# What each call adds to: its counters and the count of the latency histogram.
CALL_SAMPLES = ("loss_service_requests_total", "loss_service_request_bytes_total", "loss_service_scored_elements_total",
                "loss_service_request_duration_seconds_count")


def series(name, **labels):
    return name, tuple(sorted(labels.items()))


def calls(method, loss, backend, code):
    return series("loss_service_requests_total", method=method, loss=loss, backend=backend, code=code)


def received(method, loss, backend, code):
    return series("loss_service_request_bytes_total", method=method, loss=loss, backend=backend, code=code)


def durations(method, loss):
    return series("loss_service_request_duration_seconds_count", method=method, loss=loss)


def focal(batch=8, classes=4, seed=0, **options):
    rng = np.random.default_rng(seed)
    return build_request("focal", rng.normal(size=(batch, classes)).astype(np.float32), rng.integers(0, classes, batch),
                         gamma=2.0, **options)


def refused_code(call, body):
    with pytest.raises(grpc.RpcError) as error:
        call(body, timeout=30)
    return error.value.code()


def test_calls_are_counted_by_method_loss_backend_and_status(server, channel):
    port = server.server.metrics.port
    score = channel.unary_unary(SCORE_BATCH)
    ok, on_onnx = focal().SerializeToString(), focal(backend="onnx").SerializeToString()
    wrong_shape = build_request("focal", np.zeros((8, 4), np.float32), np.zeros((8, 2), np.int64)).SerializeToString()
    before = scrape(port)
    for body in (ok, ok, on_onnx):
        score(body, timeout=30)
    assert refused_code(score, wrong_shape) == grpc.StatusCode.INVALID_ARGUMENT
    assert changes(before, scrape(port), *CALL_SAMPLES) == {
        calls("ScoreBatch", "focal", "eager", "OK"): 2,
        calls("ScoreBatch", "focal", "onnx", "OK"): 1,
        calls("ScoreBatch", "focal", "", "INVALID_ARGUMENT"): 1,
        received("ScoreBatch", "focal", "eager", "OK"): 2 * len(ok),
        received("ScoreBatch", "focal", "onnx", "OK"): len(on_onnx),
        received("ScoreBatch", "focal", "", "INVALID_ARGUMENT"): len(wrong_shape),
        # Elements are counted for the calls answered OK only.
        series("loss_service_scored_elements_total", method="ScoreBatch", loss="focal", backend="eager"): 64,
        series("loss_service_scored_elements_total", method="ScoreBatch", loss="focal", backend="onnx"): 32,
        durations("ScoreBatch", "focal"): 4,
    }


def test_a_stream_is_one_call_with_the_bytes_and_elements_of_its_batches(server, channel):
    port = server.server.metrics.port
    batches = [focal(batch=8, seed=1).SerializeToString(), focal(batch=5, seed=2, reduction=None).SerializeToString()]
    before = scrape(port)
    channel.stream_unary(SCORE_STREAM)(iter(batches), timeout=30)
    assert changes(before, scrape(port), *CALL_SAMPLES) == {
        calls("ScoreStream", "focal", "eager", "OK"): 1,
        received("ScoreStream", "focal", "eager", "OK"): sum(map(len, batches)),
        series("loss_service_scored_elements_total", method="ScoreStream", loss="focal", backend="eager"): 13 * 4,
        durations("ScoreStream", "focal"): 1,
    }


def test_loss_labels_are_bounded_whatever_clients_send(server, channel):
    port = server.server.metrics.port
    score = channel.unary_unary(SCORE_BATCH)
    values = np.zeros(4, np.float32)
    unknown = [build_request(name, values, values).SerializeToString()
               for name in ("no_such_loss", "x" * 10_000, "f\u00f6cal", "focal\n")]
    before = scrape(port)
    for body in unknown:
        assert refused_code(score, body) == grpc.StatusCode.INVALID_ARGUMENT
    assert refused_code(score, b"\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT  # not a request: no loss named
    assert changes(before, scrape(port), "loss_service_requests_total") == {
        calls("ScoreBatch", "other", "", "INVALID_ARGUMENT"): len(unknown),
        calls("ScoreBatch", "none", "", "INVALID_ARGUMENT"): 1,
    }


def test_refusals_for_size_and_for_memory_are_counted_apart(server, channel):
    port = server.server.metrics.port
    score = channel.unary_unary(SCORE_BATCH)
    small = np.zeros(8, np.float32)
    over_limit = build_request("mse", small, small)
    over_limit.predictions.shape[:] = [MAX_ELEMENTS + 1]  # refused for its shape, before its data is read
    values = np.zeros(4000, np.float32)
    over_budget = build_request("mse", values, values).SerializeToString()  # 32 kB, more than the whole budget
    assert len(over_budget) > INFLIGHT_BYTES
    before = scrape(port)
    assert refused_code(score, over_limit.SerializeToString()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused_code(score, over_budget) == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = scrape(port)
    assert changes(before, after, "loss_service_requests_refused_total") == {
        series("loss_service_requests_refused_total", reason=REFUSED_FOR_SIZE): 1,
        series("loss_service_requests_refused_total", reason=REFUSED_FOR_MEMORY): 1,
    }
    assert changes(before, after, "loss_service_requests_total", "loss_service_request_bytes_total") == {
        calls("ScoreBatch", "mse", "", "RESOURCE_EXHAUSTED"): 1,
        received("ScoreBatch", "mse", "", "RESOURCE_EXHAUSTED"): len(over_limit.SerializeToString()),
        # The budget refuses a body before reading it: the call never named its loss.
        calls("ScoreBatch", "none", "", "RESOURCE_EXHAUSTED"): 1,
        received("ScoreBatch", "none", "", "RESOURCE_EXHAUSTED"): len(over_budget),
    }


def test_requests_in_flight_and_their_bytes_while_a_call_is_held(server, channel, gate):
    opened, entered = gate
    port = server.server.metrics.port
    body = focal(request_id="hold").SerializeToString()
    before = scrape(port)
    assert before[series("loss_service_inflight_requests")] == 0
    assert before[series("loss_service_inflight_request_bytes")] == 0
    assert before[series("loss_service_inflight_budget_bytes")] == INFLIGHT_BYTES
    # The client gives up after its deadline; the server still computes the request (it holds its
    # memory) until the gate opens, and counts the call when its work has ended.
    with pytest.raises(grpc.RpcError) as error:
        channel.unary_unary(SCORE_BATCH)(body, timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert entered.is_set()
    held = scrape(port)
    assert held[series("loss_service_inflight_requests")] == 1
    assert held[series("loss_service_inflight_request_bytes")] == len(body)
    opened.set()
    deadline = time.monotonic() + SETTLE_SECONDS
    while (after := scrape(port))[series("loss_service_inflight_requests")] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after[series("loss_service_inflight_requests")] == 0
    assert after[series("loss_service_inflight_request_bytes")] == 0
    assert changes(before, after, "loss_service_requests_total") == {calls("ScoreBatch", "focal", "", "DEADLINE_EXCEEDED"): 1}


def test_readiness_process_memory_and_the_runner_caches(server):
    metrics = scrape(server.server.metrics.port)
    assert metrics[series("loss_service_ready")] == 1
    assert metrics[series("process_resident_memory_bytes")] > 0
    assert metrics[series("loss_service_runner_cache_entries", backend="eager")] >= 1
    assert metrics[series("loss_service_runner_cache_bytes", backend="eager")] > 0
    assert metrics[series("loss_service_onnx_variants_pending")] >= 0


def test_each_server_has_its_own_registry():
    first, second = ServerMetrics(RequestBudget(100), lambda: 1), ServerMetrics(RequestBudget(200), lambda: 2)
    first.call_finished("ScoreBatch", "mse", "eager", "OK", 0.001, 10, 50)
    assert first.registry.get_sample_value("loss_service_requests_total", {
        "method": "ScoreBatch", "loss": "mse", "backend": "eager", "code": "OK"}) == 1
    assert second.registry.get_sample_value("loss_service_requests_total", {
        "method": "ScoreBatch", "loss": "mse", "backend": "eager", "code": "OK"}) is None
    assert second.registry.get_sample_value("loss_service_inflight_budget_bytes") == 200
    assert [metrics.registry.get_sample_value("loss_service_inflight_requests") for metrics in (first, second)] == [1, 2]


def test_the_command_line_opens_the_endpoint_on_loopback(server_artifacts):
    served = ServerProcess(server_artifacts.folder, *_flags(server_artifacts), "--metrics-port", "0")
    try:
        served.wait_ready()
        listening = next(json.loads(line) for line in served.lines if '"event": "listening"' in line)
        assert listening["metrics_host"] == "127.0.0.1"
        port = listening["metrics_port"]
        assert listening_ports(served.process.pid) == {("127.0.0.1", served.port), ("127.0.0.1", port)}
        metrics = scrape(port)
        assert metrics[series("loss_service_ready")] == 1
        assert metrics[series("process_resident_memory_bytes")] > 0
    finally:
        served.stop()


def test_an_environment_variable_sets_the_metrics_port():
    environment = dict(os.environ, LOSS_SERVICE_METRICS_PORT="70000")
    result = subprocess.run([sys.executable, "-m", "loss_service", "serve", "--port", "0"], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "metrics_port must be in [0, 65535], got 70000" in result.stderr
