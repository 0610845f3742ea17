r"""Property-based fuzzing of the gRPC service: whatever bytes a client sends, it gets a client status.

Three sources of requests, each sent unary (``ScoreBatch``) and as streams (``ScoreStream``, one to
three messages): random bytes, valid requests of every loss with random mutations (bit flips,
overwrites, truncations, insertions, splices), and structured requests whose every field hypothesis
chooses (names, enum values, dtypes, shapes up to huge dimensions, data of the right or wrong
length, extreme values, parameters of every kind, group labels). ``MergeStatistics`` gets the same
three: random bytes, mutated valid merges of every loss's statistics, and structured statistics
with a fault here and there (versions, losses, parameters, layouts, totals, group labels). Every answer must be OK or a client status
(:data:`CLIENT_STATUSES`: never UNKNOWN or INTERNAL), name no Python class or traceback, and stay
far below gRPC's 8 KiB metadata budget; after every example the server answers a valid request
with the right value. The runs are seeded (``derandomize``) and bounded by their example counts;
the whole module takes about a minute on 2 cores.
"""
import math
import re

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loss_service import evaluation, losses
from loss_service.client import build_request
from loss_service.codec import WIRE_DTYPES, statistics_message
from loss_service.protocol import SERVICE_NAME
from loss_service.server import BackgroundServer, ServerConfig
from loss_service.server import service, wire
from loss_service.v1 import loss_service_pb2 as pb
from tests.test_server_units import TORCH_DTYPES

SCORE_BATCH = f"/{SERVICE_NAME}/ScoreBatch"
SCORE_STREAM = f"/{SERVICE_NAME}/ScoreStream"
MERGE_STATISTICS = f"/{SERVICE_NAME}/MergeStatistics"
MAX_ELEMENTS = 100_000
CLIENT_STATUSES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
# What a message shows when the server leaked its internals instead of saying what was wrong.
LEAKS = re.compile(r"Traceback|<class |File \"|Error\(|Exception\(|\bat 0x[0-9a-f]+")
STATUS_BUDGET_BYTES = 8 * 1024


def fuzz_settings(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["plain", "zero-copy and pool"])
def server(request, server_artifacts):
    # The second server parses every body the way large ones are parsed (payloads viewed in place,
    # in the worker pool): the same fuzz cases then reach that path too.
    with pytest.MonkeyPatch.context() as patch:
        if request.param != "plain":
            patch.setattr(wire, "ZERO_COPY_MIN_BYTES", 0)
            patch.setattr(service, "INLINE_MAX_BYTES", 0)
        config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), max_message_bytes=4 << 20,
                              max_elements=MAX_ELEMENTS, workers=2, export_missing=server_artifacts.export_missing)
        with BackgroundServer(config, address="127.0.0.1:0") as running:
            yield running


class Probe:
    r"""Raw-bytes calls to one server, and the check that it still answers correctly."""

    def __init__(self, target):
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20)])
        self.unary = self.channel.unary_unary(SCORE_BATCH)
        self.stream = self.channel.stream_unary(SCORE_STREAM)
        self.merge = self.channel.unary_unary(MERGE_STATISTICS)
        spec = losses.get("focal")
        predictions, targets = spec.make_inputs(3, 4, (5,), torch.Generator().manual_seed(0), torch.float32, {})
        self.valid = build_request("focal", predictions, targets, gamma=2.0).SerializeToString()
        self.expected = float(losses.build("focal", gamma=2.0)(predictions, targets))

    def answer(self, call):
        r"""The status of ``call()``, after checking it is one a client may get and that it is bounded."""
        try:
            call()
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            assert code in CLIENT_STATUSES, f"{code.name}: {details}"
            assert not LEAKS.search(details), details
            status_bytes = len(details) + sum(len(key) + len(value) for key, value in error.trailing_metadata() or ())
            assert status_bytes < STATUS_BUDGET_BYTES, (status_bytes, details[:200])
            return code

    def still_serving(self):
        response = pb.ScoreBatchResponse.FromString(self.unary(self.valid, timeout=30))
        assert math.isclose(response.loss, self.expected, rel_tol=1e-6), (response.loss, self.expected)

    def send(self, bodies):
        r"""The first body unary, all of them as one stream; both answers checked."""
        self.answer(lambda: self.unary(bodies[0], timeout=30))
        self.answer(lambda: self.stream(iter(bodies), timeout=30))
        self.still_serving()

    def send_merge(self, body):
        self.answer(lambda: self.merge(body, timeout=30))
        self.still_serving()


@pytest.fixture(scope="module")
def probe(server):
    probe = Probe(server.target)
    yield probe
    probe.channel.close()


# -- valid requests to start from -----------------------------------------------------------------

def _valid_bodies():
    bodies = []
    generator = torch.Generator().manual_seed(1)
    for spec in losses.specs():
        for params in spec.test_params:
            predictions, targets = spec.make_inputs(2, 3, (4,), generator, torch.float32, dict(params))
            sent = dict(params)
            if "class_weight" in sent:
                sent["class_weights"] = sent.pop("class_weight")
            for backend in (None, "torchscript", "onnx"):
                bodies.append(build_request(spec.name, predictions, targets, torch.rand(2, generator=generator),
                                            backend=backend, request_id="r", labels={"job": "fuzz"},
                                            **sent).SerializeToString())
    return bodies


VALID_BODIES = _valid_bodies()


def _valid_statistics():
    r"""Statistics messages of every loss and setting, with and without groups, with and without classes."""
    messages = []
    generator = torch.Generator().manual_seed(2)
    for spec in losses.specs():
        for params in spec.test_params:
            predictions, targets = spec.make_inputs(3, 3, (4,), generator, torch.float32, dict(params))
            for group_ids, per_class in ((None, False), ([5, -1, 5], False), (None, True)):
                messages.append(statistics_message(evaluation.statistics(
                    spec.name, predictions, targets, group_ids=group_ids, per_class=per_class, **params)))
    return messages


VALID_STATISTICS = _valid_statistics()
VALID_MERGES = [pb.MergeStatisticsRequest(statistics=[message] * count).SerializeToString()
                for message in VALID_STATISTICS for count in (1, 2)]


@st.composite
def mutated(draw, body=None, pool=VALID_BODIES):
    data = bytearray(draw(st.sampled_from(pool)) if body is None else body)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "splice", "varint"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            data[position:position + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "splice":
            other = draw(st.sampled_from(pool))
            cut = draw(st.integers(0, len(other)))
            data[position:] = other[cut:]
        elif kind == "varint":  # a long or overlong varint where a length or tag may stand
            data[position:position] = b"\xff" * draw(st.integers(1, 11)) + b"\x01"
    return bytes(data)


# -- structured requests ----------------------------------------------------------------------------

FINITE = [0.0, 1.0, -1.0, 0.5, 0.25, 2.0, 3.0, -3.0, 1e4, -1e4]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, 3.5e38, -100.0, 255.0, 2.0 ** 40]
CLASS_INDICES = [0, 1, 2]
BAD_INDICES = [-100, -1, 3, 255, 2 ** 40]
FLOAT_DTYPES = [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16]
INT_DTYPES = [pb.DTYPE_INT64, pb.DTYPE_INT32, pb.DTYPE_UINT8, pb.DTYPE_INT8, pb.DTYPE_INT16]
DTYPES = list(pb.DType.values()) + [99]
HUGE_SIZES = [-1, 2 ** 31, 2 ** 62, MAX_ELEMENTS + 1, 5000]


def rarely(draw):
    r"""True one time in twenty: where a mostly valid request gets one of its faults."""
    return draw(st.integers(0, 19)) == 0


@st.composite
def shapes(draw, rank=None):
    if rank is None:
        rank = draw(st.integers(0, 5))
    sizes = draw(st.lists(st.integers(0, 4) if not rarely(draw) else st.sampled_from(HUGE_SIZES),
                          min_size=rank, max_size=rank))
    return sizes


@st.composite
def tensors(draw, shape=None, dtypes=FLOAT_DTYPES, values=FINITE):
    r"""A tensor message, usually of ``dtypes`` with ``values`` and data of the right length."""
    dtype = draw(st.sampled_from(DTYPES if rarely(draw) else dtypes))
    if shape is None or rarely(draw):
        shape = draw(shapes())
    message = pb.Tensor(dtype=dtype, shape=shape)
    count = math.prod(shape) if all(0 <= size for size in shape) else -1
    if dtype not in WIRE_DTYPES or not 0 <= count <= 256 or rarely(draw):
        message.data = draw(st.binary(max_size=64))
        return message
    pool = values + SPECIAL if rarely(draw) else values
    array = np.array(draw(st.lists(st.sampled_from(pool), min_size=count, max_size=count)), dtype=np.float64)
    torch_dtype = TORCH_DTYPES[dtype]
    if not (torch_dtype.is_floating_point or torch_dtype == torch.bool):
        array = np.nan_to_num(array, posinf=7, neginf=-7).clip(-2 ** 40, 2 ** 40).astype(np.int64)
    tensor = torch.from_numpy(array).to(torch_dtype)
    if torch_dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    message.data = tensor.numpy().tobytes()
    return message


@st.composite
def params_for(draw, spec):
    names = [p.name for p in spec.params if p.kind != "vector"] if spec is not None else []
    if rarely(draw) or not names:
        names = names + ["gama", "reduction", "", "class_weight"]
    chosen = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
    params = {}
    for name in chosen:
        param = spec.param(name) if spec is not None and name in spec.param_names() else None
        natural = {"float": "double_value", "int": "int_value", "bool": "bool_value", "str": "string_value",
                   "float_or_vector": "double_value"}.get(param.kind if param else "", "double_value")
        kind = natural if not rarely(draw) else draw(
            st.sampled_from(["double_value", "int_value", "bool_value", "string_value", "none"]))
        if kind == "double_value":
            params[name] = pb.Param(double_value=draw(st.sampled_from(FINITE + SPECIAL + [1e308, -1e308, 1e-300])))
        elif kind == "int_value":
            params[name] = pb.Param(int_value=draw(st.sampled_from([0, 1, -1, -100, 2, 3, 255, 2 ** 63 - 1, -2 ** 63])))
        elif kind == "bool_value":
            params[name] = pb.Param(bool_value=draw(st.booleans()))
        elif kind == "string_value":
            choices = list(param.choices or ()) if param else []
            params[name] = pb.Param(string_value=draw(st.sampled_from(choices + ["", "x" * 100])))
        else:
            params[name] = pb.Param()
    return params


@st.composite
def structured(draw):
    r"""A request that is mostly well formed for a real loss, with here and there a fault."""
    names = losses.names()
    loss = draw(st.text(max_size=12) if rarely(draw) else st.sampled_from(names))
    spec = losses.get(loss) if loss in names else None
    backend = draw(st.sampled_from([99] if rarely(draw) else [pb.BACKEND_UNSPECIFIED, pb.BACKEND_EAGER,
                                                                 pb.BACKEND_TORCHSCRIPT, pb.BACKEND_ONNX]))
    request = pb.ScoreBatchRequest(
        loss=loss, backend=backend, reduction=draw(st.sampled_from([42] if rarely(draw) else list(pb.Reduction.values()))),
        return_per_sample=draw(st.booleans()), request_id=draw(st.text(max_size=8)),
    )
    shape = draw(shapes(draw(st.integers(1, 4)) if not rarely(draw) else None))
    request.predictions.CopyFrom(draw(tensors(shape)))
    layout = draw(st.sampled_from(["same", "indices", "channel", "other"]))
    if layout == "indices" and len(shape) >= 2:
        request.targets.CopyFrom(draw(tensors(shape[:1] + shape[2:], INT_DTYPES,
                                              CLASS_INDICES if not rarely(draw) else BAD_INDICES)))
    elif layout == "channel" and len(shape) >= 2:
        request.targets.CopyFrom(draw(tensors(shape[:1] + [1] + shape[2:], INT_DTYPES, CLASS_INDICES)))
    elif layout != "other" or rarely(draw):
        request.targets.CopyFrom(draw(tensors(shape, FLOAT_DTYPES, [0.0, 1.0, 0.5, 0.25])))
    if draw(st.booleans()):
        weights_shape = draw(st.sampled_from([shape[:1], shape, shape[:2], []]))
        request.weights.CopyFrom(draw(tensors(weights_shape, FLOAT_DTYPES, [0.0, 0.5, 1.0, 2.0])))
    # Each new hyperparameter set costs a TorchScript backend one module load: keep its requests
    # to the settings the start-up check built.
    if backend != pb.BACKEND_TORCHSCRIPT:
        for name, param in draw(params_for(spec)).items():
            request.params[name].CopyFrom(param)
        classes = shape[1] if len(shape) > 1 else 1
        for field in ("class_weights", "pos_weight"):
            if draw(st.integers(0, 3)) == 0:
                getattr(request, field).CopyFrom(draw(tensors([classes], FLOAT_DTYPES, [0.5, 1.0, 2.0]))
                                                 if not rarely(draw) else draw(tensors(None)))
        if draw(st.integers(0, 3)) == 0:
            request.tensor_params[draw(st.sampled_from(["alpha", "alpha", "gamma", "nope"]))].CopyFrom(
                draw(tensors(draw(st.sampled_from([[classes], [], [0], [2, 2]])), FLOAT_DTYPES, [0.25, 0.5, 1.0])))
    for _ in range(draw(st.integers(0, 2))):
        request.labels[draw(st.text(max_size=6))] = draw(st.text(max_size=6))
    if draw(st.integers(0, 3)) == 0:
        group_shape = shape[:1] if not rarely(draw) else draw(shapes())
        request.group_ids.CopyFrom(draw(tensors(group_shape, INT_DTYPES, [0, 1, -1, 7, 2 ** 40])))
    request.return_statistics = draw(st.booleans())
    request.return_per_class = draw(st.booleans())
    return request.SerializeToString()


@st.composite
def structured_statistics(draw):
    r"""A statistics message of a real loss with, here and there, a fault in one of its fields."""
    message = pb.Statistics()
    message.CopyFrom(draw(st.sampled_from(VALID_STATISTICS)))
    if rarely(draw):
        message.version = draw(st.sampled_from([0, 2, 2 ** 32 - 1]))
    if rarely(draw):
        message.loss = draw(st.one_of(st.text(max_size=12), st.sampled_from(losses.names())))
    if rarely(draw):
        message.reduction = draw(st.sampled_from([0, 3, 42]))
    if message.params and rarely(draw):
        param = message.params[draw(st.integers(0, len(message.params) - 1))]
        change = draw(st.sampled_from(["name", "value", "tensor", "both", "empty"]))
        if change == "name":
            param.name = draw(st.sampled_from(["", "gamma", "nope", message.params[0].name]))
        elif change == "value":
            param.value.CopyFrom(draw(params_for(None)).get("gama", pb.Param(double_value=draw(st.sampled_from(FINITE + SPECIAL)))))
        elif change in ("tensor", "both"):
            if change == "tensor":
                param.ClearField("value")
            param.tensor.CopyFrom(draw(tensors(draw(st.sampled_from([[3], [2], [], [0], [2, 2]])), FLOAT_DTYPES, [0.0, 0.5, 1.0, -1.0])))
        else:
            param.Clear()
    if rarely(draw):
        layout = list(message.layout)
        edit = draw(st.sampled_from(["drop", "add", "rename", "shuffle"]))
        if edit == "drop" and layout:
            layout.pop()
        elif edit == "add":
            layout.append(draw(st.text(max_size=8)))
        elif edit == "rename" and layout:
            layout[0] = draw(st.text(max_size=8))
        else:
            layout = layout[::-1]
        message.ClearField("layout")
        message.layout.extend(layout)
    if rarely(draw):
        message.totals.CopyFrom(draw(tensors([len(message.layout)], [pb.DTYPE_FLOAT64], FINITE)))
    if rarely(draw):
        count = draw(st.integers(0, 3))
        message.group_ids.CopyFrom(draw(tensors([count], [pb.DTYPE_INT64], [0, 1, -1, 2 ** 40])))
        message.group_totals.CopyFrom(draw(tensors([count, len(message.layout)], [pb.DTYPE_FLOAT64], FINITE)))
    if rarely(draw):
        message.num_batches = draw(st.sampled_from([0, -1, 2 ** 62]))
    if rarely(draw):
        columns = draw(st.integers(0, 8))
        if draw(st.booleans()):
            message.ClearField("class_layout")
            message.class_layout.extend(draw(st.sampled_from([["loss_sum"] * columns, list(message.layout)[:columns]])))
        message.class_totals.CopyFrom(draw(tensors(
            draw(st.sampled_from([[draw(st.integers(0, 4)), columns], [columns], []])), [pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT32],
            FINITE + SPECIAL)))
    return message


@st.composite
def structured_merges(draw):
    count = draw(st.integers(0, 3))
    return pb.MergeStatisticsRequest(statistics=[draw(structured_statistics()) for _ in range(count)]).SerializeToString()


BODIES = st.one_of(st.binary(max_size=512), mutated(), structured())


# -- the properties -----------------------------------------------------------------------------

@fuzz_settings(1000)
@given(body=st.binary(max_size=2048))
def test_random_bytes_get_a_client_status(probe, body):
    probe.send([body])


@fuzz_settings(1200)
@given(body=mutated())
def test_mutated_requests_get_a_client_status(probe, body):
    probe.send([body])


@fuzz_settings(1200)
@given(body=structured())
def test_structured_requests_get_a_client_status(probe, body):
    probe.send([body])


@fuzz_settings(600)
@given(bodies=st.lists(st.one_of(BODIES, st.sampled_from(VALID_BODIES)), min_size=1, max_size=3))
def test_streams_of_any_batches_get_a_client_status(probe, bodies):
    probe.send(bodies)


@fuzz_settings(300)
@given(body=st.one_of(st.binary(max_size=1024), mutated(pool=VALID_MERGES)))
def test_merges_of_any_bytes_get_a_client_status(probe, body):
    probe.send_merge(body)


@fuzz_settings(600)
@given(body=structured_merges())
def test_structured_merges_get_a_client_status(probe, body):
    probe.send_merge(body)
