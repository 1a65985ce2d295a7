#!/usr/bin/env bash
# Install everything into .venv, then run the linter, the type checker and the whole test suite (slow tests
# included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
bash scripts/typecheck.sh
.venv/bin/pytest -q "$@"
