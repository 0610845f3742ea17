r"""Command line: ``python -m loss_service serve|score|losses`` (also the ``loss-service`` script).

``serve`` runs the server with its own flags (:mod:`loss_service.server.command`, ``loss-service
serve --help``); the client commands never load the server's modules.

``score`` sends one batch read from ``.npy`` files and prints the result as JSON; ``score`` and
``losses`` connect with ``--ca``, ``--client-cert``, ``--client-key``, ``--token``/``--token-file``
or ``LOSS_SERVICE_CA``, ``LOSS_SERVICE_CLIENT_CERT``, ``LOSS_SERVICE_CLIENT_KEY``, ``LOSS_SERVICE_TOKEN``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Optional, Sequence

from loss_service.client import CLIENT_ENVIRONMENT, LossClient
from loss_service.protocol import BACKENDS, DEFAULT_HOST, DEFAULT_PORT, REDUCTIONS, ConfigError, read_token_file


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
    parser.add_argument("--reduction", default="mean", choices=list(REDUCTIONS))
    parser.add_argument("--backend", choices=list(BACKENDS))
    parser.add_argument("--per-sample", action="store_true", help="also return one value per sample")
    parser.add_argument("--request-id")
    return parser


def _add_connection(parser: argparse.ArgumentParser) -> None:
    r"""The flags of ``score`` and ``losses`` that say where the server is and how to reach it."""
    parser.add_argument("--target", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
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
    # serve's flags are left unparsed here and handed to the server's own parser.
    commands.add_parser("serve", help="run the gRPC LossService (its flags: loss-service serve --help)", add_help=False)
    client_commands = {"score": _add_score(commands),
                       "losses": commands.add_parser("losses", help="list the server's losses (ListLosses) as JSON")}
    _add_connection(client_commands["losses"])
    args, unparsed = parser.parse_known_args(argv)
    if args.command == "serve":
        from loss_service.server.command import main as serve

        return serve(unparsed)
    command = client_commands[args.command]
    if unparsed:
        command.error(f"unrecognized arguments: {' '.join(unparsed)}")
    try:
        args.client = _connect(args)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        command.error(str(exc))
    return {"score": _score, "losses": _losses}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
