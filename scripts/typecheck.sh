#!/usr/bin/env bash
# Type-check the package with mypy. mypy does not follow pyproject.toml's package-dir mapping (the stages
# live at the repository's top level and are installed as medgemma_gguf.<stage>), so it checks a tree of
# symlinks under build/typecheck/ laid out as the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/medgemma_gguf"
for file in medgemma_gguf/*.py; do ln -s "../../../$file" "$tree/medgemma_gguf/"; done
for stage in convert runtime quant_eval fixtures; do ln -s "../../../$stage" "$tree/medgemma_gguf/$stage"; done
MYPYPATH="$tree" .venv/bin/python -m mypy -p medgemma_gguf "$@"
