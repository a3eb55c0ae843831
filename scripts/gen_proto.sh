#!/usr/bin/env bash
# Regenerates the envd Connect stubs of `sbx serve` from our own .proto files
# (src/exec_sandbox/server/proto/{process,filesystem}/*.proto).
# Needs (dev only): grpcio-tools (protoc), protoc-gen-py==0.6.* (protobuf-py messages) and
# protoc-gen-connectrpc==0.12.* (connectrpc services), matching the runtime pins in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=.venv/bin
[ -x "$PYBIN/python" ] || PYBIN=$(dirname "$(command -v python)")
OUT=src/exec_sandbox/server/proto
"$PYBIN/python" -m grpc_tools.protoc \
  -I "$OUT" \
  --plugin=protoc-gen-py="$PYBIN/protoc-gen-py" \
  --plugin=protoc-gen-connectrpc="$PYBIN/protoc-gen-connectrpc" \
  --py_out="$OUT" --connectrpc_out="$OUT" \
  process/process.proto filesystem/filesystem.proto
ls "$OUT"/process "$OUT"/filesystem
