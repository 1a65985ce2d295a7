#!/usr/bin/env bash
# Create .venv and install medgemma-gguf with its test tools (CPU build of llama-cpp-python and torch).
#
# llama-cpp-python is built from source once per (version, build flags) and the wheel kept under
# ${MEDGEMMA_GGUF_WHEELS:-~/.cache/medgemma-gguf/wheels}/<key>/: pip's own wheel cache ignores CMAKE_ARGS,
# so a wheel built with other flags (or on another CPU) could otherwise be reused silently.
#
# The default build is portable x86-64-v3 (AVX2/FMA/F16C, no -march=native) with llama.cpp's RPC backend:
# a native build on a CPU that advertises AMX crashes with "Illegal instruction" where the kernel or
# hypervisor does not grant AMX tile state (seen on this project's CI-like machines).
# Extra flags are appended, e.g. for an NVIDIA GPU (needs nvcc on PATH):
#   LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_VERSION=0.3.36
case "$(uname -m)" in
  x86_64) PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
  *) PORTABLE="-DGGML_NATIVE=OFF" ;;
esac
LLAMA_ARGS="$PORTABLE -DGGML_RPC=ON ${LLAMA_CMAKE_ARGS:-${CMAKE_ARGS:-}}"

# Headless Chromium from Debian's packages for the web page's browser tests (tests/test_web_page.py, driven by
# Playwright for Python with executable_path; Playwright's own browser download is not used).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    as_root=""
    [ "$(id -u)" -eq 0 ] || as_root="sudo"
    $as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: no apt-get here: install Chromium yourself (the web page tests need /usr/bin/chromium)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Pin the CPU wheel of torch first: an unpinned torch can pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"

key=$(printf '%s\n%s\n%s\n' "$LLAMA_CPP_VERSION" "$LLAMA_ARGS" "$(uname -m)" | sha256sum | cut -c1-16)
wheels="${MEDGEMMA_GGUF_WHEELS:-$HOME/.cache/medgemma-gguf/wheels}/llama-cpp-python-$key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION ($LLAMA_ARGS); takes 5-10 minutes once" >&2
  mkdir -p "$wheels.partial"
  CMAKE_ARGS="$LLAMA_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    .venv/bin/python -m pip wheel --quiet --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" \
    -w "$wheels.partial"
  rm -rf "$wheels" && mv "$wheels.partial" "$wheels"
fi
.venv/bin/python -m pip install --quiet --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
.venv/bin/python -m pip install --quiet -e ".[test]"
