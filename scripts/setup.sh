#!/usr/bin/env bash
# Idempotent setup of this checkout (safe to re-run, fast when nothing changed):
#   1. .venv (python3.11) with requirements.txt, plus requirements-test.txt with --test;
#   2. libpython3.11, which the Triton Python backend stub links against (apt-get, as root, if missing);
#   3. the default model checkpoints/ernie-4.5-tiny (a random one from scripts/make_random_model.py) if absent,
#      never replacing an existing (e.g. trained, committed) one;
#   4. the engine's CPU kernels, compiled ahead of the first request (cached in backend/.runtime/cpu_kernels);
#   5. .runtime/backends/: pytriton's Python backend with this Python's stub, and ernie/ -> backend/
#      (a symlink, so edits to backend/ take effect at the next model load).
# Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=0
[[ "${1:-}" == "--test" ]] && with_test=1

mkdir -p .runtime
exec 9>.runtime/setup.lock
flock 9  # several shells of one checkout may run setup at once (pip into one venv must not race)

if [[ ! -x .venv/bin/python ]]; then
  python3.11 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

requirements=(-r requirements.txt)
((with_test)) && requirements+=(-r requirements-test.txt)
stamp=.venv/.setup-requirements
wanted="$(cat requirements.txt; ((with_test)) && cat requirements-test.txt; true)"
wanted_hash="$(printf '%s' "$wanted" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" ]] || ! grep -qx "$wanted_hash" "$stamp"; then
  python -m pip install -q "${requirements[@]}"
  echo "$wanted_hash" >> "$stamp"
fi

stub="$(python -c 'import sys; sys.path.insert(0, "scripts"); import triton_env; print(triton_env.stub_path())')"
libpath="$(python -c 'import sys; sys.path.insert(0, "scripts"); import triton_env; print(triton_env.library_path())')"
if LD_LIBRARY_PATH="$libpath" ldd "$stub" | grep -q "libpython3.11.*not found"; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "setup: libpython3.11 is missing; install Debian's libpython3.11 (as root)" >&2
    exit 1
  fi
  apt-get update -qq && apt-get install -y -qq libpython3.11 >/dev/null
fi

if [[ ! -e checkpoints/ernie-4.5-tiny ]]; then
  tmp="checkpoints/.ernie-4.5-tiny.tmp.$$"
  rm -rf "$tmp"
  python scripts/make_random_model.py --out "$tmp"
  mv -T "$tmp" checkpoints/ernie-4.5-tiny
fi

# The engine's CPU kernels compile once (cached in backend/.runtime/cpu_kernels): now, not at a server's first
# request.
python -c 'import sys; sys.path.insert(0, "backend"); from ernie_engine.layers import cpu_kernels; cpu_kernels.available()'

python scripts/triton_env.py assemble >/dev/null
python scripts/build_kernels.py  # CPU custom ops (ernie_engine/csrc/); Paddle fallback if impossible
echo "setup: ok (.venv, checkpoints/ernie-4.5-tiny, .runtime/backends)"
