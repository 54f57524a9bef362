#!/usr/bin/env bash
# Run bench/gpu_check.py where dropwise is not installed (a lent GPU machine with torch, numpy and onnx only):
# lay the dropwise.* namespace out with symbolic links, as setuptools' package-dir maps it (dropwise.models ->
# models/, ...), and run the check from the repository root.
#
#   bash bench/gpu_check.sh OUT_DIR            # writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.txt
#   bash bench/gpu_check.sh OUT_DIR --simulate # the same code paths on the CPU
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$(command -v python3 || command -v python)}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/dropwise"
for entry in "$root"/dropwise/*; do ln -s "$entry" "$tree/dropwise/"; done
for folder in package models surgery service; do ln -s "$root/$folder" "$tree/dropwise/$folder"; done
cd "$root"
# a fresh folder for torch's compiled extensions (the engine's CPU mask kernel): no stale build lock of an
# earlier, interrupted run can make this one wait
export TORCH_EXTENSIONS_DIR="$tree/torch_extensions"
export PYTHONPATH="$tree:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
"$python" -m bench.gpu_check "$@"
