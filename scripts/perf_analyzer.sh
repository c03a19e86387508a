#!/usr/bin/env bash
# Load test a served ernie model with tritonclient's bundled perf_analyzer over gRPC streaming, bounded:
# REQUEST_COUNT requests at each concurrency of CONCURRENCY (no open-ended stabilisation), then its table.
# Usage: scripts/perf_analyzer.sh [MODEL] [extra perf_analyzer args...]
#   env: GRPC_URL (127.0.0.1:8001), CONCURRENCY (LOW:HIGH, 1:4), REQUEST_COUNT (16 per level), MAX_TOKENS (32),
#        PROMPT ("Where is the capital of China?")
# Installs what the bundled binary lacks when missing: Debian's libb64-0d (apt-get, as root) and PyPI's
# nvidia-cuda-runtime-cu12 (libcudart.so.12; no GPU is used).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /s/^# \{0,1\}//p' scripts/perf_analyzer.sh
  exit 0
fi
# A range that gives no level (4:1) would measure nothing and still succeed.
IFS=: read -r low high <<<"${CONCURRENCY:-1:4}"
high="${high:-$low}"
if ! [[ "$low" =~ ^[1-9][0-9]*$ && "$high" =~ ^[1-9][0-9]*$ ]] || ((low > high)); then
  echo "perf_analyzer.sh: CONCURRENCY must be LOW:HIGH (or N) with 1 <= LOW <= HIGH, got '${CONCURRENCY:-}'" >&2
  exit 2
fi
for name in REQUEST_COUNT MAX_TOKENS; do
  if [[ -n "${!name:-}" && ! "${!name}" =~ ^[1-9][0-9]*$ ]]; then
    echo "perf_analyzer.sh: $name must be a positive integer, got '${!name}'" >&2
    exit 2
  fi
done
# shellcheck disable=SC1091
source .venv/bin/activate

model="${1:-ernie-4.5-tiny}"
shift || true
pa="$(python scripts/triton_env.py perf_analyzer)"

if ! ldconfig -p | grep -q "libb64.so.0d"; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "perf_analyzer.sh: libb64.so.0d is missing; install Debian's libb64-0d (as root)" >&2
    exit 1
  fi
  apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null
fi
cudart_dir() {
  python -c 'import importlib.util, pathlib; s = importlib.util.find_spec("nvidia.cuda_runtime")
print(pathlib.Path(s.submodule_search_locations[0]) / "lib" if s else "")' 2>/dev/null || true
}
if [[ -z "$(cudart_dir)" ]]; then
  python -m pip install -q "nvidia-cuda-runtime-cu12==12.*"
fi
export LD_LIBRARY_PATH="$(cudart_dir)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

data="$(mktemp --suffix=.json)"
trap 'rm -f "$data"' EXIT
python - "$data" <<'PY'
import json, os, sys
sampling = {"max_tokens": int(os.environ.get("MAX_TOKENS", "32")), "ignore_eos": True}
entry = {"text_input": [os.environ.get("PROMPT", "Where is the capital of China?")], "stream": [True],
         "sampling_parameters": [json.dumps(sampling)]}
json.dump({"data": [entry]}, open(sys.argv[1], "w"))
PY

# perf_analyzer takes --request-count (a bounded run, no open-ended stabilisation) for one concurrency at a
# time: one run per concurrency level.
for concurrency in $(seq "$low" "$high"); do
  timeout 600 "$pa" -m "$model" -u "${GRPC_URL:-127.0.0.1:8001}" -i grpc --streaming \
    --input-data "$data" --concurrency-range "$concurrency" --request-count "${REQUEST_COUNT:-16}" "$@"
done
