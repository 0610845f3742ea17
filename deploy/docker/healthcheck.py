r"""Container health check: exit 0 when the local loss-service reports SERVING, 1 otherwise.

Docker's HEALTHCHECK runs it inside the container (the slim images have no grpc_health_probe);
Kubernetes uses its native ``grpc:`` probes instead. It asks the standard ``grpc.health.v1``
service for ``loss_service.v1.LossService`` (readiness: artifacts loaded) on
``127.0.0.1:$LOSS_SERVICE_HEALTH_PORT`` -- the server's plaintext health port, which answers without
TLS or a token -- or, without one, on ``127.0.0.1:$LOSS_SERVICE_PORT`` (a plaintext server).

    python healthcheck.py [--port P] [--service NAME] [--timeout SECONDS]
"""
import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loss_service.protocol import DEFAULT_PORT, SERVICE_NAME
from loss_service.server.config import ENVIRONMENT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    port = os.environ.get(ENVIRONMENT["health_port"]) or os.environ.get(ENVIRONMENT["port"]) or DEFAULT_PORT
    parser.add_argument("--port", type=int, default=int(port))
    parser.add_argument("--service", default=SERVICE_NAME, help="health service name ('' = liveness)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{args.port}") as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.service or '(server)'} is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
