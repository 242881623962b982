#!/usr/bin/env bash
# Regenerate the control plane's Python code from its .proto (needs grpcio-tools).
# A test regenerates into a temporary folder and fails if the committed code differs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-src}
python -m grpc_tools.protoc -Isrc --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  src/salamander/controlplane/v1/controlplane.proto
