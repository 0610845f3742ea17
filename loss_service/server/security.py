r"""Transport security and authentication: TLS credentials, bearer tokens, the exposure rule.

* TLS: ``--tls-cert``/``--tls-key`` (PEM) serve over TLS; ``--tls-client-ca`` also requires client
  certificates signed by that CA (mutual TLS). The files are checked when the server is built, so a
  wrong path, a file that is not PEM or a key that is not the certificate's is a :class:`ConfigError`
  (exit 2), not a handshake failure on the first call.
* Tokens: ``--token-file`` and ``LOSS_SERVICE_TOKENS`` (:func:`parse_tokens`). With at least one
  token, :class:`BearerTokenInterceptor` requires ``authorization: Bearer <token>`` on every call
  but the health checks; without tokens there is no interceptor at all (it costs every call).
* Exposure (:func:`loss_service.server.config.check_exposure`, checked again with the bound address):
  a non-loopback address needs TLS and tokens, or ``--insecure``.
"""
from __future__ import annotations

import hmac
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import grpc
from grpc_health.v1 import health

from loss_service.protocol import AUTHORIZATION, BEARER, ConfigError, read_token_file

from .config import ServerConfig, address_host, check_exposure, is_loopback
from .errors import ServiceError
from .logs import LOGGER_NAME, event

log = logging.getLogger(f"{LOGGER_NAME}.security")

# Kubernetes probes and load balancers check health without credentials.
_EXEMPT_PREFIX = f"/{health.SERVICE_NAME}/"
MISSING_TOKEN = "this server requires 'authorization: Bearer <token>' metadata"
WRONG_TOKEN = "the bearer token is not one this server accepts"


def _no_password() -> bytes:
    raise ConfigError("the private key is encrypted; gRPC needs it unencrypted (protect the file instead)")


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None


def server_credentials(config: ServerConfig) -> Optional[grpc.ServerCredentials]:
    r"""TLS credentials of ``config`` (``None``: plaintext), after checking that the files are usable PEM."""
    if not config.tls_cert:
        return None
    certificate, key = _read(config.tls_cert, "--tls-cert"), _read(config.tls_key, "--tls-key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.tls_cert, config.tls_key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: not a PEM certificate "
                          f"chain and its private key ({exc.reason or exc})") from None
    client_ca = None
    if config.tls_client_ca:
        client_ca = _read(config.tls_client_ca, "--tls-client-ca")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--tls-client-ca {config.tls_client_ca}: not PEM certificates ({exc})") from None
    return grpc.ssl_server_credentials([(key, certificate)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    r"""Every call but the health checks needs ``authorization: Bearer <token>`` with one of ``tokens``.

    No such metadata (or another scheme): ``UNAUTHENTICATED``; a token that is not accepted:
    ``PERMISSION_DENIED``. The presented token is compared with every accepted one in constant
    time, without stopping at a match, and no status or log line quotes it.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(token.encode("ascii") for token in tokens)

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if not method.startswith(_EXEMPT_PREFIX):
            error = self.refusal(handler_call_details.invocation_metadata)
            if error is not None:
                return _refusing_handler(error, method)
        return await continuation(handler_call_details)

    def refusal(self, metadata: Optional[Sequence[Tuple[str, str]]]) -> Optional[ServiceError]:
        r"""Why a call with this metadata is refused; ``None`` if its token is accepted."""
        value = next((value for key, value in metadata or () if key == AUTHORIZATION), None)
        scheme, _, token = (value or "").partition(" ")
        # The scheme is case-insensitive (RFC 7235).
        if scheme.lower() != BEARER.lower() or not token:
            return ServiceError(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
        presented = token.strip().encode("utf-8", "replace")
        # compare_digest's time depends on the lengths, not on the bytes (token lengths are no
        # secret). Hashing both first would hide the lengths too, at 7 us a call (measured).
        accepted = False
        for candidate in self._tokens:
            accepted |= hmac.compare_digest(presented, candidate)
        return None if accepted else ServiceError(grpc.StatusCode.PERMISSION_DENIED, WRONG_TOKEN)


def _refusing_handler(error: ServiceError, method: str) -> grpc.RpcMethodHandler:
    r"""A handler answering ``error`` without reading the request.

    Request-streaming whatever the method: a unary handler would first receive the whole message
    (up to --max-message-bytes) from a client that is not allowed to send it.
    """
    status = error.to_status()

    async def refuse(request_iterator, context: grpc.aio.ServicerContext) -> None:
        event(log, "refused", logging.WARNING, method=method, peer=context.peer(), code=error.code.name)
        await context.abort_with_status(status)

    return grpc.stream_unary_rpc_method_handler(refuse)


@dataclass(frozen=True)
class ServerSecurity:
    r"""What a server's settings ask for: its port's credentials and its interceptors."""

    credentials: Optional[grpc.ServerCredentials]
    interceptors: Tuple[grpc.aio.ServerInterceptor, ...]

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        r"""Bind ``address`` on ``server`` (TLS if configured); the bound port."""
        if self.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.credentials)


def load_server_security(config: ServerConfig, address: str) -> ServerSecurity:
    r"""Check the exposure of ``address``, load the TLS files and the tokens; :class:`ConfigError` if unusable."""
    host = address_host(address)
    check_exposure(host, config)
    credentials = server_credentials(config)
    tokens = tuple(dict.fromkeys((*config.tokens, *(read_token_file(config.token_file) if config.token_file else ()))))
    # --insecure on a reachable address: said at every start, where operators look.
    exposed = not is_loopback(host) and (credentials is None or not tokens)
    event(log, "security", logging.WARNING if exposed else logging.INFO, tls=credentials is not None,
          client_certificates=bool(config.tls_client_ca), tokens=len(tokens), reflection=config.reflection,
          exposed_without_tls_or_tokens=exposed)
    return ServerSecurity(credentials, (BearerTokenInterceptor(tokens),) if tokens else ())
