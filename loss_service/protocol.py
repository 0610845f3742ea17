r"""What both ends of the ``loss_service.v1`` protocol agree on besides tensors (those are
:mod:`loss_service.codec`'s): the service's name, the default message limit, and bearer-token
authentication; no torch, so that a client needs only grpcio, protobuf and numpy.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence, Tuple

from loss_service.v1 import loss_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name
# Where a server listens by default, and where the command line's client looks for one.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
# The protocol's reductions and backends by the names the client, the command line and the server use.
REDUCTIONS = {
    "mean": pb.REDUCTION_MEAN,
    "sum": pb.REDUCTION_SUM,
    "none": pb.REDUCTION_NONE,
    "weighted_mean": pb.REDUCTION_WEIGHTED_MEAN,
}
BACKENDS = {"eager": pb.BACKEND_EAGER, "torchscript": pb.BACKEND_TORCHSCRIPT, "onnx": pb.BACKEND_ONNX}
# The server's default --max-message-bytes, and the client's default limit to match it (gRPC's own
# default, 4 MiB, is far below a large batch).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
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
