r"""``loss_service.v1.Tensor`` -> ``torch.Tensor``, checked, without copying the payload (the way
out is :func:`loss_service.protocol.to_message`).

A request's ``data`` bytes are viewed in place (``np.frombuffer`` -> ``torch.from_numpy``): the
resulting tensors are read-only views of the protobuf's bytes and are never written to. Decoding
validates, in this order: the dtype, the number of dimensions, negative dimensions, the element
limit for the whole tensor and for each dimension (``RESOURCE_EXHAUSTED``) and
``len(data) == prod(shape) * itemsize``.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import torch

from loss_service.protocol import SUPPORTED_DTYPE_NAMES, WIRE_DTYPES, view
from loss_service.v1 import loss_service_pb2 as pb

from .errors import invalid, too_large

# torch.from_numpy warns for every read-only array; the views made here are never written to
# (the loss kernels do not modify their inputs), so the warning carries no information.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

# Wire dtype -> torch dtype of the tensor its bytes become (bfloat16: viewed as uint16, reinterpreted).
TORCH_DTYPES: Dict[int, torch.dtype] = {
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
TORCH_TO_WIRE: Dict[torch.dtype, int] = {torch_dtype: wire for wire, torch_dtype in TORCH_DTYPES.items()}
# More than any loss needs ((N, C, *) with a few spatial dimensions), fewer than numpy's 64.
MAX_DIMENSIONS = 32


def dtype_name(dtype: torch.dtype) -> str:
    r"""The protocol's name of a torch dtype (``DTYPE_FLOAT32``), as messages to clients say it."""
    wire = TORCH_TO_WIRE.get(dtype)
    return pb.DType.Name(wire) if wire is not None else str(dtype)


def decode(tensor: pb.Tensor, field: str, max_elements: int, data: Optional[bytes] = None) -> torch.Tensor:
    r"""A read-only CPU tensor viewing ``tensor.data``; :class:`ServiceError` naming ``field`` otherwise.

    ``data`` replaces ``tensor.data`` when the payload was kept out of the message
    (:mod:`.wire`: a ``memoryview`` of the serialized request).
    """
    numpy_dtype = WIRE_DTYPES.get(tensor.dtype)
    if numpy_dtype is None:
        if tensor.dtype == pb.DTYPE_UNSPECIFIED:
            raise invalid(f"{field}.dtype", f"must be set; expected one of {SUPPORTED_DTYPE_NAMES}")
        raise invalid(f"{field}.dtype", f"unsupported dtype {tensor.dtype}; expected one of {SUPPORTED_DTYPE_NAMES}")
    if len(tensor.shape) > MAX_DIMENSIONS:
        raise invalid(f"{field}.shape", f"has {len(tensor.shape)} dimensions; expected at most {MAX_DIMENSIONS}")
    shape = list(tensor.shape)
    for dim, size in enumerate(shape):
        if size < 0:
            raise invalid(f"{field}.shape", f"dimension {dim} is {size}; expected sizes >= 0, got shape {shape}")
        if size > max_elements:
            # Even beside a zero (an empty tensor) a larger dimension cannot be a tensor this server
            # would compute with; numpy and torch reject such shapes themselves.
            raise too_large(
                f"{field}.shape",
                f"dimension {dim} is {size} (shape {shape}), over the server's limit of {max_elements} elements per tensor",
            )
    count = math.prod(shape)
    if count > max_elements:
        raise too_large(
            f"{field}.shape",
            f"{count} elements (shape {shape}) exceed the server's limit of {max_elements} elements per tensor",
        )
    if data is None:
        data = tensor.data
    expected = count * numpy_dtype.itemsize
    if len(data) != expected:
        raise invalid(
            f"{field}.data",
            f"has {len(data)} bytes; expected {expected} = {count} elements of shape {shape} x "
            f"{numpy_dtype.itemsize} bytes ({pb.DType.Name(tensor.dtype)})",
        )
    result = torch.from_numpy(view(tensor, data))
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        result = result.view(torch.bfloat16)
    return result
