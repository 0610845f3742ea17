r"""Request errors and the one place that turns them into gRPC statuses.

Every rejected request carries a status code, a message that names the offending field and what was
expected, and the same information as ``google.rpc.BadRequest`` field violations (the rich error
model of ``grpcio-status``) so that clients can read it without parsing text.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

FieldViolation = Tuple[str, str]


class ServiceError(Exception):
    r"""A request the service refuses: a gRPC status code plus ``(field, description)`` violations."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations: List[FieldViolation] = list(violations)

    def in_batch(self, index: int) -> "ServiceError":
        r"""The same error located in batch ``index`` of a stream (``batches[index].<field>``)."""
        return ServiceError(
            self.code,
            f"batch {index}: {self.message}",
            [(f"batches[{index}].{field}", description) for field, description in self.violations],
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
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{field}: {description}", [(field, description)])


def unavailable_backend(field: str, description: str) -> ServiceError:
    r"""``FAILED_PRECONDITION``: a valid request this server cannot run (e.g. no artifact for it)."""
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"{field}: {description}", [(field, description)])


# TorchScript re-raises a scripted ``raise ValueError(msg)`` as torch.jit.Error whose text ends with
# "builtins.ValueError: msg".
_SCRIPTED_VALUE_ERROR = re.compile(r"builtins\.ValueError: (.*)", re.DOTALL)


def library_value_error(exc: BaseException) -> Optional[str]:
    r"""The message of a loss-library ``ValueError``, also when raised inside a TorchScript module."""
    if isinstance(exc, ValueError):
        return str(exc)
    if isinstance(exc, torch.jit.Error):
        match = _SCRIPTED_VALUE_ERROR.search(str(exc))
        if match:
            return match.group(1).strip().splitlines()[0]
    return None


def from_library_message(message: str, fields: Iterable[Tuple[str, str]], default_field: str) -> ServiceError:
    r"""Map a loss-library ``ValueError`` message to the request field it is about.

    The library names the parameter or input in its messages ("targets must have the shape of
    predictions", "class_weight must have one entry per class", ...). ``fields`` pairs each name the
    library uses with the request field that carries it (``class_weight`` -> ``class_weights``); the
    name mentioned first in the message decides, as the subject of the sentence.
    """
    best: Optional[Tuple[int, str]] = None
    for library_name, request_field in fields:
        match = re.search(rf"(?<![\w.]){re.escape(library_name)}(?!\w)", message)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), request_field)
    field = best[1] if best else default_field
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", [(field, message)])


__all__ = [
    "FieldViolation",
    "ServiceError",
    "invalid",
    "too_large",
    "unavailable_backend",
    "library_value_error",
    "from_library_message",
]
