#!/usr/bin/env bash
# Download (into .whl/ at the repo root) every wheel bench/gpu_suite.sh needs on the GPU machine beyond
# what its image already holds: datasets, wandb and deepspeed with the dependencies the image lacks.
# That machine has no network, Python 3.12 on x86-64 and its own CUDA torch, transformers and accelerate;
# run this on a machine with PyPI, then carry .whl/ (git ignores it) with the suite:
#
#     bash bench/gpu_wheels.sh            # then, on the GPU machine: bash bench/gpu_suite.sh --out DIR
#
# Versions are pinned to the ones this project is tested with on CPU. deepspeed is published as a source
# archive only: it is built here into a pure-python wheel (its CUDA ops compile just in time there, and
# the suite needs none of them). At the end every wheel's Requires-Dist is checked against the image's
# package list (IMAGE_PACKAGES below, from the device notes of 2026-11-17) and the total size printed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
MAX_MIB=40  # the device call carries at most 64 MiB together with the repo (< 1 MiB)

WHEELS=(
  # datasets (the runner's data path) and what the image lacks or holds at an unknown version
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
  # wandb (offline logging) and its closure
  wandb==0.31.0 click==8.5.1 cwevals==0.0.1b1 distro==1.9.0 sniffio==1.3.1 platformdirs==4.14.9
  protobuf==7.36.2 googleapis-common-protos==1.76.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2
  # pydantic (wandb and deepspeed)
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0
  # deepspeed's pure-python dependencies the image lacks (deepspeed itself: built below)
  hjson==3.1.0
)
DEEPSPEED=deepspeed==0.19.8

mkdir -p "$DEST"
grep -qxF "/.whl/" "$ROOT/.git/info/exclude" 2>/dev/null || { [ -d "$ROOT/.git" ] && echo "/.whl/" >> "$ROOT/.git/info/exclude"; } || true

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  # DS_BUILD_OPS=0: no op is compiled ahead of time, so the wheel is pure python (py3-none-any)
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-binary deepspeed -w "$DEST" "$DEEPSPEED"
fi
rm -f "$DEST"/*.tar.gz

"$PYTHON" - "$DEST" "$MAX_MIB" <<'EOF'
"""Each wheel's requirements are on the image or among the wheels; one version per package; size."""
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import Marker

# the GPU machine: CPython 3.12 on x86-64 Linux; extras are not installed (extra "")
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
IMAGE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


dest, max_mib = Path(sys.argv[1]), float(sys.argv[2])
wheels = sorted(dest.glob("*.whl"))
names = [norm(w.name.split("-")[0]) for w in wheels]
dupes = sorted({n for n in names if names.count(n) > 1})
have = set(map(norm, IMAGE_PACKAGES)) | set(names)
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line.split(":", 1)[1].partition(";")
        if marker.strip() and not Marker(marker).evaluate(TARGET):
            continue  # an extra, or a marker of another Python / platform than the image's
        name = norm(re.split(r"[\s\[<>=!~(]", req.strip(), maxsplit=1)[0])
        if name not in have:
            missing.append(f"{wheel.name}: {req.strip()}")
total = sum(w.stat().st_size for w in wheels) / 2**20
print(f"{len(wheels)} wheels in {dest}, {total:.1f} MiB")
for line in missing:
    print("  MISSING (neither on the image nor among the wheels):", line)
for name in dupes:
    print("  DUPLICATE (two versions stop the install):", name)
if missing or dupes or total > max_mib:
    sys.exit(f"wheel check failed (missing {len(missing)}, duplicates {len(dupes)}, {total:.1f} MiB > {max_mib}?)")
EOF
