r"""``loss-service serve`` (``python -m loss_service serve``): the server's command line.

Each flag falls back to its ``LOSS_SERVICE_*`` environment variable (:data:`.config.ENVIRONMENT`),
then to :class:`.config.ServerConfig`'s default; ``loss-service serve --help`` lists them and
docs/service.md explains them. Only the settings are loaded until the flags are read, so that
``--help`` is quick; the server's modules (torch) come after.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

from loss_service.protocol import SERVICE_NAME, ConfigError, parse_tokens

from .config import BACKEND_CHOICES, ENVIRONMENT, ServerConfig

def _env(name: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
    value = os.environ.get(ENVIRONMENT[name])
    if value is None or value == "":
        return default
    try:
        return convert(value)
    except ValueError:
        raise SystemExit(f"error: environment variable {ENVIRONMENT[name]}={value!r} is not a valid {convert.__name__}")


def parser() -> argparse.ArgumentParser:
    r"""The flags of ``serve``, each defaulting to its environment variable, else to :class:`ServerConfig`'s default."""
    defaults = ServerConfig()
    flags = argparse.ArgumentParser(
        prog="loss-service serve", description=f"Serve {SERVICE_NAME} over gRPC until SIGTERM or SIGINT.")
    flags.add_argument("--host", default=_env("host", defaults.host), help="address to listen on (%(default)s)")
    flags.add_argument("--port", type=int, default=_env("port", defaults.port, int),
                        help="port; 0 picks a free one, printed in the 'listening' log line (%(default)s)")
    flags.add_argument("--backend", choices=BACKEND_CHOICES, default=_env("backend", defaults.backend),
                        help="backend of requests that leave it unspecified; auto = eager (%(default)s)")
    flags.add_argument("--device", default=_env("device", defaults.device),
                        help="auto, cpu, cuda or cuda:N; explicit cuda without a GPU is a start error (%(default)s)")
    flags.add_argument("--artifacts", default=_env("artifacts", defaults.artifacts),
                        help="folder of <loss>.pt/.onnx + manifest.json, exported on start if missing (%(default)s)")
    flags.add_argument("--max-message-bytes", type=int, default=_env("max_message_bytes", defaults.max_message_bytes, int),
                        help="largest request/response message (%(default)s)")
    flags.add_argument("--max-elements", type=int, default=_env("max_elements", defaults.max_elements, int),
                        help="largest tensor in a request, in elements; above: RESOURCE_EXHAUSTED (%(default)s)")
    flags.add_argument("--max-inflight-bytes", type=int,
                        default=_env("max_inflight_bytes", defaults.max_inflight_bytes, int),
                        help="sum of the request bodies being processed; a request that would exceed it gets "
                             "RESOURCE_EXHAUSTED at once (default: memory limit / 2 / 8, here %(default)s)")
    flags.add_argument("--workers", type=int, default=_env("workers", defaults.workers, int),
                        help="compute threads for large requests (%(default)s)")
    flags.add_argument("--grace-seconds", type=float, default=_env("grace_seconds", defaults.grace_seconds, float),
                        help="on SIGTERM/SIGINT, time given to in-flight calls (%(default)s)")
    flags.add_argument("--jobs", type=int, default=_env("export_jobs", defaults.export_jobs, int),
                        help="worker processes exporting missing artifacts before readiness "
                            "(default: the exporter's, min(2, CPU count))")
    flags.add_argument("--torch-threads", type=int, default=_env("torch_threads", defaults.torch_threads, int),
                        help="intra-op threads of a large request computing alone; concurrent ones get 1 each "
                             "(default: CPU count, %(default)s)")
    flags.add_argument("--log-level", default=_env("log_level", "INFO"), help="%(default)s")
    flags.add_argument("--no-export", action="store_true",
                        help="do not export missing artifacts at start; their losses are not offered on that backend")
    flags.add_argument("--metrics-port", type=int, default=_env("metrics_port", defaults.metrics_port, int),
                        help="serve Prometheus metrics over HTTP on this port (GET /metrics); 0 picks a free one, "
                             "printed in the 'listening' log line (default: off)")
    flags.add_argument("--metrics-host", default=_env("metrics_host", defaults.metrics_host),
                        help="address of the metrics endpoint (%(default)s)")
    flags.add_argument("--health-port", type=int, default=_env("health_port", defaults.health_port, int),
                        help="also serve grpc.health.v1 alone, in plaintext and without tokens, on this port of "
                             "--host: for probes that speak neither TLS nor tokens, e.g. Kubernetes' gRPC probes "
                             "(default: off)")
    security = flags.add_argument_group("transport security and authentication (docs/service.md, Security)")
    security.add_argument("--tls-cert", default=_env("tls_cert", defaults.tls_cert),
                          help="PEM certificate chain of the server: serve over TLS (with --tls-key)")
    security.add_argument("--tls-key", default=_env("tls_key", defaults.tls_key),
                          help="PEM private key (unencrypted) of --tls-cert")
    security.add_argument("--tls-client-ca", default=_env("tls_client_ca", defaults.tls_client_ca),
                          help="PEM CA certificate(s): require client certificates signed by them (mutual TLS)")
    security.add_argument("--token-file", default=_env("token_file", defaults.token_file),
                          help=f"file of accepted bearer tokens (separated by lines, spaces or commas; '#' comments); "
                               f"{ENVIRONMENT['tokens']} may list more. With tokens, every call but the health "
                               "checks needs 'authorization: Bearer <token>'")
    security.add_argument("--reflection", action="store_true", help="serve gRPC reflection (off by default)")
    security.add_argument("--insecure", action="store_true",
                          help="allow a non-loopback --host without TLS and tokens (a network that is trusted itself)")
    return flags


def _environment_tokens() -> tuple:
    r"""The tokens of ``LOSS_SERVICE_TOKENS`` (not through :func:`_env`: its errors quote the value)."""
    text = os.environ.get(ENVIRONMENT["tokens"], "")
    return parse_tokens(text, ENVIRONMENT["tokens"]) if text.strip() else ()


def _log_error(event: str, error: str) -> None:
    r"""A start-up error as one line of the server's JSON log format."""
    print(json.dumps({"level": "ERROR", "event": event, "error": error}), file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    r"""``loss-service serve [flags]``: run the server until SIGTERM or SIGINT; 2 for a bad setting."""
    args = parser().parse_args(argv)
    try:
        from . import logs
        from .app import serve
    except ModuleNotFoundError as missing:
        # A client-only install ([client]) has the command but not the server.
        _log_error("missing packages", f"serving needs the server's packages (no module {missing.name!r}): "
                                       "pip install 'loss-service[server]' (or [gpu]), see README, Install")
        return 2

    logs.configure(args.log_level)
    try:
        config = ServerConfig(
            host=args.host, port=args.port, backend=args.backend, device=args.device, artifacts=args.artifacts,
            max_message_bytes=args.max_message_bytes, max_elements=args.max_elements,
            max_inflight_bytes=args.max_inflight_bytes, workers=args.workers,
            grace_seconds=args.grace_seconds, export_missing=not args.no_export, export_jobs=args.jobs,
            torch_threads=args.torch_threads,
            metrics_port=args.metrics_port, metrics_host=args.metrics_host, health_port=args.health_port,
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
            token_file=args.token_file, tokens=_environment_tokens(), reflection=args.reflection,
            insecure=args.insecure,
        )
        return asyncio.run(serve(config))
    except ConfigError as exc:
        _log_error("bad configuration", str(exc))
        return 2
