r"""The transport floor: a ``loss_service.v1.LossService`` that only decodes and sums.

``ScoreBatch`` parses the same ``ScoreBatchRequest`` as the real server, turns ``predictions``,
``targets`` and (if set) ``weights`` into numpy arrays with ``np.frombuffer`` (zero-copy views of
the request's bytes, reshaped to the declared shape) and answers with the sum of their sums in
``loss``. Everything a real server must do -- HTTP/2 framing, protobuf parsing, one pass over the
data -- is here; the loss itself, validation and backend dispatch are not. The real server's
elements/s divided by this server's is therefore the fraction of the transport floor it reaches.

For a fair comparison the bare server runs with the same gRPC message-size options and the same
process-level allocator tuning as the real server (see :func:`main`).

With ``--loss`` it is the *loss floor* instead: after the same decoding it computes the requested
loss with the library's own module (``losses.build(loss, **params)``, built once per configuration;
``statistics`` and ``reductions`` in inference mode) and answers with it -- no validation, no
backend dispatch, no log line. That is the least any server scoring this loss with this library
in Python must do; the real server's rate divided by this one's is the cost of its own work
(validation, dispatch, logging), and this one's divided by the bare rate is the loss's cost.

Run: ``python -m bench.bare_server --port 50052 [--loss]`` (from the repository root).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np
import torch

from loss_service import losses
from loss_service.codec import checked_view, to_tensor
from loss_service.server.config import DEFAULT_MAX_ELEMENTS, ServerConfig, default_torch_threads
from loss_service.server.memory import tune_malloc
from loss_service.server.scoring import REDUCTION_COLUMN, REDUCTIONS, param_value
from loss_service.server.service import IntraOpThreads
from loss_service.v1 import loss_service_pb2 as pb
from loss_service.v1 import loss_service_pb2_grpc


def decode(tensor: pb.Tensor, field: str) -> np.ndarray:
    r"""A read-only numpy view of ``tensor``'s bytes with its declared shape, checked as the real
    server checks it (:func:`loss_service.codec.checked_view`, at its default element limit)."""
    return checked_view(tensor, field, DEFAULT_MAX_ELEMENTS)


def decode_and_sum(request: pb.ScoreBatchRequest) -> pb.ScoreBatchResponse:
    r"""Decode predictions, targets and weights and return the sum of their sums.

    The sum is there so that the data is read once (as any loss must) and cannot be skipped.
    """
    predictions = decode(request.predictions, "predictions")
    total = float(predictions.sum()) + float(decode(request.targets, "targets").sum())
    if request.HasField("weights"):
        total += float(decode(request.weights, "weights").sum())
    return pb.ScoreBatchResponse(
        loss=total,
        num_elements=predictions.size,
        backend="bare",
        device="cpu",
        request_id=request.request_id,
    )


class LossFloor:
    r"""Decode, then compute the request's loss with the library module and nothing else.

    Parameters are read from ``params`` (any kind); modules are cached per ``(loss, params)``.
    Not a server: no input is validated beyond what decoding needs, and a bad request gets
    whatever error the loss library raises. The loss is computed with the real server's thread
    rule (:class:`IntraOpThreads`, one request at a time) and its reduction columns.
    """

    def __init__(self) -> None:
        self._modules: Dict[Tuple, torch.nn.Module] = {}
        self._threads = IntraOpThreads(default_torch_threads())

    def __call__(self, request: pb.ScoreBatchRequest) -> pb.ScoreBatchResponse:
        params = {name: param_value(value) for name, value in request.params.items()}
        key = (request.loss, tuple(sorted(params.items())))
        module = self._modules.get(key)
        if module is None:
            module = self._modules[key] = losses.build(request.loss, **params).eval()
        predictions = to_tensor(request.predictions, "predictions", DEFAULT_MAX_ELEMENTS)
        targets = to_tensor(request.targets, "targets", DEFAULT_MAX_ELEMENTS)
        weights = to_tensor(request.weights, "weights", DEFAULT_MAX_ELEMENTS) if request.HasField("weights") else None
        reductions = self._threads.run(predictions.numel(), _reductions, module, predictions, targets, weights)
        loss = reductions[REDUCTION_COLUMN[REDUCTIONS[request.reduction]]]
        return pb.ScoreBatchResponse(
            loss=loss, num_elements=predictions.numel(), backend="bare+loss", device="cpu", request_id=request.request_id
        )


def _reductions(
    module: torch.nn.Module, predictions: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor]
) -> List[float]:
    r"""``[sum, mean, weighted_mean]`` of the loss, from the module's statistics in inference mode."""
    with torch.inference_mode():
        _, totals, _ = module.statistics(predictions, targets, weights, False, False)
        return module.reductions(totals).tolist()


class BareLossService(loss_service_pb2_grpc.LossServiceServicer):
    r"""``ScoreBatch`` = decode and sum (or decode and score, with ``loss_floor``); the other RPCs
    stay UNIMPLEMENTED (not benchmarked)."""

    def __init__(self, loss_floor: Optional[LossFloor] = None) -> None:
        self._answer = loss_floor or decode_and_sum

    async def ScoreBatch(self, request: pb.ScoreBatchRequest, context: grpc.aio.ServicerContext) -> pb.ScoreBatchResponse:
        try:
            return self._answer(request)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


def message_options(max_message_bytes: int) -> Sequence[Tuple[str, int]]:
    r"""The gRPC channel arguments that lift the message-size limits to ``max_message_bytes``."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


async def start_bare_server(
    address: str, options: Sequence[Tuple[str, int]], loss: bool = False
) -> Tuple[grpc.aio.Server, int]:
    r"""Start a bare server on ``address`` (``host:0`` picks a free port); returns ``(server, port)``.

    ``loss=True`` starts the loss floor (:class:`LossFloor`). Must be awaited inside the event loop
    that will serve it.
    """
    server = grpc.aio.server(options=list(options))
    loss_service_pb2_grpc.add_LossServiceServicer_to_server(BareLossService(LossFloor() if loss else None), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"bare server: could not bind {address}")
    await server.start()
    return server, port


async def _serve(address: str, options: Sequence[Tuple[str, int]], loss: bool) -> None:
    server, port = await start_bare_server(address, options, loss)
    # One line on stdout so a parent process started with port 0 can learn the bound port.
    print(f"bare server listening on port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--loss", action="store_true",
                        help="the loss floor: compute the requested loss with the library after decoding")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The real server's defaults: the same message-size options and the same malloc thresholds.
    tune_malloc()
    asyncio.run(_serve(f"{args.host}:{args.port}", ServerConfig().grpc_options(), args.loss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
