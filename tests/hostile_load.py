r"""Load for the event-loop test (tests/test_server_resources.py), run as its own process so that
its threads do not compete with the probing test for one interpreter:

    python -m tests.hostile_load HOST:PORT SECONDS

Four clients send, back to back for SECONDS: 1 MiB and 16 MiB bodies of many tiny fields, a
request with 100,000 labels, and focal requests on the TorchScript backend whose gamma is new each
time (a new hyperparameter set builds a new runner). It prints ``sending`` once every client has
started, and at the end one line: the calls each client made.
"""
import sys
import threading
import time

import grpc
import numpy as np

from loss_service.client import build_request
from loss_service.v1 import loss_service_pb2 as pb

SCORE_BATCH = "/loss_service.v1.LossService/ScoreBatch"


def bodies():
    predictions = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    targets = np.zeros((4, 5), np.int64)
    return {
        "1 MiB of fields": [b"\x40\x01" * (1 << 19)],
        "16 MiB of fields": [b"\x40\x01" * (1 << 23)],
        "100k labels": [pb.ScoreBatchRequest(loss="focal", labels={str(i): "v" for i in range(100_000)})
                        .SerializeToString()],
        "new TorchScript settings": [
            build_request("focal", predictions, targets, backend="torchscript", gamma=float(gamma)).SerializeToString()
            for gamma in np.linspace(0.01, 5.0, 1000)
        ],
    }


def main(target: str, seconds: float) -> None:
    stop = threading.Event()
    counts = {}

    def client(name, payloads):
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            call = channel.unary_unary(SCORE_BATCH)
            sent = 0
            while not stop.is_set():
                try:
                    call(payloads[sent % len(payloads)], timeout=60)
                except grpc.RpcError:
                    pass
                sent += 1
        counts[name] = sent

    threads = [threading.Thread(target=client, args=item) for item in bodies().items()]
    for thread in threads:
        thread.start()
    print("sending", flush=True)
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    print(counts, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
