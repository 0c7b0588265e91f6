#!/usr/bin/env bash
# Regenerates the Python modules from the .proto files (needs grpcio-tools: pip install -e '.[test]').
# The generated files are committed so that installing rayloop needs no protoc.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. protos/ledger.proto
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/ops.proto
