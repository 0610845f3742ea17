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

:func:`statistics_message` and :func:`read_statistics` convert :class:`~loss_service.statistics.Statistics`
(mergeable results) to and from their ``Statistics`` message, checking everything a reader relies on.

torch is imported only by the functions that are given or asked for torch tensors, so that a
client needs only grpcio, protobuf and numpy.
"""
from __future__ import annotations

import math
import threading
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np

from loss_service.protocol import REDUCTIONS
from loss_service.statistics import MAX_GROUPS, STATISTICS_VERSION, Statistics
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
    r"""A message that cannot be read: ``field`` (of a ``Tensor``: ``<name>.dtype``, ``.shape`` or ``.data``)
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


_REDUCTION_NAMES = {wire: name for name, wire in REDUCTIONS.items()}


def _param_message(value: Any) -> pb.NamedParam:
    if isinstance(value, np.ndarray):
        return pb.NamedParam(tensor=to_message(value))
    if isinstance(value, (bool, np.bool_)):
        return pb.NamedParam(value=pb.Param(bool_value=bool(value)))
    if isinstance(value, (int, np.integer)):
        return pb.NamedParam(value=pb.Param(int_value=int(value)))
    if isinstance(value, str):
        return pb.NamedParam(value=pb.Param(string_value=value))
    return pb.NamedParam(value=pb.Param(double_value=float(value)))


def statistics_message(stats: Statistics) -> pb.Statistics:
    r"""The ``Statistics`` message of ``stats`` (parameters sorted by name)."""
    message = pb.Statistics(
        version=stats.version, loss=stats.loss, reduction=REDUCTIONS[stats.reduction], layout=list(stats.layout),
        num_batches=stats.num_batches,
    )
    for name in sorted(stats.params):
        entry = message.params.add()
        entry.CopyFrom(_param_message(stats.params[name]))
        entry.name = name
    message.totals.CopyFrom(to_message(np.asarray(stats.totals, dtype=np.float64)))
    if stats.grouped:
        message.group_ids.CopyFrom(to_message(np.asarray(stats.group_ids, dtype=np.int64)))
        message.group_totals.CopyFrom(to_message(np.asarray(stats.group_totals, dtype=np.float64)))
    if stats.per_class:
        message.class_layout.extend(stats.class_layout or ())
        message.class_totals.CopyFrom(to_message(np.asarray(stats.class_totals, dtype=np.float64)))
    return message


def _float64_array(tensor: pb.Tensor, field: str, shape: Tuple[int, ...], max_elements: float) -> np.ndarray:
    r"""A finite float64 array of ``shape`` from ``tensor``."""
    array = checked_view(tensor, field, max_elements)
    if tensor.dtype != pb.DTYPE_FLOAT64:
        raise TensorError(f"{field}.dtype", f"must be DTYPE_FLOAT64, got {pb.DType.Name(tensor.dtype)}")
    if array.shape != shape:
        raise TensorError(f"{field}.shape", f"must be {list(shape)}, got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise TensorError(field, "must be finite, found NaN or Inf")
    return array.astype(np.float64)


def _param_value(entry: pb.NamedParam, field: str, max_elements: float) -> Any:
    has_tensor, which = entry.HasField("tensor"), entry.value.WhichOneof("value")
    if has_tensor == (which is not None):
        raise TensorError(field, "must hold either a scalar `value` or a vector `tensor`")
    if which is not None:
        return getattr(entry.value, which)
    vector = checked_view(entry.tensor, f"{field}.tensor", max_elements)
    if entry.tensor.dtype not in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64) or vector.ndim != 1:
        raise TensorError(f"{field}.tensor", "must be a 1-D DTYPE_FLOAT32 or DTYPE_FLOAT64 per-class vector")
    return vector.astype(vector.dtype.newbyteorder("="))


def read_statistics(message: pb.Statistics, field: str = "statistics", max_elements: float = math.inf) -> Statistics:
    r"""The :class:`Statistics` of ``message``; :class:`TensorError` naming the field that cannot be read: a
    version other than :data:`STATISTICS_VERSION`, no loss, a parameter twice or without a value, a layout
    whose length is not the totals', totals that are not finite float64, group labels that are not distinct
    ascending int64 (at most :data:`MAX_GROUPS`), group totals that are not ``(G, K)`` or class totals that are
    not ``(C, K_c)`` for a class layout of ``K_c`` names. Whether the loss,
    its parameters and the layout agree is the reader's library's to say."""
    if message.version != STATISTICS_VERSION:
        raise TensorError(f"{field}.version", f"must be {STATISTICS_VERSION} (this reader's version), got {message.version}")
    if not message.loss:
        raise TensorError(f"{field}.loss", "must be set")
    params: Dict[str, Any] = {}
    for index, entry in enumerate(message.params):
        where = f"{field}.params[{index}]"
        if not entry.name or entry.name in params:
            raise TensorError(f"{where}.name", f"must be a parameter's name, each given once, got '{entry.name[:64]}'")
        params[entry.name] = _param_value(entry, where, max_elements)
    reduction = _REDUCTION_NAMES.get(message.reduction)
    if reduction is None:
        raise TensorError(f"{field}.reduction", f"must be one of {', '.join(pb.Reduction.keys()[1:])}, got {message.reduction}")
    if not message.HasField("totals"):
        raise TensorError(f"{field}.totals", "must be set")
    layout = tuple(message.layout)
    totals = _float64_array(message.totals, f"{field}.totals", (len(layout),), max_elements)
    group_ids = group_totals = None
    if message.HasField("group_ids") or message.HasField("group_totals"):
        group_ids = checked_view(message.group_ids, f"{field}.group_ids", MAX_GROUPS)
        if message.group_ids.dtype != pb.DTYPE_INT64 or group_ids.ndim != 1:
            raise TensorError(f"{field}.group_ids", "must be a 1-D DTYPE_INT64 tensor of group labels")
        if group_ids.size > 1 and not (np.diff(group_ids) > 0).all():
            raise TensorError(f"{field}.group_ids", "must hold distinct labels in ascending order")
        group_totals = _float64_array(
            message.group_totals, f"{field}.group_totals", (group_ids.size, len(layout)), max_elements
        )
        group_ids = group_ids.astype(np.int64)
    if message.num_batches < 1:
        raise TensorError(f"{field}.num_batches", f"must be at least 1, got {message.num_batches}")
    class_layout = class_totals = None
    if message.class_layout or message.HasField("class_totals"):
        class_layout = tuple(message.class_layout)
        if not class_layout:
            raise TensorError(f"{field}.class_layout", "must name the columns of class_totals")
        if not message.HasField("class_totals"):
            raise TensorError(f"{field}.class_totals", "must be set with a class_layout")
        rows = checked_view(message.class_totals, f"{field}.class_totals", max_elements)
        if rows.ndim != 2:
            raise TensorError(f"{field}.class_totals.shape", f"must be (C, {len(class_layout)}), got {list(rows.shape)}")
        class_totals = _float64_array(
            message.class_totals, f"{field}.class_totals", (rows.shape[0], len(class_layout)), max_elements
        )
    return Statistics(
        loss=message.loss, params=params, reduction=reduction, layout=layout, totals=totals, group_ids=group_ids,
        group_totals=group_totals, num_batches=message.num_batches, class_layout=class_layout,
        class_totals=class_totals,
    )
