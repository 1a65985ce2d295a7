#!/usr/bin/env bash
# Install everything into .venv, then run the linter and the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/pytest -q "$@"
