r"""Zero-copy decoding of large ``ScoreBatchRequest`` messages.

Parsing a request with protobuf copies every ``Tensor.data`` payload twice: once into the
message (upb's arena) and once more on each read of ``tensor.data`` (a new ``bytes`` object). For
a 1e7-element request that is 2 x 60-120 MB of copies, page faults included -- more than the loss
itself costs. gRPC hands the server the serialized request as one immutable ``bytes`` object, so
the payloads can be *viewed* where they are instead.

:func:`parse_request` scans the top-level fields of the wire format (a handful of tags: cheap in
Python), and for the ``predictions``, ``targets`` and ``weights`` tensors records where their
``data`` bytes lie and drops them from the message it then parses with protobuf. Everything else
-- the loss name, parameters, class weights, the tensors' dtype and shape -- is parsed by protobuf
itself, with its usual checks. A request whose layout the scan does not expect (a tensor or its
``data`` field repeated, which protobuf would merge; a malformed message) is parsed the ordinary
way, so the result is always exactly what ``ScoreBatchRequest.FromString`` would give; small
requests (below :data:`ZERO_COPY_MIN_BYTES`) are too, since copying a few kilobytes costs less
than scanning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from loss_service.v1 import loss_service_pb2 as pb

# Below this size a plain parse (which copies) is cheaper than the scan.
ZERO_COPY_MIN_BYTES = 64 * 1024

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH_DELIMITED, _WIRE_FIXED32 = 0, 1, 2, 5
_REQUEST_FIELDS = pb.ScoreBatchRequest.DESCRIPTOR.fields_by_name
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
# Field number -> name of the request tensors whose payloads are viewed in place.
VIEWED_TENSORS: Dict[int, str] = {
    _REQUEST_FIELDS[name].number: name for name in ("predictions", "targets", "weights")
}


@dataclass
class ParsedRequest:
    r"""A ``ScoreBatchRequest`` and, for the tensors decoded in place, views of their ``data``.

    ``message`` is the request; for a tensor named in ``payloads`` its ``data`` field is empty in
    ``message`` and the bytes are ``payloads[name]`` (a read-only ``memoryview`` of the serialized
    request). :meth:`data` gives the right one either way.
    """

    message: pb.ScoreBatchRequest
    payloads: Dict[str, memoryview] = field(default_factory=dict)

    def data(self, name: str) -> bytes:
        payload = self.payloads.get(name)
        if payload is not None:
            return payload
        return getattr(self.message, name).data


def parse_request(serialized: bytes) -> ParsedRequest:
    r"""The request in ``serialized``, with large tensor payloads viewed instead of copied."""
    if len(serialized) < ZERO_COPY_MIN_BYTES:
        return ParsedRequest(pb.ScoreBatchRequest.FromString(serialized))
    split = _split_payloads(memoryview(serialized))
    if split is None:
        return ParsedRequest(pb.ScoreBatchRequest.FromString(serialized))
    stripped, payloads = split
    return ParsedRequest(pb.ScoreBatchRequest.FromString(stripped), payloads)


def _read_varint(buffer: memoryview, position: int) -> Tuple[int, int]:
    r"""``(value, next position)`` of the base-128 varint at ``position``; ``IndexError`` past the end."""
    result = 0
    shift = 0
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 64:
            raise ValueError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buffer: memoryview, start: int, end: int) -> Optional[List[Tuple[int, int, int, int, int]]]:
    r"""``(number, wire type, field start, value start, value end)`` of each field in ``buffer[start:end]``.

    ``None`` for anything a well-formed proto3 message does not contain (groups, lengths past the
    end): the caller then leaves the message to protobuf, which reports it.
    """
    found = []
    position = start
    try:
        while position < end:
            field_start = position
            tag, position = _read_varint(buffer, position)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == _WIRE_VARINT:
                value_start = position
                _, position = _read_varint(buffer, position)
            elif wire_type == _WIRE_FIXED64:
                value_start, position = position, position + 8
            elif wire_type == _WIRE_FIXED32:
                value_start, position = position, position + 4
            elif wire_type == _WIRE_LENGTH_DELIMITED:
                length, value_start = _read_varint(buffer, position)
                position = value_start + length
            else:
                return None
            if number == 0 or position > end:
                return None
            found.append((number, wire_type, field_start, value_start, position))
    except (IndexError, ValueError):
        return None
    return found


def _split_payloads(buffer: memoryview) -> Optional[Tuple[bytes, Dict[str, memoryview]]]:
    r"""The request without the viewed tensors' ``data`` fields, and views of those payloads."""
    top_level = _fields(buffer, 0, len(buffer))
    if top_level is None:
        return None
    numbers = [number for number, *_ in top_level]
    pieces: List[bytes] = []
    payloads: Dict[str, memoryview] = {}
    for number, wire_type, field_start, value_start, value_end in top_level:
        name = VIEWED_TENSORS.get(number)
        if name is None or wire_type != _WIRE_LENGTH_DELIMITED:
            pieces.append(buffer[field_start:value_end])
            continue
        if numbers.count(number) > 1:
            return None  # protobuf merges repeated occurrences: leave that to it
        inner = _fields(buffer, value_start, value_end)
        if inner is None:
            return None
        data_fields = [f for f in inner if f[0] == _TENSOR_DATA]
        if len(data_fields) > 1 or (data_fields and data_fields[0][1] != _WIRE_LENGTH_DELIMITED):
            return None
        kept = b"".join(bytes(buffer[f[2]:f[4]]) for f in inner if f[0] != _TENSOR_DATA)
        pieces.append(_encode_varint(number << 3 | _WIRE_LENGTH_DELIMITED) + _encode_varint(len(kept)) + kept)
        payloads[name] = buffer[data_fields[0][3]:data_fields[0][4]] if data_fields else buffer[0:0]
    return b"".join(pieces), payloads
