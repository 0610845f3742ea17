#!/usr/bin/env bash
# The main job: serve loss_service.v1.LossService on 127.0.0.1:50051 (flags: --help).
# Artifacts (TorchScript + ONNX) are exported into ./artifacts on first start.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m loss_service serve "$@"
