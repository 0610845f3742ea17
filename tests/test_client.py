r"""The Python clients (sync and asyncio): numpy and torch inputs, results, errors, streams,
listing, deadlines and waiting for a server that is not ready yet."""
import asyncio
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch

from loss_service import losses
from loss_service.client import (
    DEFAULT_TIMEOUT_SECONDS,
    AsyncLossClient,
    LossClient,
    LossServiceError,
    StreamRequests,
    build_request,
)
from loss_service.server import BackgroundServer, ServerConfig


@pytest.fixture(scope="module")
def server(server_artifacts):
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), export_missing=server_artifacts.export_missing)
    with BackgroundServer(config, address="127.0.0.1:0") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with LossClient(server.target, timeout=60) as connected:
        yield connected


def logits_and_targets(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 5, generator=generator).to(dtype), (torch.rand(4, 3, 5, generator=generator) > 0.5).to(dtype)


def test_numpy_and_torch_inputs_give_the_same_result(client):
    predictions, targets = logits_and_targets()
    weights = torch.tensor([0.5, 1.0, 2.0, 0.0])
    from_torch = client.score("bce_with_logits", predictions, targets, weights, pos_weight=torch.tensor([1.0, 2.0, 3.0]))
    from_numpy = client.score("bce_with_logits", predictions.numpy(), targets.numpy(), weights.numpy(),
                              pos_weight=np.array([1.0, 2.0, 3.0], np.float32))
    expected = losses.build("bce_with_logits", pos_weight=torch.tensor([1.0, 2.0, 3.0]))(predictions, targets, weights)
    assert from_torch.loss == from_numpy.loss == pytest.approx(float(expected), rel=1e-6)
    assert from_torch.backend == "eager" and from_torch.device == "cpu"


def test_bfloat16_integer_targets_and_vector_params(client):
    predictions, _ = logits_and_targets(torch.bfloat16)
    targets = torch.randint(0, 3, (4, 5), generator=torch.Generator().manual_seed(1))
    result = client.score("focal", predictions, targets.to(torch.uint8), reduction="none", alpha=torch.tensor([0.2, 0.3, 0.5]))
    expected = losses.build("focal", alpha=torch.tensor([0.2, 0.3, 0.5]), reduction="none")(predictions, targets)
    assert result.values.dtype == np.float32 and result.values.shape == (4, 5)
    np.testing.assert_allclose(result.values, expected.float().numpy(), rtol=2e-2, atol=2e-2)
    result.values[0, 0] = 1.0  # results are ordinary writable arrays


def test_scalar_params_of_every_kind(client):
    predictions, _ = logits_and_targets()
    targets = torch.randint(0, 3, (4, 5), generator=torch.Generator().manual_seed(1))
    result = client.score("cross_entropy", predictions, targets, ignore_index=1, label_smoothing=np.float64(0.1),
                          reduction="weighted_mean", return_per_sample=True)
    expected = losses.build("cross_entropy", ignore_index=1, label_smoothing=0.1, reduction="weighted_mean")(predictions, targets)
    assert result.loss == pytest.approx(float(expected), rel=1e-6)
    assert result.per_sample.shape == (4,)


def test_errors_carry_code_details_and_field_violations(client):
    predictions, targets = logits_and_targets()
    with pytest.raises(LossServiceError) as error:
        client.score("focal", predictions, targets, gamma=-2.0)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.field_violations[0][0] == "params.gamma"
    assert "gamma" in error.value.details and "INVALID_ARGUMENT" in str(error.value)


def test_client_side_mistakes_raise_before_sending():
    predictions, targets = logits_and_targets()
    with pytest.raises(ValueError, match="reduction"):
        build_request("mse", predictions, targets, reduction="average")
    with pytest.raises(ValueError, match="backend"):
        build_request("mse", predictions, targets, backend="gpu")
    with pytest.raises(TypeError, match="predictions: cannot send an array of dtype complex64"):
        build_request("mse", np.zeros(2, np.complex64), targets)
    with pytest.raises(TypeError, match="gamma"):
        build_request("focal", predictions, targets, gamma=object())


@pytest.mark.parametrize("targets, message", [
    (None, "targets: required, got None; expected a numpy array or a torch tensor"),
    ([[0, 1], [2]], r"targets: not an array \(setting an array element with a sequence"),
    (np.array([0, None], dtype=object), r"targets: cannot send an array of dtype object \(None values, ragged lists"),
    ("labels.npy", "targets: cannot send an array of dtype <U10"),
], ids=["missing", "ragged", "objects", "a file name"])
def test_unsendable_inputs_say_which_and_why(targets, message):
    predictions, _ = logits_and_targets()
    with pytest.raises(TypeError, match=message):
        build_request("focal", predictions, targets)
    with pytest.raises(TypeError, match="batch 1: " + message):
        list(StreamRequests([(predictions, predictions), (predictions, targets)], "mse", {}))


def test_score_stream_accepts_tuples_and_dicts(client):
    predictions, targets = logits_and_targets()
    whole = client.score("bce_with_logits", predictions, targets, reduction="sum")
    tuples = client.score_stream([(predictions[:1], targets[:1]), (predictions[1:], targets[1:])],
                                 loss="bce_with_logits", reduction="sum")
    dicts = client.score_stream([{"loss": "bce_with_logits", "predictions": predictions[:3], "targets": targets[:3]},
                                 {"predictions": predictions[3:], "targets": targets[3:]}], reduction="sum")
    assert tuples.loss == pytest.approx(whole.loss, rel=1e-6) and dicts.loss == pytest.approx(whole.loss, rel=1e-6)
    assert (tuples.num_batches, tuples.num_elements) == (2, 60)
    with pytest.raises(ValueError, match="loss name"):
        client.score_stream([(predictions, targets)])


def test_list_losses(client):
    infos = client.list_losses()
    assert [i.name for i in infos] == losses.names()
    focal = next(i for i in infos if i.name == "focal")
    gamma = next(p for p in focal.params if p.name == "gamma")
    assert gamma.kind == "float" and gamma.default == losses.get("focal").param("gamma").default
    assert gamma.request_field == "params"
    assert {"eager", "torchscript", "onnx"} == set(focal.backends)


def test_message_size_limits_are_raised_to_the_servers(client):
    # 16 MB of request: over gRPC's 4 MiB default, within the server's (and so the client's) limit.
    predictions = np.ones(2_000_000, np.float32)
    request = build_request("mse", predictions, predictions, reduction="none")
    assert request.ByteSize() > 4 * 1024 * 1024
    result = client.score("mse", predictions, predictions * 2, reduction="none")
    assert result.values.shape == (2_000_000,) and result.loss == pytest.approx(2_000_000.0)


def test_a_timeout_becomes_deadline_exceeded():
    with LossClient("127.0.0.1:9", timeout=0.2) as unreachable:
        with pytest.raises(LossServiceError) as error:
            unreachable.list_losses()
    assert error.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


def test_the_async_client_answers_as_the_sync_one(server, client):
    predictions, targets = logits_and_targets()
    expected = client.score("bce_with_logits", predictions, targets, reduction="none", return_per_sample=True)
    streamed = client.score_stream([(predictions[:1], targets[:1]), (predictions[1:], targets[1:])],
                                   loss="bce_with_logits", reduction="sum")

    async def batches():
        for bounds in ((0, 1), (1, 4)):
            yield predictions[slice(*bounds)].numpy(), targets[slice(*bounds)].numpy()

    async def run():
        async with AsyncLossClient(server.target, timeout=60) as connected:
            result = await connected.score("bce_with_logits", predictions, targets, reduction="none",
                                           return_per_sample=True)
            from_async_batches = await connected.score_stream(batches(), loss="bce_with_logits", reduction="sum")
            from_list = await connected.score_stream([(predictions, targets)], loss="bce_with_logits", reduction="sum")
            names = [info.name for info in await connected.list_losses()]
            with pytest.raises(LossServiceError) as error:
                await connected.score("focal", predictions, targets, gamma=-2.0)
            return result, from_async_batches, from_list, names, error.value

    result, from_async_batches, from_list, names, error = asyncio.run(run())
    assert result.loss == expected.loss and np.array_equal(result.values, expected.values)
    np.testing.assert_array_equal(result.per_sample, expected.per_sample)
    assert from_async_batches.loss == pytest.approx(streamed.loss, rel=1e-12) and from_async_batches.num_batches == 2
    assert from_list.loss == pytest.approx(streamed.loss, rel=1e-6)
    assert names == losses.names()
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field_violations[0][0] == "params.gamma"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deadlines_and_failing_fast_when_nothing_listens():
    address = f"127.0.0.1:{_free_port()}"
    with LossClient(address) as waiting:
        assert waiting.timeout == DEFAULT_TIMEOUT_SECONDS and waiting.wait_for_ready
    predictions, targets = logits_and_targets()
    for wait_for_ready, code in ((False, grpc.StatusCode.UNAVAILABLE), (True, grpc.StatusCode.DEADLINE_EXCEEDED)):
        with LossClient(address, timeout=1.0, wait_for_ready=wait_for_ready) as client:
            start = time.monotonic()
            with pytest.raises(LossServiceError) as error:
                client.score("mse", predictions, targets)
            assert error.value.code == code and time.monotonic() - start < 10


def test_a_call_waits_for_a_server_that_is_still_starting(server_artifacts):
    port = _free_port()
    flags = [] if server_artifacts.export_missing else ["--no-export"]
    process = subprocess.Popen([sys.executable, "-m", "loss_service", "serve", "--port", str(port), "--artifacts",
                                str(server_artifacts.folder), *flags], stderr=subprocess.PIPE, text=True)
    try:
        predictions, targets = logits_and_targets()
        # Sent before the server listens and answered once it is ready (it is UNAVAILABLE while it
        # loads): the client waits for a SERVING readiness status (gRPC health checking).
        with LossClient(f"127.0.0.1:{port}", timeout=300) as client:
            result = client.score("bce_with_logits", predictions, targets)
        expected = losses.build("bce_with_logits")(predictions, targets)
        assert result.loss == pytest.approx(float(expected), rel=1e-6)
    finally:
        process.terminate()
        process.communicate(timeout=60)


def test_the_client_and_the_command_line_load_neither_torch_nor_the_server():
    code = (
        "import sys, numpy as np\n"
        "from loss_service.client import AsyncLossClient, LossClient, build_request\n"
        "from loss_service.codec import to_message, to_numpy\n"
        "from loss_service.__main__ import main\n"
        "request = build_request('focal', np.zeros((2, 3), np.float32), np.zeros(2, np.int64), gamma=2.0)\n"
        "assert to_numpy(request.predictions).shape == (2, 3)\n"
        "try:\n"
        "    main(['score', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "server = sorted(name for name in sys.modules if name.startswith('loss_service.server'))\n"
        "assert not server, f'server modules were imported: {server}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
