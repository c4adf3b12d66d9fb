#!/usr/bin/env bash
# Build the wheelhouse `addlower install --wheels` puts on nodes: addlower's own wheel, and its
# dependencies as binary wheels for each CPython a node may have (3.11, 3.12, 3.13) on this
# machine's architecture; the node's pip picks those of its python. Usage: deploy/wheelhouse.sh DEST
set -euo pipefail
dest=$1
cd "$(dirname "$0")/.."
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$dest" .
arch=$(uname -m)
for version in 3.11 3.12 3.13; do
  python3 -m pip download --quiet --disable-pip-version-check --dest "$dest" --only-binary=:all: \
    --python-version "$version" --implementation cp --abi "cp${version/./}" --abi abi3 --abi none \
    --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
    --platform any "$dest"/addlower-*.whl
done
