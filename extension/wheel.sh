#!/bin/bash
# Build kubespan's wheel from a clean copy of the tree (setuptools' scratch files stay out of
# the repository: its default scratch directory `build/` is ours). Shared by the system
# extension (stage.sh) and the discovery service's container (deploy/discovery/container).
# Usage: wheel.sh PYTHON OUTDIR   -> OUTDIR/kubespan-*.whl
set -euo pipefail
python=$1 out=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache \
    -cf - . | tar -C "$src" -xf -
mkdir -p "$out"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" "$src"
