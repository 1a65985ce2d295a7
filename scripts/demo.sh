#!/usr/bin/env bash
# Install everything into .venv, then run the main job on the embedded tiny MedGemma-shaped checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/medgemma-gguf demo --outdir demo --force "$@"
