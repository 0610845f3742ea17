r"""Peak memory of one request, per byte of its body: what sizes the server's in-flight budget.

Usage (from the repository root, venv active)::

    python bench/bench_memory.py                    # every workload at 1e7 elements, ~1 minute
    python bench/bench_memory.py --elements 1e6 --workloads focal dice-multiclass

For each workload a fresh server (``python -m loss_service serve``, eager backend unless the
workload names another) answers one request; the figure is the growth of the server's peak RSS
(``VmHWM`` in ``/proc``) over its RSS before the request, divided by the body's size. It includes
everything the request costs: gRPC's receive buffer, the body gRPC hands over, decoding, the
loss's temporaries and the response. ``--max-inflight-bytes`` defaults to half the machine's
memory over :data:`loss_service.server.config.REQUEST_MEMORY_FACTOR`, which must be at least the
largest factor printed here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import grpc
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_score import MAX_MESSAGE_BYTES, SCORE_BATCH, ServerProcess  # noqa: E402
from bench.bare_server import message_options  # noqa: E402
from loss_service.client import build_request  # noqa: E402
from loss_service.server.config import REQUEST_MEMORY_FACTOR  # noqa: E402
from loss_service.v1 import loss_service_pb2 as pb  # noqa: E402

SERVER_COMMAND = "{python} -m loss_service serve --host 127.0.0.1 --port {port} --artifacts {artifacts}"
# Images of 64 x 64 for the region losses; 4 classes everywhere.
SIDE, CLASSES = 64, 4


def workloads(elements: int, rng: np.random.Generator) -> Dict[str, Callable[[], pb.ScoreBatchRequest]]:
    rows = elements // CLASSES
    images = max(1, elements // (CLASSES * SIDE * SIDE))

    def logits(*shape, dtype=np.float32):
        return rng.normal(size=shape).astype(dtype)

    return {
        "mse": lambda: build_request("mse", logits(elements), logits(elements)),
        "bce_with_logits+w": lambda: build_request("bce_with_logits", logits(rows, CLASSES),
                                                   (rng.random((rows, CLASSES)) < 0.3).astype(np.float32),
                                                   rng.random((rows, CLASSES)).astype(np.float32)),
        "focal": lambda: build_request("focal", logits(rows, CLASSES), rng.integers(0, CLASSES, rows), gamma=2.0),
        "focal none+per_sample": lambda: build_request("focal", logits(rows, CLASSES), rng.integers(0, CLASSES, rows),
                                                       gamma=2.0, reduction="none", return_per_sample=True),
        "cross_entropy float16": lambda: build_request("cross_entropy", logits(rows, CLASSES, dtype=np.float16),
                                                       rng.integers(0, CLASSES, rows).astype(np.uint8)),
        "dice-multiclass": lambda: build_request("dice", logits(images, CLASSES, SIDE, SIDE),
                                                 rng.integers(0, CLASSES, (images, SIDE, SIDE)), mode="multiclass"),
        "dice onnx": lambda: build_request("dice", logits(images * CLASSES, 1, SIDE, SIDE),
                                           (rng.random((images * CLASSES, 1, SIDE, SIDE)) < 0.3).astype(np.float32),
                                           backend="onnx"),
    }


def process_status(pid: int, key: str) -> int:
    r"""A ``/proc/<pid>/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(name: str, request: pb.ScoreBatchRequest, artifacts: str) -> Tuple[float, int]:
    r"""Peak extra RSS of a fresh server answering ``request`` over the request's size, and that size."""
    body = request.SerializeToString()
    ready = build_request("mse", np.ones(4, np.float32), np.ones(4, np.float32)).SerializeToString()
    with ServerProcess(name, SERVER_COMMAND.replace("{artifacts}", artifacts), ready, 600.0) as server:
        with grpc.insecure_channel(server.address, options=message_options(MAX_MESSAGE_BYTES)) as channel:
            time.sleep(1.5)  # past the start-up trim
            before = process_status(server.process.pid, "VmRSS")
            channel.unary_unary(SCORE_BATCH)(body, timeout=300)
            peak = process_status(server.process.pid, "VmHWM")
    return (peak - before) / len(body), len(body)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=float, default=1e7, help="prediction elements per request (default 1e7)")
    parser.add_argument("--artifacts", default="artifacts", help="the server's --artifacts folder (default artifacts)")
    parser.add_argument("--workloads", nargs="+", help="a subset of the workloads (default: all)")
    args = parser.parse_args(argv)
    elements = int(args.elements)
    available = workloads(elements, np.random.default_rng(0))
    chosen = args.workloads or list(available)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(available)}")
    print(f"| workload ({elements:.0e} elements) | body MB | peak extra MB | per body byte |")
    print("|---|---|---|---|")
    factors = {}
    for name in chosen:
        factor, size = measure(name, available[name](), args.artifacts)
        factors[name] = factor
        print(f"| {name} | {size / 1e6:.0f} | {factor * size / 1e6:.0f} | {factor:.2f} |", flush=True)
    print(f"largest: {max(factors.values()):.2f} (REQUEST_MEMORY_FACTOR = {REQUEST_MEMORY_FACTOR})")
    return factors


if __name__ == "__main__":
    main()
