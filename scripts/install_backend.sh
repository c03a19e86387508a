#!/usr/bin/env bash
# Install the `ernie` backend into a standard Triton Inference Server installation (e.g. an NGC tritonserver
# image), the way Triton's vLLM backend is installed: a Python-based backend folder
#     <backends>/ernie/model.py
#     <backends>/ernie/ernie_engine/          (copied from backend/; re-running replaces it)
#     <backends>/ernie/.runtime/cpu_kernels/  (the engine's CPU kernels, compiled here from ernie_engine/csrc/)
# next to Triton's own <backends>/python/, plus the engine's Python requirements (requirements.txt without
# nvidia-pytriton, which only this repo's embedded server needs) into the Python that runs the backend stub
# (`python3` on tritonserver's PATH, or the environment a model names with EXECUTION_ENV_PATH).
#
# Usage: scripts/install_backend.sh [--no-deps] [BACKENDS_DIR]
#   BACKENDS_DIR  default /opt/tritonserver/backends (or $TRITON_BACKENDS_DIR)
#   --no-deps     copy the backend only (the requirements are already in the stub's Python)
#   env PYTHON    the stub's Python (default python3)
# Then serve rows of model_repository/ (each config.pbtxt is `backend: "ernie"` + parameters):
#   ERNIE_MODEL_ROOT=/models tritonserver --model-repository=<repo>/model_repository \
#     --model-control-mode=explicit --load-model=ernie-4.5-0.3b-bf16-tp1-32k
# where /models/PaddlePaddle/ERNIE-4.5-0.3B-Paddle holds that row's checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /s/^# \{0,1\}//p' scripts/install_backend.sh
  exit 0
fi

deps=1
if [[ "${1:-}" == "--no-deps" ]]; then
  deps=0
  shift
fi
dest="${1:-${TRITON_BACKENDS_DIR:-/opt/tritonserver/backends}}"
python="${PYTHON:-python3}"

if [[ ! -f "$dest/python/libtriton_python.so" ]]; then
  echo "install_backend.sh: no Python backend at $dest/python: the ernie backend runs on it" >&2
  exit 1
fi
mkdir -p "$dest/ernie"
rm -rf "$dest/ernie/ernie_engine"
cp backend/model.py "$dest/ernie/model.py"
cp -r backend/ernie_engine "$dest/ernie/ernie_engine"
find "$dest/ernie" -name __pycache__ -prune -exec rm -rf {} +

if ((deps)); then
  grep -v '^nvidia-pytriton' requirements.txt | "$python" -m pip install -q -r /dev/stdin
fi
# Compile the CPU kernels now (into the backend folder, which the server may not be allowed to write to).
"$python" scripts/build_kernels.py --backend "$dest/ernie"
echo "install_backend.sh: installed $dest/ernie"
