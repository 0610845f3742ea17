r"""Request parsing (:mod:`loss_service.server.wire`) against protobuf's own parser: the same
meaning, payloads viewed in place, bounded work on hostile bodies."""
import time

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from loss_service.codec import to_message
from loss_service.server import wire
from loss_service.server.errors import ServiceError
from loss_service.server.scoring import decode
from loss_service.server.wire import ParsedRequest, parse_request
from loss_service.v1 import loss_service_pb2 as pb

LARGE = 200_000  # elements: 1.6 MB in all, above ZERO_COPY_MIN_BYTES


def _request(elements: int = LARGE, weights: bool = True) -> pb.ScoreBatchRequest:
    generator = torch.Generator().manual_seed(0)
    request = pb.ScoreBatchRequest(loss="focal", reduction=pb.REDUCTION_SUM, backend=pb.BACKEND_EAGER,
                                   return_per_sample=True, request_id="r-7")
    request.params["gamma"].double_value = 1.5
    request.params["ignore_index"].int_value = -1
    request.labels["job"] = "eval"
    request.predictions.CopyFrom(to_message(torch.randn(elements // 4, 4, generator=generator)))
    request.targets.CopyFrom(to_message(torch.randint(0, 4, (elements // 4,), generator=generator)))
    if weights:
        request.weights.CopyFrom(to_message(torch.rand(elements // 4, generator=generator, dtype=torch.float64)))
    request.class_weights.CopyFrom(to_message(torch.tensor([0.5, 1.0, 2.0, 1.0])))
    request.tensor_params["alpha"].CopyFrom(to_message(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    return request


def _reassembled(parsed: ParsedRequest) -> pb.ScoreBatchRequest:
    r"""The public message the parse stands for: its maps, its fields and the viewed payloads."""
    message = pb.ScoreBatchRequest()
    message.ParseFromString(parsed.message.SerializeToString())  # the same wire layout
    assert dict(message.params) == parsed.params and dict(message.tensor_params) == parsed.tensor_params
    assert dict(message.labels) == parsed.labels
    for name, payload in parsed.payloads.items():
        getattr(message, name).data = bytes(payload)
    return message


@pytest.mark.parametrize("weights", [True, False])
def test_large_request_equals_protobufs_parse_with_payloads_viewed_in_place(weights):
    request = _request(weights=weights)
    serialized = request.SerializeToString()
    parsed = parse_request(serialized)
    expected = {"predictions", "targets"} | ({"weights"} if weights else set())
    assert set(parsed.payloads) == expected
    assert _reassembled(parsed) == pb.ScoreBatchRequest.FromString(serialized) == request
    for name in expected:
        # The message keeps dtype and shape but not the bytes; data() returns the view.
        assert getattr(parsed.message, name).data == b""
        assert bytes(parsed.data(name)) == getattr(request, name).data
    # Views, not copies: the decoded tensor's memory lies inside the serialized request.
    view = np.frombuffer(serialized, dtype=np.uint8)
    start = view.__array_interface__["data"][0]
    tensor = decode(parsed.message.predictions, "predictions", 10**9, parsed.data("predictions"))
    assert start <= tensor.data_ptr() < start + len(serialized)
    torch.testing.assert_close(tensor, decode(request.predictions, "predictions", 10**9), rtol=0, atol=0)


def test_field_order_and_a_tensor_without_data_are_handled():
    request = _request()
    request.weights.Clear()
    request.weights.dtype = pb.DTYPE_FLOAT32  # set, empty: shape [] with no data bytes
    # data first, then shape and dtype: protobuf accepts any field order
    tensor = request.predictions
    reordered = (
        b"\x1a" + _varint(len(tensor.data)) + tensor.data
        + pb.Tensor(shape=tensor.shape).SerializeToString() + pb.Tensor(dtype=tensor.dtype).SerializeToString()
    )
    request.ClearField("predictions")
    serialized = request.SerializeToString() + b"\x1a" + _varint(len(reordered)) + reordered
    parsed = parse_request(serialized)
    assert _reassembled(parsed) == pb.ScoreBatchRequest.FromString(serialized)
    assert bytes(parsed.data("predictions")) == tensor.data and bytes(parsed.data("weights")) == b""


def test_layouts_protobuf_merges_are_left_to_protobuf():
    request = _request()
    # A tensor field twice: protobuf merges the two messages (the shape lists concatenate).
    extra = pb.ScoreBatchRequest()
    extra.predictions.shape.append(7)
    serialized = request.SerializeToString() + extra.SerializeToString()
    parsed = parse_request(serialized)
    assert parsed.payloads == {} and _reassembled(parsed) == pb.ScoreBatchRequest.FromString(serialized)
    # data twice inside one tensor: the last one wins in protobuf.
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 8).SerializeToString() + b"\x1a\x08" + b"\1" * 8
    serialized = request.SerializeToString() + b"\x2a" + _varint(len(tensor)) + tensor  # field 5: weights
    parsed = parse_request(serialized)
    assert parsed.payloads == {} and parsed.message.weights.data == b"\1" * 8


def test_small_requests_take_the_plain_parse():
    serialized = _request(elements=400).SerializeToString()
    assert len(serialized) < wire.ZERO_COPY_MIN_BYTES
    parsed = parse_request(serialized)
    assert parsed.payloads == {} and _reassembled(parsed) == pb.ScoreBatchRequest.FromString(serialized)
    assert parsed.data("predictions") == parsed.message.predictions.data


@pytest.mark.parametrize("elements", [400, LARGE])
@pytest.mark.parametrize("cut", [1, 7, 100, 1000])
def test_malformed_messages_fail_where_protobuf_fails_with_invalid_argument(cut, elements):
    serialized = _request(elements).SerializeToString()
    truncated = serialized[:-cut]
    with pytest.raises(DecodeError):
        pb.ScoreBatchRequest.FromString(truncated)
    with pytest.raises(ServiceError) as error:
        parse_request(truncated)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid loss_service.v1.ScoreBatchRequest" in error.value.message
    assert "DecodeError" not in error.value.message


def test_unknown_fields_are_kept_as_protobuf_keeps_them():
    serialized = _request().SerializeToString() + b"\xa0\x06\x05"  # field 100, varint 5
    parsed = parse_request(serialized)
    assert parsed.payloads and _reassembled(parsed) == pb.ScoreBatchRequest.FromString(serialized)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@pytest.mark.parametrize("elements", [400, LARGE])
def test_maps_mean_what_protobufs_maps_mean_and_are_bounded(elements):
    request = _request(elements)
    # A key repeated on the wire: the last entry wins, as in a protobuf map.
    again = pb.ScoreBatchRequest()
    again.params["gamma"].double_value = 3.0
    again.labels["job"] = "nightly"
    serialized = request.SerializeToString() + again.SerializeToString()
    parsed = parse_request(serialized)
    assert _reassembled(parsed) == pb.ScoreBatchRequest.FromString(serialized)
    assert parsed.params["gamma"].double_value == 3.0 and parsed.labels == {"job": "nightly"}
    for name in wire.MAP_FIELDS:
        crowded = pb.ScoreBatchRequest()
        for index in range(wire.MAX_MAP_ENTRIES + 1):
            entries = getattr(crowded, name)
            if name == "labels":
                entries[str(index)] = "x"
            elif name == "params":
                entries[str(index)].int_value = index
            else:
                entries[str(index)].dtype = pb.DTYPE_FLOAT32
        with pytest.raises(ServiceError) as error:
            parse_request(request.SerializeToString() + crowded.SerializeToString())
        [(field, description)] = error.value.violations
        assert field == name and description.endswith(f"entries; expected at most {wire.MAX_MAP_ENTRIES}")


def test_a_body_with_more_fields_than_the_scan_reads_is_parsed_by_protobuf():
    request = _request()
    serialized = request.SerializeToString()
    extra = b"\xa0\x06\x01" * (wire.scan_budget(len(serialized)) + 10)  # unknown varint fields
    body = serialized + extra
    assert len(body) <= wire.FULL_PARSE_MAX_BYTES
    parsed = parse_request(body)
    assert parsed.payloads == {} and _reassembled(parsed) == pb.ScoreBatchRequest.FromString(body)


def test_a_huge_body_of_tiny_fields_is_refused_without_parsing_it():
    body = b"\x40\x01" * ((wire.FULL_PARSE_MAX_BYTES + 2) // 2)  # the reduction field, 8 M times
    start = time.perf_counter()
    with pytest.raises(ServiceError) as error:
        parse_request(body)
    assert time.perf_counter() - start < 0.5
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "more than" in error.value.message
    # Below the limit protobuf reads it (linear in C), as it would any valid message.
    smaller = body[: wire.FULL_PARSE_MAX_BYTES // 2]
    assert parse_request(smaller).message.reduction == 1


def _best_seconds(functions, body, repeats):
    r"""The best time of one call of each of ``functions`` on ``body``, the calls interleaved round by round: a
    burst of load on a busy machine hits both sides of a comparison alike."""
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            try:
                function(body)
            except (DecodeError, ServiceError):
                pass
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def _hostile_bodies():
    normal = _request().SerializeToString()
    labelled = _request()
    for index in range(60):
        labelled.labels[f"label-{index}"] = "value"
    mib = 1024 * 1024
    return {
        "normal": normal,
        "normal+60 labels": labelled.SerializeToString(),
        "normal+unknown fields": normal + b"\xa0\x06\x01" * 5000,
        "1 MiB of enum fields": b"\x40\x01" * (mib // 2),
        "1 MiB of unknown fields": b"\xa0\x06\x01" * (mib // 3),
        "1 MiB of labels": pb.ScoreBatchRequest(labels={str(i): "v" for i in range(mib // 12)}).SerializeToString(),
        "4 MiB of enum fields": b"\x40\x01" * (2 * mib),
        "16 MiB of enum fields": b"\x40\x01" * (8 * mib),
        "a tensor with 1e5 unpacked dims": pb.ScoreBatchRequest(
            predictions=pb.Tensor(shape=[1] * 100_000, data=b"\0" * mib)).SerializeToString(),
    }


@pytest.mark.parametrize("name", list(_hostile_bodies()))
def test_parsing_never_costs_more_than_twice_protobufs_own_parse(name):
    body = _hostile_bodies()[name]
    repeats = 3 if len(body) > 4 * 1024 * 1024 else 50
    ours, protobufs = _best_seconds([parse_request, pb.ScoreBatchRequest.FromString], body, repeats)
    assert ours <= 2 * protobufs, f"{name}: {ours * 1e6:.0f} us vs protobuf's {protobufs * 1e6:.0f} us"
