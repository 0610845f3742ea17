r"""The server as a subprocess started like the README's command: RPCs, health, SIGTERM, bad flags."""
import json
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loss_service import losses
from loss_service.client import LossClient, build_request
from loss_service.server import SERVICE_NAME
from loss_service.server.app import ARRIVAL_MAX_SECONDS
from loss_service.v1 import loss_service_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300  # a cold start exports the TorchScript modules and default ONNX graphs first


class ServerProcess:
    r"""``python -m loss_service serve --port 0 --artifacts DIR``; the port comes from the "listening" log line."""

    def __init__(self, artifacts, *extra):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loss_service", "serve", "--port", "0", "--artifacts", str(artifacts), *extra],
            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        self.lines = []
        self.port = None
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "listening":
                self.port = entry["port"]
                self._listening.set()

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def wait_ready(self):
        assert self._listening.wait(120), "no 'listening' log line:\n" + "".join(self.lines)
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                assert self.process.poll() is None, "server exited:\n" + "".join(self.lines)
                status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                time.sleep(0.2)
        raise AssertionError("readiness never turned SERVING")

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def listening_ports(pid):
    r"""``{(address, port)}`` of the TCP sockets process ``pid`` listens on (Linux ``/proc``); an
    IPv4-mapped IPv6 address (gRPC's dual-stack sockets) as its IPv4 address."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    address, port = local.split(":")
                    packed = bytes.fromhex(address)
                    # The kernel prints each 32-bit word of the address in host (little-endian) order.
                    packed = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
                    ip = ipaddress.ip_address(packed)
                    found.add((str(getattr(ip, "ipv4_mapped", None) or ip), int(port, 16)))
    return found


def _flags(server_artifacts):
    # A folder given explicitly (LOSS_SERVICE_TEST_ARTIFACTS) is used as it is.
    return [] if server_artifacts.export_missing else ["--no-export"]


@pytest.fixture(scope="module")
def served(server_artifacts):
    server = ServerProcess(server_artifacts.folder, *_flags(server_artifacts), "--grace-seconds", "20",
                           "--log-level", "INFO", "--torch-threads", "2")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_every_rpc_against_the_subprocess(served):
    spec = losses.get("focal")
    import torch

    predictions, targets = spec.make_inputs(4, 3, (5,), torch.Generator().manual_seed(0), torch.float32, {})
    with LossClient(served.target, timeout=30) as client:
        names = [info.name for info in client.list_losses()]
        assert names == losses.names()
        result = client.score("focal", predictions.numpy(), targets.numpy(), gamma=2.0, request_id="r-1")
        expected = float(losses.build("focal", gamma=2.0)(predictions, targets))
        assert result.loss == pytest.approx(expected, rel=1e-6)
        assert (result.backend, result.device, result.request_id) == ("eager", "cpu", "r-1")
        streamed = client.score_stream([(predictions[:1], targets[:1]), (predictions[1:], targets[1:])], loss="focal", gamma=2.0)
        assert streamed.loss == pytest.approx(result.loss, rel=1e-6)
    # one structured log line per call
    # Call lines are written in batches within CallLog.FLUSH_SECONDS (0.05 s) of the call.
    deadline = time.monotonic() + 10
    while True:
        calls = [json.loads(line) for line in list(served.lines) if '"event": "call"' in line]
        batch = next((c for c in calls if c["request_id"] == "r-1"), None)
        if batch is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert batch is not None, "no call line for request r-1"
    assert batch["loss"] == "focal" and batch["status"] == "OK" and batch["backend"] == "eager"
    assert batch["elements"] == predictions.numel() and batch["duration_ms"] >= 0 and batch["device"] == "cpu"


def test_torch_threads_flag_sets_the_servers_intra_op_threads(served):
    listening = next(json.loads(line) for line in served.lines if '"event": "listening"' in line)
    assert listening["torch_threads"] == 2


def test_the_server_listens_on_its_grpc_port_only_without_metrics(served):
    listening = next(json.loads(line) for line in served.lines if '"event": "listening"' in line)
    assert "metrics_port" not in listening
    assert listening_ports(served.process.pid) == {("127.0.0.1", served.port)}


def test_sigterm_reports_not_serving_and_finishes_the_call_in_flight(server_artifacts):
    server = ServerProcess(server_artifacts.folder, *_flags(server_artifacts), "--grace-seconds", "20")
    try:
        server.wait_ready()
        channel = grpc.insecure_channel(server.target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        sent_first = threading.Event()

        def batches():
            predictions = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
            targets = (predictions > 0).astype(np.float32)
            yield predictions, targets
            sent_first.set()
            time.sleep(2.0)  # the call is in flight while SIGTERM arrives
            yield predictions, targets

        outcome = {}

        def call():
            with LossClient(server.target, timeout=60) as client:
                outcome["result"] = client.score_stream(batches(), loss="bce_with_logits")

        caller = threading.Thread(target=call)
        caller.start()
        assert sent_first.wait(30)
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        caller.join(60)
        assert outcome["result"].num_batches == 2
        assert server.process.wait(60) == 0
        channel.close()
        assert any('"event": "stopped"' in line for line in server.lines)
        listening = next(json.loads(line) for line in server.lines if '"event": "listening"' in line)
        assert listening["torch_threads"] == os.cpu_count()  # the default
    finally:
        server.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_finishes_every_call_in_flight_and_refuses_new_ones(server_artifacts, signum):
    import torch

    from tests.test_metrics import scrape, series

    server = ServerProcess(server_artifacts.folder, *_flags(server_artifacts), "--grace-seconds", "30",
                           "--metrics-port", "0")
    try:
        server.wait_ready()
        metrics_port = next(json.loads(line) for line in server.lines if '"event": "listening"' in line)["metrics_port"]
        rng = np.random.default_rng(0)
        rows = 2_500_000  # 1e7 elements of (rows, 4) logits
        predictions, targets = rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(0, 4, rows)
        expected = float(losses.build("focal", gamma=2.0)(torch.from_numpy(predictions), torch.from_numpy(targets)))
        half = rows // 2
        signalled = threading.Event()

        def batches():
            yield predictions[:half], targets[:half]
            signalled.wait(60)  # the rest of the call goes on after the signal
            yield predictions[half:], targets[half:]

        outcomes, ended = {}, []

        def stream(index):
            with LossClient(server.target, timeout=300) as client:
                try:
                    outcomes[index] = client.score_stream(batches(), loss="focal", gamma=2.0).loss
                except Exception as error:  # noqa: BLE001 - reported by the assertion below
                    outcomes[index] = error
            ended.append(time.monotonic())

        streams = [threading.Thread(target=stream, args=(index,)) for index in range(16)]
        for thread in streams:
            thread.start()
        deadline = time.monotonic() + 120
        while scrape(metrics_port)[series("loss_service_inflight_requests")] < len(streams):
            assert time.monotonic() < deadline, "the 16 calls never were in flight together"
            time.sleep(0.1)
        with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 256 << 20)]) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                                timeout=300)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            # Unary calls still on their way at the signal: none may be cancelled (those the server
            # has not seen yet get UNAVAILABLE, which a retrying client sends elsewhere).
            body = build_request("focal", predictions, targets, gamma=2.0).SerializeToString()
            unary = [channel.unary_unary(f"/{SERVICE_NAME}/ScoreBatch").future(body, timeout=300) for _ in range(8)]
            time.sleep(0.05)
            server.process.send_signal(signum)
            signalled.set()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Calls on their way are let in for at most ARRIVAL_MAX_SECONDS after readiness turned
            # NOT_SERVING (later than the signal if the event loop was receiving requests); then the
            # server stops listening.
            time.sleep(ARRIVAL_MAX_SECONDS + 2.0)
            with grpc.insecure_channel(server.target) as late:
                with pytest.raises(grpc.RpcError) as refused:
                    late.unary_unary(f"/{SERVICE_NAME}/ListLosses")(pb.ListLossesRequest().SerializeToString(), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            for future in unary:
                try:
                    assert pb.ScoreBatchResponse.FromString(future.result()).loss == pytest.approx(expected, rel=1e-5)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        for thread in streams:
            thread.join(300)
        # Every call in flight at the signal completes, with the value of its whole dataset.
        assert all(outcomes[index] == pytest.approx(expected, rel=1e-5) for index in range(16)), outcomes
        assert server.process.wait(30) == 0
        assert time.monotonic() - max(ended) < 3.0, "the server took longer than 3 s to exit after the last call"
    finally:
        server.stop()


def test_an_explicit_cuda_device_without_a_gpu_fails_at_start():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")  # the fallback logic itself is unit-tested in test_server_units.py
    result = subprocess.run([sys.executable, "-m", "loss_service", "serve", "--port", "0", "--device", "cuda"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr


def test_environment_variables_configure_serve():
    environment = dict(os.environ, LOSS_SERVICE_DEVICE="cuda:3", LOSS_SERVICE_PORT="0")
    result = subprocess.run([sys.executable, "-m", "loss_service", "serve"], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cuda:3" in result.stderr
