#!/usr/bin/env bash
# Create .venv and install medgemma-gguf with its test tools (CPU build of llama-cpp-python and torch).
# For an NVIDIA GPU: CMAKE_ARGS="-DGGML_CUDA=on" bash scripts/setup.sh   (needs the CUDA toolkit)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Pin the CPU wheel of torch first: an unpinned torch can pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  .venv/bin/python -m pip install --quiet -e ".[test]"
