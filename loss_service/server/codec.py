r"""``loss_service.v1.Tensor`` <-> ``torch.Tensor`` without copying the payload on the way in.

A request's ``data`` bytes are viewed in place (``np.frombuffer`` -> ``torch.from_numpy``): the
resulting tensors are read-only views of the protobuf's bytes and are never written to. Decoding
validates, in this order: the dtype, the number of dimensions, negative dimensions, the element
limit for the whole tensor and for each dimension (``RESOURCE_EXHAUSTED``) and
``len(data) == prod(shape) * itemsize``.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from loss_service.v1 import loss_service_pb2 as pb

from .errors import invalid, too_large

# torch.from_numpy warns for every read-only array; the views made here are never written to
# (the loss kernels do not modify their inputs), so the warning carries no information.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

# Wire dtype -> (numpy dtype to view the little-endian bytes with, torch dtype of the tensor).
# numpy has no bfloat16: its bytes are viewed as uint16 and reinterpreted by torch.
WIRE_DTYPES: Dict[int, Tuple[np.dtype, torch.dtype]] = {
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), torch.float32),
    pb.DTYPE_FLOAT64: (np.dtype("<f8"), torch.float64),
    pb.DTYPE_FLOAT16: (np.dtype("<f2"), torch.float16),
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), torch.bfloat16),
    pb.DTYPE_INT64: (np.dtype("<i8"), torch.int64),
    pb.DTYPE_INT32: (np.dtype("<i4"), torch.int32),
    pb.DTYPE_INT16: (np.dtype("<i2"), torch.int16),
    pb.DTYPE_INT8: (np.dtype("i1"), torch.int8),
    pb.DTYPE_UINT8: (np.dtype("u1"), torch.uint8),
    pb.DTYPE_BOOL: (np.dtype("?"), torch.bool),
}
TORCH_TO_WIRE: Dict[torch.dtype, int] = {torch_dtype: wire for wire, (_, torch_dtype) in WIRE_DTYPES.items()}
SUPPORTED_DTYPE_NAMES = ", ".join(pb.DType.Name(wire) for wire in WIRE_DTYPES)
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
    wire = WIRE_DTYPES.get(tensor.dtype)
    if wire is None:
        if tensor.dtype == pb.DTYPE_UNSPECIFIED:
            raise invalid(f"{field}.dtype", f"must be set; expected one of {SUPPORTED_DTYPE_NAMES}")
        raise invalid(f"{field}.dtype", f"unsupported dtype {tensor.dtype}; expected one of {SUPPORTED_DTYPE_NAMES}")
    numpy_dtype, torch_dtype = wire
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
    array = np.frombuffer(data, dtype=numpy_dtype).reshape(shape)
    result = torch.from_numpy(array)
    if torch_dtype == torch.bfloat16:
        result = result.view(torch.bfloat16)
    return result


def encode(tensor: torch.Tensor, out: Optional[pb.Tensor] = None) -> pb.Tensor:
    r"""Fill ``out`` (or a new message) with ``tensor``'s row-major little-endian bytes."""
    wire = TORCH_TO_WIRE.get(tensor.dtype)
    if wire is None:
        raise TypeError(f"cannot encode a tensor of dtype {tensor.dtype}")
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    message = pb.Tensor() if out is None else out
    message.dtype = wire
    message.shape[:] = list(tensor.shape)
    message.data = tensor.numpy().tobytes()
    return message


def to_message(array, field: str = "tensor") -> pb.Tensor:
    r"""A numpy array or torch tensor as a ``Tensor`` message (used by the client)."""
    if isinstance(array, torch.Tensor):
        return encode(array)
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    # np.ascontiguousarray would turn a 0-d array into shape (1,).
    tensor = torch.from_numpy(array if array.flags.c_contiguous else np.ascontiguousarray(array))
    if tensor.dtype not in TORCH_TO_WIRE:
        raise TypeError(f"{field}: unsupported dtype {array.dtype}; supported: {SUPPORTED_DTYPE_NAMES}")
    return encode(tensor)


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    r"""A ``Tensor`` message as a numpy array (bfloat16 arrives as float32: numpy has no bfloat16)."""
    decoded = decode(tensor, "tensor", max_elements=math.inf)
    if decoded.dtype == torch.bfloat16:
        decoded = decoded.float()
    return decoded.numpy()
