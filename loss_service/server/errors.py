r"""Request errors and the one place that turns them into gRPC statuses.

Every rejected request carries a status code, a message that names the offending field and what was
expected, and the same information as ``google.rpc.BadRequest`` field violations (the rich error
model of ``grpcio-status``) so that clients can read it without parsing text.

Statuses are bounded whatever a client sends: text taken from a request (a loss name, a parameter
name) is quoted through :func:`echo`, and every message and description is cut to
:data:`MAX_TEXT_CHARACTERS`, so a status stays far below gRPC's 8 KiB metadata budget.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from loss_service.codec import dtype_name

FieldViolation = Tuple[str, str]

# Client text quoted in a status: enough to recognise a name, never the whole of a huge one.
ECHO_CHARACTERS = 64
# Longest message or field-violation description a status carries (the status travels in
# grpc-message and grpc-status-details-bin headers; clients refuse headers over 8-16 KiB).
MAX_TEXT_CHARACTERS = 1024
MAX_VIOLATIONS = 4


def echo(text: str) -> str:
    r"""``text`` as a status may quote it: printable ASCII (other characters escaped), at most
    :data:`ECHO_CHARACTERS` of it, with the full length said when it is cut."""
    if len(text) <= ECHO_CHARACTERS and text.isascii() and text.isprintable():
        return text
    shown = text[:ECHO_CHARACTERS].encode("unicode_escape").decode("ascii")
    if len(text) <= ECHO_CHARACTERS:
        return shown
    return f"{shown}... ({len(text)} characters)"


def _bounded(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARACTERS:
        return text
    return text[: MAX_TEXT_CHARACTERS - 16] + f"... ({len(text)} characters)"


# Why a request was refused for what it would cost (ServiceError.reason, the label of the refused
# requests metric): the in-flight memory budget, or a tensor over the server's element limit.
REFUSED_FOR_MEMORY = "memory"
REFUSED_FOR_SIZE = "size"
REFUSAL_REASONS = (REFUSED_FOR_MEMORY, REFUSED_FOR_SIZE)


class ServiceError(Exception):
    r"""A request the service refuses: a gRPC status code plus ``(field, description)`` violations,
    and for a refusal of what it would cost, the ``reason`` (one of :data:`REFUSAL_REASONS`)."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation] = (),
                 reason: Optional[str] = None) -> None:
        message = _bounded(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations: List[FieldViolation] = [
            (_bounded(field), _bounded(description)) for field, description in violations[:MAX_VIOLATIONS]
        ]
        self.reason = reason

    def in_batch(self, index: int) -> "ServiceError":
        r"""The same error located in batch ``index`` of a stream (``batches[index].<field>``)."""
        return ServiceError(
            self.code,
            f"batch {index}: {self.message}",
            [(f"batches[{index}].{field}", description) for field, description in self.violations],
            self.reason,
        )

    def to_status(self) -> grpc.Status:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                    for field, description in self.violations
                ]
            )
        )
        return rpc_status.to_status(
            status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        )


def invalid(field: str, description: str) -> ServiceError:
    r"""``INVALID_ARGUMENT`` for one field; the message is ``"<field>: <description>"``."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", [(field, description)])


def too_large(field: str, description: str) -> ServiceError:
    r"""``RESOURCE_EXHAUSTED`` for one field (a request over the server's element limit)."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{field}: {description}", [(field, description)],
                        reason=REFUSED_FOR_SIZE)


def over_budget(description: str) -> ServiceError:
    r"""``RESOURCE_EXHAUSTED`` without a field: the server's in-flight memory budget is in use."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, description, reason=REFUSED_FOR_MEMORY)


def unavailable_backend(field: str, description: str) -> ServiceError:
    r"""``FAILED_PRECONDITION``: a valid request this server cannot run (e.g. no artifact for it)."""
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"{field}: {description}", [(field, description)])


# TorchScript re-raises a scripted ``raise ValueError(msg)`` as torch.jit.Error whose text ends with
# "builtins.ValueError: msg".
_SCRIPTED_VALUE_ERROR = re.compile(r"builtins\.ValueError: (.*)", re.DOTALL)


def library_value_error(exc: BaseException) -> Optional[str]:
    r"""The message of a loss-library ``ValueError``, also when raised inside a TorchScript module."""
    import torch  # the backends' module: loaded already when a loss has raised

    if isinstance(exc, ValueError):
        return str(exc)
    if isinstance(exc, torch.jit.Error):
        match = _SCRIPTED_VALUE_ERROR.search(str(exc))
        if match:
            return match.group(1).strip().splitlines()[0]
    return None


# A torch dtype's name in the library's messages (str(torch.float32) == "torch.float32").
_TORCH_DTYPE = re.compile(r"\btorch\.\w+")


def protocol_dtype_names(message: str) -> str:
    r"""``message`` of the loss library with its dtype names as the protocol's (``torch.float32`` -> ``DTYPE_FLOAT32``)."""
    return _TORCH_DTYPE.sub(lambda match: dtype_name(match.group(0)), message)


def from_library_message(message: str, fields: Iterable[Tuple[str, str]], default_field: str) -> ServiceError:
    r"""Map a loss-library ``ValueError`` message to the request field it is about.

    The library names the parameter or input in its messages ("targets must have the shape of
    predictions", "class_weight must have one entry per class", ...). ``fields`` pairs each name the
    library uses with the request field that carries it (``class_weight`` -> ``class_weights``); the
    name mentioned first in the message decides, as the subject of the sentence. Dtype names become
    the protocol's (:func:`protocol_dtype_names`).
    """
    message = protocol_dtype_names(message)
    best: Optional[Tuple[int, str]] = None
    for library_name, request_field in fields:
        match = re.search(rf"(?<![\w.]){re.escape(library_name)}(?!\w)", message)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), request_field)
    field = best[1] if best else default_field
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", [(field, message)])


__all__ = [
    "FieldViolation",
    "REFUSAL_REASONS",
    "REFUSED_FOR_MEMORY",
    "REFUSED_FOR_SIZE",
    "ServiceError",
    "invalid",
    "too_large",
    "over_budget",
    "echo",
    "unavailable_backend",
    "library_value_error",
    "from_library_message",
    "protocol_dtype_names",
]
