#!/usr/bin/env bash
# Peer libraries for bench/run.py, each in its own virtual env (gitignored: bench/.venv-*).
# torch is pinned to ours first so the peers run on the same kernels.
set -euo pipefail
cd "$(dirname "$0")"
TORCH=${TORCH:-torch==2.13.0}
setup() {  # setup NAME PACKAGE...
  local venv=".venv-$1"; shift
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$TORCH"
  "$venv/bin/pip" install -q "$@" safetensors
}
setup saelens "sae-lens${SAELENS_VERSION:+==$SAELENS_VERSION}"
setup sparsify "eai-sparsify${SPARSIFY_VERSION:+==$SPARSIFY_VERSION}"
for v in saelens sparsify; do
  echo "$v: $(.venv-$v/bin/pip list 2>/dev/null | grep -i -E '^(torch|sae-lens|eai-sparsify) ' | tr -s ' ' | paste -sd ';')"
done
