r"""Command line: ``python -m loss_service serve|score|losses`` (also the ``loss-service`` script).

``serve`` flags fall back to ``LOSS_SERVICE_*`` environment variables, then to the defaults::

    --host LOSS_SERVICE_HOST (127.0.0.1)        --port LOSS_SERVICE_PORT (50051; 0 = any free port)
    --backend LOSS_SERVICE_BACKEND (auto)       --device LOSS_SERVICE_DEVICE (auto)
    --artifacts LOSS_SERVICE_ARTIFACTS (artifacts)
    --max-message-bytes LOSS_SERVICE_MAX_MESSAGE_BYTES   --max-elements LOSS_SERVICE_MAX_ELEMENTS
    --max-inflight-bytes LOSS_SERVICE_MAX_INFLIGHT_BYTES (memory limit / 2 / 8)
    --workers LOSS_SERVICE_WORKERS              --grace-seconds LOSS_SERVICE_GRACE_SECONDS
    --jobs LOSS_SERVICE_JOBS (min(2, CPUs))     --torch-threads LOSS_SERVICE_TORCH_THREADS (CPUs)
    --log-level LOSS_SERVICE_LOG_LEVEL (INFO)
    --metrics-port LOSS_SERVICE_METRICS_PORT (off; 0 = any free port)
    --metrics-host LOSS_SERVICE_METRICS_HOST (127.0.0.1)
    --health-port LOSS_SERVICE_HEALTH_PORT (off: health on the main port only)
    --tls-cert LOSS_SERVICE_TLS_CERT            --tls-key LOSS_SERVICE_TLS_KEY
    --tls-client-ca LOSS_SERVICE_TLS_CLIENT_CA  --token-file LOSS_SERVICE_TOKEN_FILE
    LOSS_SERVICE_TOKENS (more accepted tokens; no flag: a command line is visible to every user)
    --reflection, --insecure, --no-export (flags only)

``score`` sends one batch read from ``.npy`` files and prints the result as JSON; ``score`` and
``losses`` connect with ``--ca``, ``--client-cert``, ``--client-key``, ``--token``/``--token-file``
or ``LOSS_SERVICE_CA``, ``LOSS_SERVICE_CLIENT_CERT``, ``LOSS_SERVICE_CLIENT_KEY``, ``LOSS_SERVICE_TOKEN``.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from typing import Any, Callable, List, Optional, Sequence

from loss_service.client import CLIENT_ENVIRONMENT, LossClient
from loss_service.server.config import BACKEND_CHOICES, ENVIRONMENT, ConfigError, ServerConfig


def _env(name: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
    value = os.environ.get(ENVIRONMENT[name])
    if value is None or value == "":
        return default
    try:
        return convert(value)
    except ValueError:
        raise SystemExit(f"error: environment variable {ENVIRONMENT[name]}={value!r} is not a valid {convert.__name__}")


def _add_serve(commands: argparse._SubParsersAction) -> None:
    defaults = ServerConfig()
    parser = commands.add_parser("serve", help="run the gRPC LossService")
    parser.add_argument("--host", default=_env("host", defaults.host), help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=_env("port", defaults.port, int),
                        help="port; 0 picks a free one, printed in the 'listening' log line (%(default)s)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default=_env("backend", defaults.backend),
                        help="backend of requests that leave it unspecified; auto = eager (%(default)s)")
    parser.add_argument("--device", default=_env("device", defaults.device),
                        help="auto, cpu, cuda or cuda:N; explicit cuda without a GPU is a start error (%(default)s)")
    parser.add_argument("--artifacts", default=_env("artifacts", defaults.artifacts),
                        help="folder of <loss>.pt/.onnx + manifest.json, exported on start if missing (%(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=_env("max_message_bytes", defaults.max_message_bytes, int),
                        help="largest request/response message (%(default)s)")
    parser.add_argument("--max-elements", type=int, default=_env("max_elements", defaults.max_elements, int),
                        help="largest tensor in a request, in elements; above: RESOURCE_EXHAUSTED (%(default)s)")
    parser.add_argument("--max-inflight-bytes", type=int,
                        default=_env("max_inflight_bytes", defaults.max_inflight_bytes, int),
                        help="sum of the request bodies being processed; a request that would exceed it gets "
                             "RESOURCE_EXHAUSTED at once (default: memory limit / 2 / 8, here %(default)s)")
    parser.add_argument("--workers", type=int, default=_env("workers", defaults.workers, int),
                        help="compute threads for large requests (%(default)s)")
    parser.add_argument("--grace-seconds", type=float, default=_env("grace_seconds", defaults.grace_seconds, float),
                        help="on SIGTERM/SIGINT, time given to in-flight calls (%(default)s)")
    parser.add_argument("--jobs", type=int, default=_env("export_jobs", defaults.export_jobs, int),
                        help="worker processes exporting missing artifacts before readiness (%(default)s)")
    parser.add_argument("--torch-threads", type=int, default=_env("torch_threads", defaults.torch_threads, int),
                        help="intra-op threads of a large request computing alone; concurrent ones get 1 each "
                             "(default: CPU count, %(default)s)")
    parser.add_argument("--log-level", default=_env("log_level", "INFO"), help="%(default)s")
    parser.add_argument("--no-export", action="store_true",
                        help="do not export missing artifacts at start; their losses are not offered on that backend")
    parser.add_argument("--metrics-port", type=int, default=_env("metrics_port", defaults.metrics_port, int),
                        help="serve Prometheus metrics over HTTP on this port (GET /metrics); 0 picks a free one, "
                             "printed in the 'listening' log line (default: off)")
    parser.add_argument("--metrics-host", default=_env("metrics_host", defaults.metrics_host),
                        help="address of the metrics endpoint (%(default)s)")
    parser.add_argument("--health-port", type=int, default=_env("health_port", defaults.health_port, int),
                        help="also serve grpc.health.v1 alone, in plaintext and without tokens, on this port of "
                             "--host: for probes that speak neither TLS nor tokens, e.g. Kubernetes' gRPC probes "
                             "(default: off)")
    security = parser.add_argument_group("transport security and authentication (docs/service.md, Security)")
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


def _add_score(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("score", help="score one batch of .npy files against a server; prints JSON")
    _add_connection(parser)
    parser.add_argument("--loss", required=True)
    parser.add_argument("--predictions", required=True, type=npy_file, metavar="FILE.npy")
    parser.add_argument("--targets", required=True, type=npy_file, metavar="FILE.npy")
    parser.add_argument("--weights", type=npy_file, metavar="FILE.npy",
                        help="(N,) per sample or broadcastable to the loss's elements")
    parser.add_argument("--class-weights", type=npy_file, metavar="FILE.npy", help="per-class weights (length C)")
    parser.add_argument("--pos-weight", type=npy_file, metavar="FILE.npy",
                        help="per-class positive weights (length C)")
    parser.add_argument("--param", action="append", default=[], type=parse_param, metavar="NAME=VALUE",
                        help="hyperparameter, repeatable: gamma=2, ignore_index=-100, mode=multiclass; "
                             "NAME=@file.npy sends a vector")
    parser.add_argument("--reduction", default="mean", choices=["mean", "sum", "none", "weighted_mean"])
    parser.add_argument("--backend", choices=["eager", "torchscript", "onnx"])
    parser.add_argument("--per-sample", action="store_true", help="also return one value per sample")
    parser.add_argument("--request-id")
    return parser


def _add_connection(parser: argparse.ArgumentParser) -> None:
    r"""The flags of ``score`` and ``losses`` that say where the server is and how to reach it."""
    parser.add_argument("--target", default="127.0.0.1:50051",
                        help="server host:port, a gRPC target such as dns:///name:port, or replicas' ip:port "
                             "addresses separated by commas, balanced round-robin (%(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="deadline in seconds; a call waits this long for a server that is starting (%(default)s)")
    security = parser.add_argument_group("TLS and authentication (docs/service.md, Security)")
    security.add_argument("--ca", help="PEM certificate of the CA that signed the server's: connect over TLS "
                                       f"({CLIENT_ENVIRONMENT['ca']})")
    security.add_argument("--client-cert",
                          help=f"PEM client certificate for mutual TLS ({CLIENT_ENVIRONMENT['client_cert']})")
    security.add_argument("--client-key",
                          help=f"PEM private key of --client-cert ({CLIENT_ENVIRONMENT['client_key']})")
    token = security.add_mutually_exclusive_group()
    token.add_argument("--token", help=f"bearer token sent with every call ({CLIENT_ENVIRONMENT['token']}; "
                                       "--token-file keeps it out of the process list)")
    token.add_argument("--token-file", help="file holding the bearer token (one token; '#' comments)")


def _connect(args: argparse.Namespace) -> LossClient:
    r"""The :class:`LossClient` of the connection flags (:func:`_add_connection`)."""
    from loss_service.protocol import read_token_file

    token = args.token
    if args.token_file:
        tokens = read_token_file(args.token_file)
        if len(tokens) != 1:
            raise ConfigError(f"token file {args.token_file} holds {len(tokens)} tokens; the client sends one")
        (token,) = tokens
    target = args.target.split(",") if "," in args.target else args.target
    return LossClient(target, timeout=args.timeout, ca=args.ca, client_cert=args.client_cert,
                      client_key=args.client_key, token=token)


NPY_MAGIC = b"\x93NUMPY"


def npy_file(path: str) -> Any:
    r"""The array in the ``.npy`` file ``path``; an argparse error saying why it cannot be read."""
    import numpy as np

    try:
        with open(path, "rb") as file:
            if file.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise ValueError("not a .npy file (numpy.save writes them)")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # missing, unreadable, not .npy, object arrays, truncated
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {reason}") from None


def parse_param(text: str) -> tuple:
    r"""``NAME=VALUE`` -> ``(name, value)``: int, float, true/false, ``@file.npy`` or a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. gamma=2), got {text!r}")
    if value.startswith("@"):
        return name, npy_file(value[1:])
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for convert in (int, float):
        try:
            return name, convert(value)
        except ValueError:
            pass
    return name, value


def _environment_tokens() -> tuple:
    r"""The tokens of ``LOSS_SERVICE_TOKENS`` (not through :func:`_env`: its errors quote the value)."""
    from loss_service.protocol import parse_tokens

    text = os.environ.get(ENVIRONMENT["tokens"], "")
    return parse_tokens(text, ENVIRONMENT["tokens"]) if text.strip() else ()


def _log_error(event: str, error: str) -> None:
    r"""A start-up error as one line of the server's JSON log format."""
    print(json.dumps({"level": "ERROR", "event": event, "error": error}), file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    try:
        from loss_service.server import logs
        from loss_service.server.app import serve
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


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from loss_service.client import LossServiceError

    params = dict(args.param)
    try:
        with args.client as client:
            result = client.score(
                args.loss, args.predictions, args.targets, args.weights,
                reduction=args.reduction, backend=args.backend, class_weights=args.class_weights,
                pos_weight=args.pos_weight, return_per_sample=args.per_sample, request_id=args.request_id,
                **params,
            )
    except LossServiceError as error:
        print(json.dumps({"code": error.code.name, "details": error.details,
                          "field_violations": [{"field": f, "description": d} for f, d in error.field_violations]}),
              file=sys.stderr)
        return 1
    output = dataclasses.asdict(result)
    for key in ("values", "per_sample"):
        if output[key] is not None:
            output[key] = np.asarray(output[key], dtype=np.float64).tolist()
    print(json.dumps(output))
    return 0


def _losses(args: argparse.Namespace) -> int:
    from loss_service.client import LossServiceError

    try:
        with args.client as client:
            infos = client.list_losses()
    except LossServiceError as error:
        print(json.dumps({"code": error.code.name, "details": error.details}), file=sys.stderr)
        return 1
    print(json.dumps([dataclasses.asdict(info) for info in infos], indent=2, default=str))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="loss-service", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    client_commands = {"score": _add_score(commands),
                       "losses": commands.add_parser("losses", help="list the server's losses (ListLosses) as JSON")}
    _add_connection(client_commands["losses"])
    args = parser.parse_args(argv)
    if args.command in client_commands:
        try:
            args.client = _connect(args)
        except (ValueError, OSError) as exc:  # ConfigError is a ValueError
            client_commands[args.command].error(str(exc))
    return {"serve": _serve, "score": _score, "losses": _losses}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
