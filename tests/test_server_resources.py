r"""What a request costs the server, and what it leaves behind: memory returned after refused and
huge requests, the in-flight budget, and an event loop that keeps answering under hostile load.

The memory and event-loop tests run the server as a subprocess, like the README's command (its
RSS is then its own, and the probing test does not share its interpreter); the budget tests use an
in-process server whose scorer is held at a gate, so "in flight" is exact rather than timed.
"""
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loss_service import losses
from loss_service.client import LossClient, LossServiceError, build_request
from loss_service.server import SERVICE_NAME, BackgroundServer, ServerConfig
from loss_service.server.app import IDLE_TRIM_SECONDS
from loss_service.server.scoring import Scorer
from tests.test_server_process import REPO, ServerProcess, _flags

MB = 1024 * 1024
SCORE_BATCH = f"/{SERVICE_NAME}/ScoreBatch"
# The bounds: RSS back within these of where it started.
REFUSED_RSS_MARGIN = 200 * MB
LARGE_RSS_MARGIN = 300 * MB
# Health checks and small calls must be answered within this while hostile requests are processed
# (19 calls in 20; the slowest within STALL_SECONDS). A loop blocked by hostile work stalls for
# seconds (a 16 MB protobuf map parse takes 38 s); on 2 cores shared with 8 hostile senders, one
# scheduler hiccup of the test's own process can pass 0.1 s now and then (seen once: 102 ms).
RESPONSIVE_SECONDS = 0.1
RESPONSIVE_FRACTION = 0.95
STALL_SECONDS = 0.5


@pytest.fixture(scope="module")
def served(server_artifacts):
    server = ServerProcess(server_artifacts.folder, *_flags(server_artifacts))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def settled_rss(pid, limit, seconds=20):
    r"""RSS once it is at most ``limit`` (the server gives memory back once idle for IDLE_TRIM_SECONDS),
    or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        current = rss(pid)
        if current <= limit or time.monotonic() > deadline:
            return current
        time.sleep(0.25)


def raw_channel(target):
    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 512 * MB),
                                                  ("grpc.max_receive_message_length", 512 * MB)])


def baseline_rss(served, channel):
    r"""RSS after a warm-up that takes the worker-pool path (a 2 MB request) and a rest."""
    rng = np.random.default_rng(0)
    warm = build_request("cross_entropy", rng.normal(size=(20_000, 3, 5)).astype(np.float32),
                         rng.integers(0, 3, (20_000, 5)))
    channel.unary_unary(SCORE_BATCH)(warm.SerializeToString(), timeout=60)
    time.sleep(IDLE_TRIM_SECONDS + 1.0)
    return min(rss(served.process.pid) for _ in range(3))


def test_refused_requests_leave_no_memory_behind(served):
    with raw_channel(served.target) as channel:
        start = baseline_rss(served, channel)
        rng = np.random.default_rng(1)
        # 80 MB of class weights for 3 classes: parsed, decoded, refused (INVALID_ARGUMENT).
        body = build_request("cross_entropy", rng.normal(size=(4, 3, 5)).astype(np.float32),
                             rng.integers(0, 3, (4, 5)), class_weights=np.ones(20_000_000, np.float32)).SerializeToString()
        call = channel.unary_unary(SCORE_BATCH)
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as error:
                call(body, timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "class_weights" in error.value.details()
        after = settled_rss(served.process.pid, start + REFUSED_RSS_MARGIN)
    assert after <= start + REFUSED_RSS_MARGIN, f"RSS {start / MB:.0f} MB -> {after / MB:.0f} MB"


def test_a_256_mib_request_gives_its_memory_back(served):
    with raw_channel(served.target) as channel:
        start = baseline_rss(served, channel)
        elements = 32_000_000  # predictions + targets: 256 MB of float32, under the default 256 MiB limit
        predictions = np.ones(elements, np.float32)
        body = build_request("mse", predictions, np.zeros(elements, np.float32)).SerializeToString()
        del predictions
        answer = channel.unary_unary(SCORE_BATCH)(body, timeout=300)
        del body
        from loss_service.v1 import loss_service_pb2 as pb

        assert pb.ScoreBatchResponse.FromString(answer).loss == pytest.approx(1.0)
        after = settled_rss(served.process.pid, start + LARGE_RSS_MARGIN)
    assert after <= start + LARGE_RSS_MARGIN, f"RSS {start / MB:.0f} MB -> {after / MB:.0f} MB"


def test_the_event_loop_answers_while_hostile_requests_are_processed(served):
    rng = np.random.default_rng(2)
    predictions = rng.normal(size=(250, 4)).astype(np.float32)
    targets = rng.integers(0, 4, 250)
    small = build_request("focal", predictions, targets, gamma=2.0).SerializeToString()
    expected = float(losses.build("focal", gamma=2.0)(*map(__import__("torch").from_numpy, (predictions, targets))))
    load = subprocess.Popen([sys.executable, "-m", "tests.hostile_load", served.target, "8"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout.readline().strip() == "sending"
        with grpc.insecure_channel(served.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            score = channel.unary_unary(SCORE_BATCH)
            from loss_service.v1 import loss_service_pb2 as pb

            seconds = {"health": [], "ScoreBatch": []}
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                start = time.perf_counter()
                status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
                seconds["health"].append(time.perf_counter() - start)
                assert status == health_pb2.HealthCheckResponse.SERVING
                start = time.perf_counter()
                loss = pb.ScoreBatchResponse.FromString(score(small, timeout=10)).loss
                seconds["ScoreBatch"].append(time.perf_counter() - start)
                assert loss == pytest.approx(expected, rel=1e-6)
                time.sleep(0.02)
        counts = load.communicate(timeout=120)[0]
    finally:
        load.kill()
    assert load.returncode == 0 and "new TorchScript settings" in counts, counts
    for call, times in seconds.items():
        times.sort()
        summary = (call, f"median {times[len(times) // 2]:.3f} s, slowest {times[-5:]}", counts)
        assert len(times) >= 20, summary
        assert times[int(RESPONSIVE_FRACTION * len(times)) - 1] < RESPONSIVE_SECONDS, summary
        assert times[-1] < STALL_SECONDS, summary


# -- the in-flight budget -----------------------------------------------------------------------

def gate_scorer(patch):
    r"""Make requests with request_id "hold" wait at a gate inside the scorer (patched with ``patch``):
    ``(gate, entered)``, two events. Set the gate before the server stops: stopping waits for the
    work of a held call."""
    gate, entered = threading.Event(), threading.Event()
    score_batch = Scorer.score_batch

    def held(self, parsed, plan):
        if parsed.message.request_id == "hold":
            entered.set()
            gate.wait(60)
        return score_batch(self, parsed, plan)

    patch.setattr(Scorer, "score_batch", held)
    return gate, entered


@pytest.fixture
def gated_server(server_artifacts, monkeypatch):
    r"""A server whose requests with request_id "hold" wait at a gate inside the scorer, and whose
    in-flight budget is 3 MB."""
    gate, entered = gate_scorer(monkeypatch)
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), export_missing=server_artifacts.export_missing,
                          workers=2, max_inflight_bytes=3_000_000)
    with BackgroundServer(config, address="127.0.0.1:0") as server:
        try:
            yield server, gate, entered
        finally:
            gate.set()


def _mse(elements, **options):
    values = np.linspace(0, 1, elements, dtype=np.float32)
    return build_request("mse", values, values[::-1].copy(), **options)


def test_requests_over_the_inflight_budget_are_refused_at_once(gated_server):
    server, gate, entered = gated_server
    budget = server.server.budget
    held = _mse(250_000, request_id="hold")  # 2 MB: computed in the worker pool, held at the gate
    outcome = {}
    with LossClient(server.target, timeout=60) as client:
        caller = threading.Thread(target=lambda: outcome.setdefault("held", client.score_request(held)))
        caller.start()
        assert entered.wait(30)
        assert budget.in_use == held.ByteSize()
        for request, what in ((_mse(250_000), "would exceed"), (_mse(400_000), "exceed the server's")):
            start = time.perf_counter()
            with pytest.raises(LossServiceError) as error:
                client.score_request(request)
            assert time.perf_counter() - start < 1.0
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert what in error.value.details and "3000000 bytes" in error.value.details
        assert client.score_request(_mse(1000)).loss > 0  # a small request still fits
        gate.set()
        caller.join(60)
    assert outcome["held"].loss > 0
    assert budget.in_use == 0


def test_a_cancelled_call_holds_its_budget_until_its_work_ends(gated_server):
    server, gate, entered = gated_server
    budget = server.server.budget
    held = _mse(250_000, request_id="hold")
    with LossClient(server.target, timeout=0.5) as client:
        with pytest.raises(LossServiceError) as error:
            client.score_request(held)
        assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert entered.is_set()
    # The client is gone, but its request is still being computed: its memory is still in use.
    assert budget.in_use == held.ByteSize()
    gate.set()
    deadline = time.monotonic() + 30
    while budget.in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert budget.in_use == 0
