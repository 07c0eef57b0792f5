#!/usr/bin/env bash
# Round-trip every architecture through the real sae-lens (its own venv, bench/.venv-saelens, built on first
# use). Usage: bash scripts/saelens_roundtrip.sh [--saelens-version 6.x.y] [--workdir DIR]
# PYTHON: the interpreter of the env that has hf_crosscoder's requirements (default: .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/saelens_roundtrip.py "$@"
