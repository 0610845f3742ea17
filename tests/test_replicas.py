r"""Replicas behind client-side balancing: ``LossClient`` with several addresses balances every call
round-robin and retries, through gRPC's own retry policy, the calls a replica could not take.

Three servers run as subprocesses; 2,000 calls from four threads go on while one server is killed
with SIGKILL and restarted on its port: no call fails, every answer is right, every server gets
calls, the restarted one too.
"""
import json
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch

from loss_service import losses
from loss_service.client import LossClient, channel_target
from tests.test_server_process import ServerProcess, _flags

CALLS = 2000
THREADS = 4


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def calls_seen(server):
    return sum('"event": "call"' in line and '"status": "OK"' in line for line in list(server.lines))


def start(artifacts, port):
    server = ServerProcess(artifacts.folder, *_flags(artifacts), "--port", str(port), "--workers", "1",
                           "--torch-threads", "1")
    server.wait_ready()
    return server


def test_several_addresses_become_one_balanced_target():
    assert channel_target("127.0.0.1:1") == "127.0.0.1:1"
    assert channel_target("dns:///loss-service:50051") == "dns:///loss-service:50051"
    assert channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    for bad, text in ((["loss-service:1", "127.0.0.1:2"], "dns:///name:port"), ([], "at least one"),
                      (["127.0.0.1:1", "[::1]:2"], "not both"), (["127.0.0.1"], "no port")):
        with pytest.raises(ValueError, match=text):
            channel_target(bad)


def test_calls_survive_a_replica_killed_and_restarted(server_artifacts):
    ports = [free_port() for _ in range(3)]
    servers = [None] * 3
    starting = [threading.Thread(target=lambda i=i: servers.__setitem__(i, start(server_artifacts, ports[i])))
                for i in range(3)]
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join(300)
    restarted = None
    try:
        assert all(servers), "a replica did not start"
        spec = losses.get("focal")
        predictions, targets = spec.make_inputs(8, 4, (5,), torch.Generator().manual_seed(0), torch.float32, {})
        expected = float(losses.build("focal", gamma=2.0)(predictions, targets))
        predictions, targets = predictions.numpy(), targets.numpy()
        done, failures, wrong = [0], [], []
        lock = threading.Lock()
        with LossClient([f"127.0.0.1:{port}" for port in ports], timeout=30) as client:

            def send(count):
                for _ in range(count):
                    try:
                        loss = client.score("focal", predictions, targets, gamma=2.0).loss
                    except Exception as error:  # noqa: BLE001 - every failure is reported below
                        with lock:
                            failures.append(repr(error))
                        continue
                    with lock:
                        done[0] += 1
                        if abs(loss - expected) > 1e-6 * abs(expected):
                            wrong.append(loss)

            senders = [threading.Thread(target=send, args=(CALLS // THREADS,)) for _ in range(THREADS)]
            for thread in senders:
                thread.start()
            while done[0] < CALLS // 4 and any(thread.is_alive() for thread in senders):
                time.sleep(0.01)
            before = [calls_seen(server) for server in servers]
            servers[1].process.send_signal(signal.SIGKILL)  # calls in flight on it fail over to the others
            servers[1].process.wait(30)
            restarted = start(server_artifacts, ports[1])
            for thread in senders:
                thread.join(300)
            # The restarted replica is back in the rotation (gRPC reconnects within its backoff).
            deadline = time.monotonic() + 30
            while not calls_seen(restarted) and time.monotonic() < deadline:
                client.score("focal", predictions, targets, gamma=2.0)
        assert failures == [], f"{len(failures)} calls failed, e.g. {failures[:3]}"
        assert wrong == [] and done[0] == CALLS
        assert min(before) >= CALLS // 4 // 3 // 2, f"calls per replica before the kill: {before}"
        assert calls_seen(restarted) > 0, "the restarted replica got no calls"
    finally:
        for server in servers + [restarted]:
            if server is not None:
                server.stop()
