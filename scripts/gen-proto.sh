#!/usr/bin/env bash
# Regenerate the Python gRPC modules from addlower/api/*.proto.
# Needs grpcio-tools (pip install -e '.[dev]'); run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. addlower/api/*.proto
rm -f addlower/api/mount_pb2_grpc.py addlower/api/descriptor_pb2_grpc.py  # no services in them
echo "regenerated: $(ls addlower/api/*_pb2*.py | tr '\n' ' ')"
