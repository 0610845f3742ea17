r"""The ``loss_service.v1`` wire protocol as both ends read it, with numpy only (no torch).

A ``Tensor`` message holds ``prod(shape)`` elements of ``dtype`` as row-major little-endian bytes.
:data:`WIRE_DTYPES` maps each wire dtype to the numpy dtype its bytes are viewed with (numpy has no
bfloat16: its bytes are viewed as ``uint16``). :func:`to_message` and :func:`to_numpy` convert
arrays; torch tensors are accepted too (converted through numpy) without this module importing
torch, so that a client needs only grpcio, protobuf and numpy. The server's checked, zero-copy
decoding builds on :func:`view` (:mod:`loss_service.server.codec`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from loss_service.v1 import loss_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name
# The server's default --max-message-bytes, and the client's default limit to match it (gRPC's own
# default, 4 MiB, is far below a large batch).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
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
# Call metadata of bearer-token authentication.
AUTHORIZATION = "authorization"
BEARER = "Bearer"
# A bearer token is RFC 6750's token68 (what `openssl rand -hex 32` and `secrets.token_urlsafe`
# print): no spaces, commas or '#', so a token list can use them as separators and comments.
TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_TOKEN_SEPARATORS = re.compile(r"[\s,]+")


class ConfigError(ValueError):
    r"""A setting that cannot be honoured (e.g. ``--device cuda`` on a machine without a GPU, a token
    file without a token)."""


def bearer_metadata(token: str) -> Tuple[Tuple[str, str]]:
    r"""The call metadata that presents ``token`` (what the server's token check reads)."""
    return ((AUTHORIZATION, f"{BEARER} {token}"),)


def parse_tokens(text: str, source: str) -> Tuple[str, ...]:
    r"""The tokens of ``text``: separated by newlines, spaces or commas; ``#`` starts a comment.

    ``source`` names where ``text`` came from in error messages, which never quote a token.
    """
    tokens = [token for line in text.splitlines()
              for token in _TOKEN_SEPARATORS.split(line.partition("#")[0]) if token]
    if not tokens:
        raise ConfigError(f"{source} holds no token (separate tokens by lines, spaces or commas; '#' starts a comment)")
    check_tokens(tokens, source)
    return tuple(tokens)


def check_tokens(tokens: Sequence[str], source: str) -> None:
    r"""A :class:`ConfigError` naming the first of ``tokens`` (by position) that is not a bearer token."""
    for index, token in enumerate(tokens, start=1):
        if not isinstance(token, str) or not TOKEN.fullmatch(token):
            raise ConfigError(f"{source}: token {index} has a character a bearer token cannot have "
                              "(letters, digits and -._~+/ then '=' padding only)")


def read_token_file(path: str) -> Tuple[str, ...]:
    r"""The tokens of the file ``path`` (:func:`parse_tokens`); :class:`ConfigError` if it has none."""
    source = f"token file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {source}: {exc}") from None
    return parse_tokens(text, source)


def view(tensor: pb.Tensor, data: Optional[bytes] = None) -> np.ndarray:
    r"""The elements of ``tensor`` (or of ``data``, its payload held elsewhere) as a read-only array
    of its shape, viewing the bytes in place; the caller has checked the dtype and the length."""
    return np.frombuffer(tensor.data if data is None else data, dtype=WIRE_DTYPES[tensor.dtype]).reshape(
        tuple(tensor.shape))


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


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    r"""A ``Tensor`` message as a writable numpy array (bfloat16 arrives as float32: numpy has no bfloat16)."""
    expected = math.prod(tensor.shape) * WIRE_DTYPES[tensor.dtype].itemsize
    if len(tensor.data) != expected:
        raise ValueError(f"a tensor of shape {list(tensor.shape)} ({pb.DType.Name(tensor.dtype)}) needs {expected} "
                         f"bytes, got {len(tensor.data)}")
    array = view(tensor)
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        # bfloat16 is the upper half of a float32.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="))
