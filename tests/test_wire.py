r"""Zero-copy request parsing (:mod:`loss_service.server.wire`) against protobuf's own parser."""
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from loss_service.server import wire
from loss_service.server.codec import decode, encode
from loss_service.server.wire import ParsedRequest, parse_request
from loss_service.v1 import loss_service_pb2 as pb

LARGE = 40_000  # elements: 160 kB of float32, above ZERO_COPY_MIN_BYTES


def _request(elements: int = LARGE, weights: bool = True) -> pb.ScoreBatchRequest:
    generator = torch.Generator().manual_seed(0)
    request = pb.ScoreBatchRequest(loss="focal", reduction=pb.REDUCTION_SUM, backend=pb.BACKEND_EAGER,
                                   return_per_sample=True, request_id="r-7")
    request.params["gamma"].double_value = 1.5
    request.params["ignore_index"].int_value = -1
    request.labels["job"] = "eval"
    encode(torch.randn(elements // 4, 4, generator=generator), request.predictions)
    encode(torch.randint(0, 4, (elements // 4,), generator=generator), request.targets)
    if weights:
        encode(torch.rand(elements // 4, generator=generator, dtype=torch.float64), request.weights)
    encode(torch.tensor([0.5, 1.0, 2.0, 1.0]), request.class_weights)
    encode(torch.tensor([1.0, 2.0, 3.0, 4.0]), request.tensor_params["alpha"])
    return request


def _reassembled(parsed: ParsedRequest) -> pb.ScoreBatchRequest:
    message = pb.ScoreBatchRequest()
    message.CopyFrom(parsed.message)
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
    assert parsed.payloads == {} and parsed.message == pb.ScoreBatchRequest.FromString(serialized)
    # data twice inside one tensor: the last one wins in protobuf.
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 8).SerializeToString() + b"\x1a\x08" + b"\1" * 8
    serialized = request.SerializeToString() + b"\x2a" + _varint(len(tensor)) + tensor  # field 5: weights
    parsed = parse_request(serialized)
    assert parsed.payloads == {} and parsed.message.weights.data == b"\1" * 8


def test_small_requests_take_the_plain_parse():
    serialized = _request(elements=400).SerializeToString()
    assert len(serialized) < wire.ZERO_COPY_MIN_BYTES
    parsed = parse_request(serialized)
    assert parsed.payloads == {} and parsed.message == pb.ScoreBatchRequest.FromString(serialized)
    assert parsed.data("predictions") == parsed.message.predictions.data


@pytest.mark.parametrize("cut", [1, 7, 100, 1000])
def test_malformed_messages_fail_as_protobuf_fails(cut):
    serialized = _request().SerializeToString()
    truncated = serialized[:-cut]
    with pytest.raises(DecodeError):
        pb.ScoreBatchRequest.FromString(truncated)
    with pytest.raises(DecodeError):
        parse_request(truncated)


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
