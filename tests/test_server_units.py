r"""Server pieces without a server: device selection, settings, tensor codec, error mapping, malloc."""
import asyncio
import io
import json
import logging
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
import torch

from loss_service.codec import TensorError, to_message, to_numpy
from loss_service.server import ConfigError, logs, ServerConfig, select_device, tune_malloc
from loss_service.server.backends import RUNNER_BYTES, RunnerCache, config_key
from loss_service.server.memory import RequestBudget
from loss_service.server.config import provider_device
from loss_service.server.errors import (REFUSED_FOR_MEMORY, REFUSED_FOR_SIZE, ServiceError, from_library_message,
                                        library_value_error, too_large)
from loss_service.server.scoring import decode
from loss_service.server.wire import parse_request
from loss_service.v1 import loss_service_pb2 as pb

# The torch dtype of the tensor each wire dtype decodes to (the protocol's contract, spelled out).
TORCH_DTYPES = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT16: torch.int16,
    pb.DTYPE_INT8: torch.int8,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_BOOL: torch.bool,
}


@pytest.mark.parametrize(
    "requested,available,count,expected",
    [
        ("auto", False, 0, "cpu"),
        ("auto", True, 2, "cuda:0"),
        ("cpu", True, 1, "cpu"),
        ("cuda", True, 1, "cuda:0"),
        ("cuda:1", True, 2, "cuda:1"),
    ],
)
def test_select_device(requested, available, count, expected):
    assert select_device(requested, available, count) == expected


@pytest.mark.parametrize("requested,available,count,text", [
    ("cuda", False, 0, "no CUDA device"),
    ("cuda:0", False, 0, "no CUDA device"),
    ("cuda:2", True, 2, "sees 2 CUDA device"),
    ("tpu", True, 1, "auto, cpu, cuda or cuda:N"),
])
def test_an_explicit_device_that_cannot_be_honoured_is_a_start_error(requested, available, count, text):
    with pytest.raises(ConfigError, match=text):
        select_device(requested, available, count)


def test_this_machine_falls_back_to_cpu_only_for_auto():
    assert select_device("auto", torch.cuda.is_available(), torch.cuda.device_count()) in ("cpu", "cuda:0")


def test_onnx_backend_provider_selection_without_a_gpu():
    from loss_service.server.backends import OnnxBackend

    # The GPU wheel lists CUDAExecutionProvider on this CPU-only machine: it must not be used for cpu.
    backend = OnnxBackend("cpu", {}, available_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert backend.providers == ["CPUExecutionProvider"]
    assert provider_device("CPUExecutionProvider", "cuda:1") == "cpu"
    assert provider_device("CUDAExecutionProvider", "cuda:1") == "cuda:1"


@pytest.mark.parametrize("field,value,text", [
    ("backend", "fast", "backend must be one of"),
    ("device", "gpu", "device must be"),
    ("port", 70000, "port"),
    ("metrics_port", -1, "metrics_port must be in"),
    ("max_elements", 0, "max_elements"),
    ("workers", 0, "workers"),
    ("grace_seconds", -1.0, "grace_seconds"),
])
def test_server_config_rejects_bad_settings(field, value, text):
    with pytest.raises(ConfigError, match=text):
        ServerConfig(**{field: value})


def test_server_config_defaults_and_options():
    config = ServerConfig()
    assert (config.host, config.port, config.backend, config.device) == ("127.0.0.1", 50051, "auto", "auto")
    assert config.default_backend() == "eager"
    assert ServerConfig(backend="onnx").default_backend() == "onnx"
    assert ("grpc.max_receive_message_length", config.max_message_bytes) in config.grpc_options()
    assert ServerConfig(host="::1", port=5).address == "[::1]:5"
    assert (config.metrics_port, config.metrics_host) == (None, "127.0.0.1")  # metrics off, loopback when on


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()))
def test_codec_round_trips_every_wire_dtype(dtype):
    source = (torch.arange(24) % 7).reshape(2, 3, 4).to(dtype)
    message = to_message(source)
    decoded = decode(message, "predictions", max_elements=100)
    assert decoded.dtype == dtype and decoded.shape == source.shape
    assert torch.equal(decoded, source)
    # What a client reads back: the same values in numpy (bfloat16 as float32).
    np.testing.assert_array_equal(to_numpy(message), source.float().numpy() if dtype == torch.bfloat16 else source.numpy())


def test_codec_scalars_empty_tensors_and_numpy():
    assert decode(to_message(np.float32(2.5)), "x", 10).item() == 2.5
    assert list(to_message(np.float32(2.5)).shape) == [] and to_numpy(to_message(np.float32(2.5))).shape == ()
    empty = decode(to_message(np.zeros((0, 3), np.float64)), "x", 10)
    assert empty.shape == (0, 3)
    big_endian = np.arange(4, dtype=">f4")
    np.testing.assert_array_equal(to_numpy(to_message(big_endian)), big_endian.astype("<f4"))
    assert to_numpy(to_message(torch.ones(2, dtype=torch.bfloat16))).dtype == np.float32
    with pytest.raises(TypeError, match="targets: cannot send an array of dtype object"):
        to_message(np.array([None, 1]), "targets")


@pytest.mark.parametrize("tensor,field,code", [
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "x.dtype", grpc.StatusCode.INVALID_ARGUMENT),
    (pb.Tensor(dtype=77, shape=[1], data=b"\0" * 4), "x.dtype", grpc.StatusCode.INVALID_ARGUMENT),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, -1], data=b""), "x.shape", grpc.StatusCode.INVALID_ARGUMENT),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"\0" * 8), "x.data", grpc.StatusCode.INVALID_ARGUMENT),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[11], data=b"\0" * 44), "x.shape", grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_decode_errors_name_the_field(tensor, field, code):
    with pytest.raises(ServiceError) as error:
        decode(tensor, "x", max_elements=10)
    assert error.value.code == code
    assert [f for f, _ in error.value.violations] == [field]
    assert error.value.reason == (REFUSED_FOR_SIZE if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None)


def test_a_client_reads_results_with_the_same_checks():
    with pytest.raises(TensorError, match=r"values\.data: has 4 bytes; expected 12") as error:
        to_numpy(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"\0" * 4), "values")
    assert error.value.field == "values.data" and not error.value.too_large
    with pytest.raises(TensorError, match=r"values\.dtype: unsupported dtype 77"):
        to_numpy(pb.Tensor(dtype=77, shape=[1], data=b"\0" * 4), "values")


def test_decoding_leaves_the_warnings_filters_alone_and_warns_nothing():
    # A fresh process: torch warns about a read-only array once per process, at its first one.
    code = textwrap.dedent("""
        import warnings, numpy, torch
        before = list(warnings.filters)
        from loss_service.codec import to_message
        from loss_service.server import app, service
        from loss_service.server.scoring import decode
        assert warnings.filters == before, "importing the server installed a warnings filter"
        warnings.simplefilter("error")
        for _ in range(2):
            decode(to_message(numpy.zeros(3, numpy.float32)), "x", 10)
        assert len(warnings.filters) == len(before) + 1
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_library_messages_map_to_the_field_they_name():
    fields = [("class_weight", "class_weights"), ("pos_weight", "pos_weight"), ("gamma", "params.gamma"),
              ("predictions", "predictions"), ("targets", "targets"), ("weights", "weights")]
    cases = {
        "targets must have the shape of predictions: predictions [2] vs targets [3]": "targets",
        "class_weight must have one entry per class: expected 3": "class_weights",
        "weights of shape [7, 2] cannot be applied to the loss's elementwise shape [4]": "weights",
        "bce: predictions must be probabilities in [0, 1]": "predictions",
        "something unexpected": "request",
    }
    for message, field in cases.items():
        error = from_library_message(message, fields, "request")
        assert error.violations == [(field, message)], message
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_value_errors_raised_inside_torchscript_are_recognised():
    @torch.jit.script
    def check(x: torch.Tensor) -> torch.Tensor:
        if x.numel() > 1:
            raise ValueError("targets must be small")
        return x

    with pytest.raises(torch.jit.Error) as error:
        check(torch.ones(3))
    assert library_value_error(error.value) == "targets must be small"
    assert library_value_error(RuntimeError("boom")) is None


def test_stream_errors_are_located_in_their_batch():
    error = ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "weights: bad", [("weights", "bad")]).in_batch(3)
    assert error.message == "batch 3: weights: bad"
    assert error.violations == [("batches[3].weights", "bad")]
    status = error.to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert too_large("predictions.shape", "too many").in_batch(1).reason == REFUSED_FOR_SIZE


def test_config_key_distinguishes_tensor_values():
    a = config_key("focal", {"alpha": torch.tensor([1.0, 2.0]), "gamma": 2.0})
    b = config_key("focal", {"gamma": 2.0, "alpha": torch.tensor([1.0, 2.0])})
    c = config_key("focal", {"alpha": torch.tensor([1.0, 3.0]), "gamma": 2.0})
    assert a == b and a != c and hash(a) == hash(b)
    # A vector is keyed by a digest, not by its bytes: a key stays small whatever the vector's size.
    large = config_key("focal", {"alpha": torch.ones(1_000_000)})
    assert len(repr(large)) < 300


def test_runner_cache_is_bounded_in_bytes_and_entries():
    cache = RunnerCache(capacity=3, max_bytes=1000)
    cache.put("a", "runner a", 200)
    cache.put("b", "runner b", 200)
    assert cache.get("a") == "runner a" and cache.bytes == 400
    cache.put("too large", "runner", 251)  # more than a quarter of the budget: never kept
    assert cache.get("too large") is None and "too large" not in cache
    cache.put("c", "runner c", 250)
    cache.put("d", "runner d", 250)  # 4 entries > 3: the least recently used ("b") goes
    assert "b" not in cache and cache.get("a") == "runner a" and len(cache) == 3
    cache.put("e", "runner e", 250)  # 950 bytes > 1000 - 200: "c" goes
    assert "c" not in cache and cache.bytes <= 1000


def test_a_runner_is_kept_only_after_it_served_a_valid_request():
    from loss_service import losses
    from loss_service.server.backends import EagerBackend

    backend = EagerBackend("cpu")
    spec, params = losses.get("cross_entropy"), {"class_weight": torch.ones(5)}
    key = config_key(spec.name, params)
    runner = backend.build(spec, params)
    assert backend.kept(key) is None, "built but not kept"
    backend.keep(key, runner, params)
    assert backend.kept(key) is runner
    assert backend.cache_usage() == (1, RUNNER_BYTES + 5 * 4)


def test_request_budget_refuses_what_would_exceed_it_and_reports_idle():
    idle = []
    budget = RequestBudget(100, on_idle=lambda: idle.append(budget.in_use))
    assert budget.idle_since is not None
    budget.acquire(60)
    assert budget.idle_since is None
    with pytest.raises(ServiceError) as error:
        budget.acquire(50)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "60 of 100 bytes in use" in error.value.message
    assert error.value.reason == REFUSED_FOR_MEMORY
    with pytest.raises(ServiceError, match="exceed the server's in-flight request budget of 100"):
        budget.acquire(101)
    with budget.holding(40):
        assert budget.in_use == 100
    budget.release(60)
    assert budget.in_use == 0 and budget.idle_since <= time.monotonic()
    assert idle == []  # far less than IDLE_TRIM_MIN_BYTES went through: nothing to give back
    large = RequestBudget(1 << 30, on_idle=lambda: idle.append(large.in_use))
    with large.holding(32 << 20):
        pass
    assert idle == [0]


def test_tune_malloc_on_glibc():
    assert tune_malloc() is True


def _call_fields(request_id):
    return {"method": "ScoreBatch", "loss": "focal", "backend": "eager", "device": "cpu", "elements": 8,
            "duration_ms": 0.2, "status": "OK", "request_id": request_id, "labels": {"job": "a"}}


def test_call_lines_are_batched_on_the_event_loop_and_flushed_within_the_interval(monkeypatch):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    monkeypatch.setattr(logs, "_json_handler", handler)
    logger = logging.getLogger("loss_service.test_calls")
    logger.setLevel(logging.INFO)  # a logger of this test only
    calls = logs.CallLog(logger)

    async def scenario():
        calls.write(**_call_fields("a"))
        calls.write(**_call_fields("b"))
        buffered = stream.getvalue()
        await asyncio.sleep(logs.CallLog.FLUSH_SECONDS * 4)
        return buffered

    assert asyncio.run(scenario()) == ""  # nothing written during the call that logged it
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["a", "b"]
    # The same JSON shape as every other log line.
    assert set(lines[0]) == {"ts", "level", "logger", "event", *_call_fields("a")}
    assert lines[0]["event"] == "call" and lines[0]["level"] == "INFO" and lines[0]["logger"] == logger.name
    # Each line carries the time its call ended, not the time of the flush that formatted it.
    ended = time.time()
    calls.write(**_call_fields("timed"))
    time.sleep(0.05)
    calls.flush()
    timed = json.loads(stream.getvalue().splitlines()[-1])
    assert timed["request_id"] == "timed" and ended - 0.001 <= timed["ts"] < ended + 0.03
    stream.truncate(0)
    stream.seek(0)
    calls.write(**_call_fields("a"))
    calls.write(**_call_fields("b"))
    # A full buffer is written at once; flush() (server stop) writes the rest.
    for index in range(logs.CallLog.MAX_BUFFERED):
        calls.write(**_call_fields(str(index)))
    assert len(stream.getvalue().splitlines()) == 2 + logs.CallLog.MAX_BUFFERED
    calls.write(**_call_fields("last"))
    calls.flush()
    assert json.loads(stream.getvalue().splitlines()[-1])["request_id"] == "last"
    # Below INFO nothing is written.
    logger.setLevel(logging.WARNING)
    calls.write(**_call_fields("hidden"))
    calls.flush()
    assert "hidden" not in stream.getvalue()


def test_call_lines_are_ordinary_records_without_the_servers_handler(monkeypatch, caplog):
    monkeypatch.setattr(logs, "_json_handler", None)
    logger = logging.getLogger("loss_service.test_calls_plain")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logs.CallLog(logger).write(**_call_fields("plain"))
    (record,) = [r for r in caplog.records if r.name == logger.name]
    assert record.getMessage() == "call" and record.fields["request_id"] == "plain"


def test_idle_trim_waits_for_a_server_at_rest(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from loss_service.server import memory

    trims = []
    monkeypatch.setattr(memory, "trim_malloc", lambda: trims.append(time.monotonic()))
    seconds = 0.2

    async def scenario():
        budget = RequestBudget(1 << 30)
        with ThreadPoolExecutor(1) as executor:
            memory.IdleTrim(budget, executor, seconds)
            for _ in range(6):  # back-to-back large requests: idle between them, never for `seconds`
                with budget.holding(32 << 20):
                    await asyncio.sleep(0.05)
            busy_until = time.monotonic()
            await asyncio.sleep(seconds * 3)
            return busy_until

    busy_until = asyncio.run(scenario())
    assert len(trims) == 1 and trims[0] - busy_until >= seconds * 0.9


def _parsed_request(loss="focal", request_id="", classes=3, **fields):
    request = pb.ScoreBatchRequest(loss=loss, request_id=request_id, **fields)
    request.predictions.CopyFrom(to_message(torch.randn(4, classes)))
    request.targets.CopyFrom(to_message(torch.arange(4) % classes))
    return parse_request(request.SerializeToString())


def _eager_scorer():
    from loss_service.server.backends import EagerBackend
    from loss_service.server.scoring import Scorer

    return Scorer({"eager": EagerBackend("cpu")}, "eager", 1_000_000)


def test_repeated_settings_reuse_their_plan_and_every_request_checks_its_metadata():
    from loss_service.server.scoring import MAX_REQUEST_ID_CHARACTERS

    scorer = _eager_scorer()
    gamma = {"params": {"gamma": pb.Param(double_value=3.0)}}
    first = scorer.plan(_parsed_request(**gamma))
    assert first.runner is None, "nothing built yet"
    scorer.score_batch(_parsed_request(**gamma), first)  # the runner is kept once it served a valid request
    kept = scorer.plan(_parsed_request(**gamma))
    assert kept is not first and kept.runner is first.runner
    assert scorer.plan(_parsed_request(request_id="job-7", **gamma)) is kept, "the same settings: the same plan"
    assert scorer.plan(_parsed_request(params={"gamma": pb.Param(double_value=2.0)})) is not kept
    assert scorer.plan(_parsed_request(reduction=pb.REDUCTION_SUM, **gamma)) is not kept
    assert scorer.plan(_parsed_request(**gamma)).params == {"gamma": 3.0}
    with pytest.raises(ServiceError) as refused:
        scorer.plan(_parsed_request(request_id="x" * (MAX_REQUEST_ID_CHARACTERS + 1), **gamma))
    assert refused.value.violations[0][0] == "request_id"


def test_a_kept_plan_goes_with_its_runner_and_large_settings_are_planned_each_time():
    from loss_service.server.backends import RunnerCache
    from loss_service.server.scoring import PLAN_KEY_MAX_BYTES

    scorer = _eager_scorer()
    first = scorer.plan(_parsed_request())
    scorer.score_batch(_parsed_request(), first)
    kept = scorer.plan(_parsed_request())
    assert scorer.plan(_parsed_request()) is kept
    backend = scorer.backends["eager"]
    backend._cache = RunnerCache()  # the runner evicted: its plan is not reused
    assert scorer.plan(_parsed_request()) is not kept
    # Class weights over the key's byte bound: validated anew for every request (the key would hold them).
    classes = PLAN_KEY_MAX_BYTES // 4 + 1
    weights = {"class_weights": to_message(torch.ones(classes))}
    planned = scorer.plan(_parsed_request("cross_entropy", classes=classes, **weights))
    scorer.score_batch(_parsed_request("cross_entropy", classes=classes, **weights), planned)
    assert scorer.plan(_parsed_request("cross_entropy", classes=classes, **weights)) is not scorer.plan(
        _parsed_request("cross_entropy", classes=classes, **weights))


def test_a_refused_request_leaves_no_plan():
    scorer = _eager_scorer()
    with pytest.raises(ServiceError):
        scorer.plan(_parsed_request(params={"gamma": pb.Param(double_value=-1.0)}))
    # Valid settings, but targets out of range: refused when scored, so neither its runner nor its plan is kept.
    request = pb.ScoreBatchRequest(loss="focal", predictions=to_message(torch.randn(4, 3)),
                                   targets=to_message(torch.tensor([0, 1, 2, 7])))
    parsed = parse_request(request.SerializeToString())
    with pytest.raises(ServiceError):
        scorer.score_batch(parsed, scorer.plan(parsed))
    assert scorer.plan(parsed).runner is None and len(scorer._plans) == 0
