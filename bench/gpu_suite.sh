#!/usr/bin/env bash
# The GPU proof in one command (issue #18): the CUDA tests, then the GPU benchmarks, in under 8 minutes
# on one H200, everything written under --out (at most 6 files, one folder):
#
#     bash bench/gpu_wheels.sh                  # once, where PyPI is reachable: wheels into .whl/
#     bash bench/gpu_suite.sh --out DIR         # on the GPU machine (carry .whl/ there)
#     bash bench/gpu_suite.sh --dry-run         # the same on CPU, tiny shapes (checks the script here)
#
# Uses the machine's python3 with its own CUDA torch, transformers and accelerate; installs .whl/*.whl
# (datasets, wandb, deepspeed and what they need) into a folder on PYTHONPATH when .whl/ exists (not in a
# dry run: those wheels are for the GPU machine's Python 3.12); imports the project from src/.
# Each part runs under `timeout`, so one stuck part cannot eat the others' time.
#
# DIR/suite.log        everything printed (install, versions, pytest, benchmarks, summary)
# DIR/env.json         versions, device, nvidia-smi
# DIR/pytest_cuda.xml  junit of `pytest -m cuda` (host syncs per step are test properties)
# DIR/results_gpu.json the benchmark numbers;  DIR/BENCHMARKS_gpu.md the section for BENCHMARKS.md
# DIR/summary.txt      tests passed/failed, host syncs per step, goals
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/bench/out"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/{suite.log,env.json,pytest_cuda.xml,results_gpu.json,BENCHMARKS_gpu.md,summary.txt}
exec > >(tee -a "$OUT/suite.log") 2>&1
cd "$ROOT"
START=$(date +%s)
# seconds per part (real run: 20 + 240 + 190 = 450 < 480); the benchmark skips what would start after
# BENCH_BUDGET and so ends well inside its timeout
if [ "$DRY" = 1 ]; then T_TESTS=300 T_BENCH=120 BENCH_BUDGET=90; else T_TESTS=240 T_BENCH=190 BENCH_BUDGET=140; fi
elapsed() { echo $(( $(date +%s) - START )); }

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hf_crosscoder_gpu_suite.XXXXXX")"
export HF_HOME="$WORK/hf_home" HF_DATASETS_CACHE="$WORK/datasets_cache" MPLBACKEND=Agg

echo "== [$(elapsed) s] install"
if [ "$DRY" = 0 ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  SITE="${HF_CROSSCODER_SITE:-$WORK/site}"
  timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$ROOT"/.whl/*.whl || echo "WARNING: installing .whl/ failed"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then export HF_CROSSCODER_TEST_DEVICE=cpu; fi

echo "== [$(elapsed) s] environment"
timeout 60 "$PY" - "$OUT/env.json" <<'EOF'
import importlib, json, subprocess, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
for name in ("torch", "transformers", "accelerate", "datasets", "deepspeed", "wandb", "pyarrow", "fsspec",
             "pydantic", "huggingface_hub", "safetensors", "tokenizers", "numpy", "hf_crosscoder"):
    try:
        mod = importlib.import_module(name)
        info[name] = f"{getattr(mod, '__version__', '?')} ({mod.__file__})"
    except Exception as err:  # report and go on: the tests that need it will say more
        info[name] = f"IMPORT FAILED: {type(err).__name__}: {err}"
import torch
info["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    info["torch_cuda"] = torch.version.cuda
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired) as err:
    info["nvidia_smi"] = f"unavailable: {err}"
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
for k, v in info.items():
    print(f"  {k}: {v}")
EOF

echo "== [$(elapsed) s] pytest -m cuda"
PYTEST_ARGS=(-m cuda tests/test_cuda.py -q -rfEs --tb=short -p no:cacheprovider -o junit_family=xunit1
             --junitxml="$OUT/pytest_cuda.xml" --basetemp="$WORK/pytest")
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout=200); fi
timeout -k 10 "$T_TESTS" "$PY" -m pytest "${PYTEST_ARGS[@]}"
TESTS_RC=$?

echo "== [$(elapsed) s] bench/gpu.py"
BENCH_ARGS=(--out "$OUT" --budget-s "$BENCH_BUDGET")
if [ "$DRY" = 1 ]; then BENCH_ARGS+=(--dry-run); fi
timeout -k 10 "$T_BENCH" "$PY" bench/gpu.py "${BENCH_ARGS[@]}"
BENCH_RC=$?

echo "== [$(elapsed) s] summary"
"$PY" - "$OUT" "$TESTS_RC" "$BENCH_RC" "$(elapsed)" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
print(f"suite: {seconds} s; pytest exit {tests_rc}, bench/gpu.py exit {bench_rc} (124: timed out)")
junit = out / "pytest_cuda.xml"
if junit.exists():
    cases = ET.parse(junit).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in cases:
        name = case.get("name")
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if failure is not None:
            counts["failed"] += 1
            print(f"  FAILED {name}: {(failure.get('message') or '').splitlines()[0][:300]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
        if "host_syncs_per_step" in props:
            print(f"  host syncs/step {props['host_syncs_per_step']:>5}, DtoH/step {props['dtoh_copies_per_step']:>5}: {name}")
            for site in filter(None, props.get("sync_sites", "").split(" ;; ")):
                print(f"      {site[:240]}")
    print("tests:", ", ".join(f"{v} {k}" for k, v in counts.items()))
else:
    print("tests: no junit file (pytest did not finish)")
results = out / "results_gpu.json"
if results.exists():
    r = json.loads(results.read_text())
    print(f"benchmarks on {r['meta']['device']}:" + (" (dry run: not a measurement)" if r["meta"]["dry_run"] else ""))
    for g in r.get("goals", []):
        value = "not measured" if g["value"] is None else f"{g['value']:.3g}"
        status = {None: "", True: "met", False: "NOT met"}[g["met"]]
        print(f"  {g['what']}: {value} (target >= {g['target']:g}) {status}")
    for name, why in r.get("failed", {}).items():
        print(f"  section {name} FAILED: {why[:300]}")
else:
    print("benchmarks: no results_gpu.json")
EOF
rm -rf "$WORK"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
