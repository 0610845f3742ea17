r"""``loss_service.v1.Tensor`` messages to and from numpy arrays and torch tensors: the one codec of
the client and the server.

A ``Tensor`` message holds ``prod(shape)`` elements of ``dtype`` as row-major little-endian bytes.
:data:`WIRE_DTYPES` maps each wire dtype to the numpy dtype its bytes are viewed with (numpy has no
bfloat16: its bytes are viewed as ``uint16``).

* :func:`to_message` sends a numpy array (or anything ``np.asarray`` takes) or a torch tensor.
* :func:`checked_view` reads a message: it validates, in this order, the dtype, the number of
  dimensions, negative dimensions, the element limit for the whole tensor and for each dimension,
  and ``len(data) == prod(shape) * itemsize``, then views the bytes in place. :func:`to_numpy`
  copies that view into a writable array (a client's results); :func:`to_tensor` wraps it in a
  read-only torch tensor without copying (a server's requests).

torch is imported only by the functions that are given or asked for torch tensors, so that a
client needs only grpcio, protobuf and numpy.
"""
from __future__ import annotations

import math
import threading
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np

from loss_service.v1 import loss_service_pb2 as pb

if TYPE_CHECKING:
    import torch

# Wire dtype -> the little-endian numpy dtype its bytes are viewed with.
WIRE_DTYPES: Dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
# numpy dtype (native order) -> wire dtype, for arrays a client sends (bfloat16 comes from torch only).
NUMPY_TO_WIRE: Dict[np.dtype, int] = {
    dtype.newbyteorder("="): wire for wire, dtype in WIRE_DTYPES.items() if wire != pb.DTYPE_BFLOAT16
}
SUPPORTED_DTYPE_NAMES = ", ".join(pb.DType.Name(wire) for wire in WIRE_DTYPES)
# torch's name of each wire dtype's tensors (torch.float32) -> the protocol's (DTYPE_FLOAT32).
_PROTOCOL_NAMES = {"torch." + pb.DType.Name(wire)[len("DTYPE_"):].lower(): pb.DType.Name(wire) for wire in WIRE_DTYPES}
# More than any loss needs ((N, C, *) with a few spatial dimensions), fewer than numpy's 64.
MAX_DIMENSIONS = 32
# torch.from_numpy warns once per process for a read-only array (torch's TORCH_WARN_ONCE).
_NOT_WRITABLE_WARNING = "The given NumPy array is not writable"


class TensorError(ValueError):
    r"""A ``Tensor`` message that cannot be read: ``field`` (``<name>.dtype``, ``.shape`` or ``.data``)
    and what is wrong with it; ``too_large`` when it is over the element limit."""

    def __init__(self, field: str, description: str, too_large: bool = False) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description
        self.too_large = too_large


def dtype_name(dtype: Any) -> str:
    r"""The protocol's name (``DTYPE_FLOAT32``) of a torch dtype or of its name (``torch.float32``),
    as messages to clients say it; other dtypes keep their own name."""
    return _PROTOCOL_NAMES.get(str(dtype), str(dtype))


def to_message(array: Any, field: str = "tensor") -> pb.Tensor:
    r"""A numpy array (or anything ``np.asarray`` takes) or a torch tensor as a ``Tensor`` message.

    ``TypeError`` naming ``field`` for what cannot be sent (``None``, ragged lists, strings, objects).
    """
    if array is None:
        raise TypeError(f"{field}: required, got None; expected a numpy array or a torch tensor")
    wire = None
    if type(array).__module__.startswith("torch"):
        array, wire = _torch_array(array)
    try:
        array = np.asarray(array)
    except ValueError as error:  # ragged nested lists
        raise TypeError(f"{field}: not an array ({error})") from None
    if wire is None:
        wire = NUMPY_TO_WIRE.get(array.dtype.newbyteorder("="))
        if wire is None:
            found = f"dtype {array.dtype}" + (" (None values, ragged lists or Python objects?)" if array.dtype == object else "")
            raise TypeError(f"{field}: cannot send an array of {found}; supported: {SUPPORTED_DTYPE_NAMES}")
    # The shape is the array's own: np.ascontiguousarray would make a 0-d array 1-d.
    return pb.Tensor(dtype=wire, shape=array.shape, data=np.ascontiguousarray(array, dtype=WIRE_DTYPES[wire]).tobytes())


def _torch_array(tensor: Any) -> Tuple[np.ndarray, Optional[int]]:
    r"""A torch tensor's values as numpy, and its wire dtype when numpy has none (bfloat16)."""
    import torch  # loaded already: the caller passed one of its tensors

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy(), pb.DTYPE_BFLOAT16
    return tensor.numpy(), None


def checked_view(tensor: pb.Tensor, field: str, max_elements: float, data: Optional[bytes] = None) -> np.ndarray:
    r"""The elements of ``tensor`` as a read-only array of its shape, viewing the bytes in place;
    :class:`TensorError` naming ``field`` when the message cannot be read (see the module docstring).

    ``data`` replaces ``tensor.data`` when the payload was kept out of the message (the server's
    :mod:`loss_service.server.wire`: a ``memoryview`` of the serialized request).
    """
    numpy_dtype = WIRE_DTYPES.get(tensor.dtype)
    if numpy_dtype is None:
        if tensor.dtype == pb.DTYPE_UNSPECIFIED:
            raise TensorError(f"{field}.dtype", f"must be set; expected one of {SUPPORTED_DTYPE_NAMES}")
        raise TensorError(f"{field}.dtype", f"unsupported dtype {tensor.dtype}; expected one of {SUPPORTED_DTYPE_NAMES}")
    if len(tensor.shape) > MAX_DIMENSIONS:
        raise TensorError(f"{field}.shape", f"has {len(tensor.shape)} dimensions; expected at most {MAX_DIMENSIONS}")
    shape = list(tensor.shape)
    for dim, size in enumerate(shape):
        if size < 0:
            raise TensorError(f"{field}.shape", f"dimension {dim} is {size}; expected sizes >= 0, got shape {shape}")
        if size > max_elements:
            # Even beside a zero (an empty tensor) a larger dimension cannot be a tensor this reader
            # would compute with; numpy and torch reject such shapes themselves.
            raise TensorError(
                f"{field}.shape",
                f"dimension {dim} is {size} (shape {shape}), over the server's limit of {max_elements} elements per tensor",
                too_large=True,
            )
    count = math.prod(shape)
    if count > max_elements:
        raise TensorError(
            f"{field}.shape",
            f"{count} elements (shape {shape}) exceed the server's limit of {max_elements} elements per tensor",
            too_large=True,
        )
    if data is None:
        data = tensor.data
    expected = count * numpy_dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{field}.data",
            f"has {len(data)} bytes; expected {expected} = {count} elements of shape {shape} x "
            f"{numpy_dtype.itemsize} bytes ({pb.DType.Name(tensor.dtype)})",
        )
    return np.frombuffer(data, dtype=numpy_dtype).reshape(shape)


def to_numpy(tensor: pb.Tensor, field: str = "tensor") -> np.ndarray:
    r"""A ``Tensor`` message as a writable numpy array (bfloat16 arrives as float32: numpy has no bfloat16)."""
    array = checked_view(tensor, field, math.inf)
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        # bfloat16 is the upper half of a float32.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="))


def to_tensor(tensor: pb.Tensor, field: str, max_elements: int, data: Optional[bytes] = None) -> "torch.Tensor":
    r"""A read-only CPU tensor viewing the bytes of ``tensor`` (or ``data``), never copied: it must
    not be written to. :class:`TensorError` as :func:`checked_view`."""
    import torch  # the caller computes with torch: loaded already

    array = checked_view(tensor, field, max_elements, data)
    result = torch.from_numpy(array) if _warned_once else _first_from_numpy(array)
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        result = result.view(torch.bfloat16)
    return result


# Whether torch has spent its one "not writable" warning (under _first_lock): later calls cannot warn.
_warned_once = False
_first_lock = threading.Lock()


def _first_from_numpy(array: np.ndarray) -> "torch.Tensor":
    r"""``torch.from_numpy`` without its warning about read-only arrays, which says nothing here.

    torch gives that warning once per process, so only the calls until then are wrapped:
    ``warnings.catch_warnings`` swaps the process's filter list (not thread-safe, and it resets
    every module's record of warnings already shown) and would more than double a small decode.
    """
    global _warned_once
    import torch

    with _first_lock:
        if array.flags.writeable:
            return torch.from_numpy(array)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_WRITABLE_WARNING, category=UserWarning)
            result = torch.from_numpy(array)
        _warned_once = True
        return result
