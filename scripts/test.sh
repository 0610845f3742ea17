#!/usr/bin/env bash
# The whole test suite (losses, export, C++ trainer, gRPC service, client, CLI, bench smoke test).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest "$@"
