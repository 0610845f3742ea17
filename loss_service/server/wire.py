r"""Reading a ``ScoreBatchRequest`` body: bounded work whatever the bytes, large payloads viewed in place.

gRPC hands the server each request as one immutable ``bytes`` object (the handlers are registered
without a deserializer, :func:`.service.add_to_server`); :func:`parse_request` turns it into a
:class:`ParsedRequest` or raises :class:`.errors.ServiceError` (``INVALID_ARGUMENT``). Three
things make a plain ``ScoreBatchRequest.FromString`` unfit for bytes from anyone:

* **Maps.** protobuf-python parses a map field in time that grows faster than the number of its
  entries (seconds for a few MB of ``labels``). The body is parsed as :data:`WireRequest`, the same
  wire layout with every map declared as a repeated entry message (linear), and a map of more than
  :data:`MAX_MAP_ENTRIES` entries is rejected before any dictionary is built. Entries become
  dictionaries as protobuf's maps would (a repeated key: the last one wins).
* **Copies.** Parsing copies every ``Tensor.data`` payload into the message, and each read of
  ``tensor.data`` copies it again: for a 1e7-element request, more than the loss itself costs. For
  bodies of :data:`ZERO_COPY_MIN_BYTES` or more the top-level fields are scanned in Python, and the
  ``data`` of ``predictions``, ``targets`` and ``weights`` is *viewed* where it lies
  (``ParsedRequest.payloads``, read-only ``memoryview``\ s) and left out of what protobuf parses.
* **Python per field.** The scan looks at no more fields than :func:`scan_budget` allows for the
  body's size -- about as long as protobuf takes to copy the body, so the scan never costs more
  than protobuf's own parse would. A body with more fields than that is parsed by protobuf (linear
  in C) up to :data:`FULL_PARSE_MAX_BYTES`; above that it is rejected: protobuf holds the GIL for
  its whole parse, which would stall the event loop, and no valid request of that size has that
  many fields.

Layouts that protobuf merges (a viewed tensor twice, its ``data`` twice) and malformed bytes are
left to protobuf's parse, so the result always means what ``ScoreBatchRequest.FromString`` means.
Parse in the worker pool whatever is not small (:mod:`.service`): the cost of any body grows with
its size.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from loss_service.v1 import loss_service_pb2 as pb

from .errors import ServiceError, invalid

ZERO_COPY_MIN_BYTES = 1024 * 1024
# Entries per map (params, labels, tensor_params): far more than a loss has parameters or a log
# line needs labels (scoring.MAX_LABELS is lower still).
MAX_MAP_ENTRIES = 64
# The scan may look at one field per this many bytes of body (at least MIN_SCAN_FIELDS): a field
# costs the scan about what protobuf spends copying that many bytes.
SCAN_BYTES_PER_FIELD = 16 * 1024
MIN_SCAN_FIELDS = 64
# Largest body protobuf parses in full when the scan gives up: its parse holds the GIL throughout,
# a few milliseconds up to this size. Above it the scan's budget (256 fields and more) exceeds what
# a request serialized by protobuf can have: 3 maps of MAX_MAP_ENTRIES, a dozen singular fields
# and 3 tensors of 3 fields each.
FULL_PARSE_MAX_BYTES = 4 * 1024 * 1024
MAP_FIELDS = ("params", "labels", "tensor_params")
REQUEST_TYPE = pb.ScoreBatchRequest.DESCRIPTOR.full_name

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH_DELIMITED, _WIRE_FIXED32 = 0, 1, 2, 5
_REQUEST_FIELDS = pb.ScoreBatchRequest.DESCRIPTOR.fields_by_name
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
# Field number -> name of the request tensors whose payloads are viewed in place.
VIEWED_TENSORS: Dict[int, str] = {
    _REQUEST_FIELDS[name].number: name for name in ("predictions", "targets", "weights")
}


def _wire_request_class() -> Any:
    r"""``ScoreBatchRequest`` with its map entry types turned into plain nested messages.

    On the wire a map *is* a repeated entry message (key = 1, value = 2), so both types read the
    same bytes; only protobuf's map bookkeeping is left out.
    """
    message = descriptor_pb2.DescriptorProto()
    pb.ScoreBatchRequest.DESCRIPTOR.CopyToProto(message)
    package = "loss_service.v1.wire"
    for nested in message.nested_type:
        nested.ClearField("options")  # map_entry = true
    for entry_field in message.field:
        if entry_field.type_name.startswith(f".{REQUEST_TYPE}."):
            entry_field.type_name = entry_field.type_name.replace(f".{REQUEST_TYPE}.", f".{package}.{message.name}.")
    file = descriptor_pb2.FileDescriptorProto(
        name="loss_service/v1/wire_request.proto", package=package, syntax="proto3", dependency=[pb.DESCRIPTOR.name]
    )
    file.message_type.add().CopyFrom(message)
    pool = descriptor_pool.Default()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{message.name}"))


WireRequest = _wire_request_class()


class ParsedRequest:
    r"""A request as the server reads it.

    ``message`` is a :data:`WireRequest` (the singular fields of ``ScoreBatchRequest`` under the same
    names); the maps are ``params``, ``tensor_params`` and ``labels`` (read-only). For a tensor
    named in ``payloads`` its ``data`` is empty in ``message`` and the bytes are ``payloads[name]``,
    a view of the serialized request: :meth:`data` gives the right one either way.
    """

    __slots__ = ("message", "params", "tensor_params", "labels", "payloads")

    def __init__(self, message: Any, params: Mapping[str, pb.Param], tensor_params: Mapping[str, pb.Tensor],
                 labels: Mapping[str, str], payloads: Dict[str, memoryview]) -> None:
        self.message = message
        self.params = params
        self.tensor_params = tensor_params
        self.labels = labels
        self.payloads = payloads

    def data(self, name: str) -> bytes:
        payload = self.payloads.get(name)
        if payload is not None:
            return payload
        return getattr(self.message, name).data


def malformed(description: str) -> ServiceError:
    r"""``INVALID_ARGUMENT`` for a body that is not a request this server reads (no single field)."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"request: {description}")


def scan_budget(size: int) -> int:
    r"""How many fields the scan of a ``size``-byte body may look at."""
    return max(MIN_SCAN_FIELDS, size // SCAN_BYTES_PER_FIELD)


def parse_request(serialized: bytes) -> ParsedRequest:
    r"""The request in ``serialized``; :class:`ServiceError` for bytes that are not one."""
    body: bytes = serialized
    payloads: Dict[str, memoryview] = {}
    if len(serialized) >= ZERO_COPY_MIN_BYTES:
        scanner = _Scanner(memoryview(serialized), scan_budget(len(serialized)))
        split = scanner.split_payloads()
        if split is not None:
            body, payloads = split
        elif scanner.exhausted and len(serialized) > FULL_PARSE_MAX_BYTES:
            raise malformed(
                f"a body of {len(serialized)} bytes has more than {scanner.budget} fields; requests this large "
                f"carry their size in the tensors' data (at most {MAX_MAP_ENTRIES} entries per map)"
            )
    try:
        message = WireRequest.FromString(body)
    except DecodeError:
        raise malformed(f"not a valid {REQUEST_TYPE} in protobuf's wire format") from None
    return ParsedRequest(message, _map(message.params, "params"), _map(message.tensor_params, "tensor_params"),
                         _map(message.labels, "labels"), payloads)


# The map of a request that has no entries (shared: read-only).
_NO_ENTRIES: Mapping[str, Any] = MappingProxyType({})


def _map(entries: Any, name: str) -> Mapping[str, Any]:
    r"""The ``entries`` of map ``name`` as protobuf's map would hold them (a repeated key: the last wins)."""
    if not entries:
        return _NO_ENTRIES
    if len(entries) > MAX_MAP_ENTRIES:
        raise invalid(name, f"has {len(entries)} entries; expected at most {MAX_MAP_ENTRIES}")
    return {entry.key: entry.value for entry in entries}


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


class _Scanner:
    r"""A walk over the wire format of one body that reads at most ``budget`` fields."""

    def __init__(self, buffer: memoryview, budget: int) -> None:
        self.buffer = buffer
        self.budget = budget
        self._remaining = budget
        self.exhausted = False

    def _read_varint(self, position: int) -> Tuple[int, int]:
        r"""``(value, next position)`` of the base-128 varint at ``position``; ``IndexError`` past the end."""
        byte = self.buffer[position]
        if byte < 0x80:
            return byte, position + 1
        result = 0
        shift = 0
        while True:
            byte = self.buffer[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, position
            shift += 7
            if shift >= 64:
                raise ValueError("varint too long")

    def fields(self, start: int, end: int) -> Optional[List[Tuple[int, int, int, int, int]]]:
        r"""``(number, wire type, field start, value start, value end)`` of each field in ``buffer[start:end]``.

        ``None`` for anything a well-formed proto3 message does not contain (groups, lengths past
        the end), which the caller leaves to protobuf to report, and once the budget is spent
        (``exhausted``).
        """
        found = []
        position = start
        # Locals, and one-byte varints read inline: the loop's cost per field is what the budget buys.
        buffer, read_varint, fields_left = self.buffer, self._read_varint, self._remaining
        try:
            while position < end:
                if fields_left == 0:
                    self.exhausted = True
                    return None
                fields_left -= 1
                field_start = position
                tag = buffer[position]
                if tag < 0x80:
                    position += 1
                else:
                    tag, position = read_varint(position)
                number, wire_type = tag >> 3, tag & 7
                value_start = position
                if wire_type == _WIRE_VARINT:
                    if buffer[position] < 0x80:
                        position += 1
                    else:
                        _, position = read_varint(position)
                elif wire_type == _WIRE_FIXED64:
                    position += 8
                elif wire_type == _WIRE_FIXED32:
                    position += 4
                elif wire_type == _WIRE_LENGTH_DELIMITED:
                    length, value_start = read_varint(position)
                    position = value_start + length
                else:
                    return None
                if number == 0 or position > end:
                    return None
                found.append((number, wire_type, field_start, value_start, position))
        except (IndexError, ValueError):
            return None
        finally:
            self._remaining = fields_left
        return found

    def split_payloads(self) -> Optional[Tuple[bytes, Dict[str, memoryview]]]:
        r"""The body without the viewed tensors' ``data`` fields, and views of those payloads."""
        buffer = self.buffer
        top_level = self.fields(0, len(buffer))
        if top_level is None:
            return None
        numbers = [number for number, *_ in top_level]
        # The fields between two viewed tensors are copied as one run.
        pieces: List[bytes] = []
        copied_up_to = 0
        payloads: Dict[str, memoryview] = {}
        for number, wire_type, field_start, value_start, value_end in top_level:
            name = VIEWED_TENSORS.get(number)
            if name is None or wire_type != _WIRE_LENGTH_DELIMITED:
                continue
            if numbers.count(number) > 1:
                return None  # protobuf merges repeated occurrences: leave that to it
            inner = self.fields(value_start, value_end)
            if inner is None:
                return None
            data_fields = [f for f in inner if f[0] == _TENSOR_DATA]
            if len(data_fields) > 1 or (data_fields and data_fields[0][1] != _WIRE_LENGTH_DELIMITED):
                return None
            kept = b"".join(bytes(buffer[f[2]:f[4]]) for f in inner if f[0] != _TENSOR_DATA)
            pieces.append(buffer[copied_up_to:field_start])
            pieces.append(_encode_varint(number << 3 | _WIRE_LENGTH_DELIMITED) + _encode_varint(len(kept)) + kept)
            copied_up_to = value_end
            payloads[name] = buffer[data_fields[0][3]:data_fields[0][4]] if data_fields else buffer[0:0]
        pieces.append(buffer[copied_up_to:])
        return b"".join(pieces), payloads
