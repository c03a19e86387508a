#!/usr/bin/env bash
# Serve: tritonserver (HTTP 8000, gRPC 8001, metrics 8002 on 127.0.0.1) with the `ernie` backend and the
# OpenAI-compatible frontend (127.0.0.1:8188) in front of it. Ctrl-C / SIGTERM stops both.
# Usage: scripts/serve.sh [ROW ...]      rows are model_repository/ folder names, loaded besides ernie-4.5-tiny
#   env: ERNIE_MODELS ("row row"; more rows), ERNIE_MODEL_ROOT (`:`-separated folders where hub ids are
#        looked up; <repo>/checkpoints is searched last),
#        HTTP_PORT, GRPC_PORT, METRICS_PORT, OPENAI_PORT, LOAD_TIMEOUT (600 s)
# More rows can be loaded later: curl -X POST 127.0.0.1:8000/v2/repository/models/ROW/load
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /s/^# \{0,1\}//p' scripts/serve.sh
  exit 0
fi
# shellcheck disable=SC2206
rows=(ernie-4.5-tiny "$@" ${ERNIE_MODELS:-})
for row in "${rows[@]}"; do  # a misspelled row fails here, before anything is installed or started
  if [[ "$row" == -* || "$row" == */* || ! -f "model_repository/$row/config.pbtxt" ]]; then
    echo "serve.sh: no row '$row' in model_repository/ (rows: $(ls model_repository | paste -sd ' '))" >&2
    exit 2
  fi
done

bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
# Hub ids are looked up in the user's folders first, then in ours (the embedded model's home).
export ERNIE_MODEL_ROOT="${ERNIE_MODEL_ROOT:+$ERNIE_MODEL_ROOT:}$repo/checkpoints"
http_port="${HTTP_PORT:-8000}" grpc_port="${GRPC_PORT:-8001}" metrics_port="${METRICS_PORT:-8002}"
openai_port="${OPENAI_PORT:-8188}"

mapfile -d '' server_argv < <(python scripts/triton_env.py args "$repo/model_repository" \
  "$http_port" "$grpc_port" "$metrics_port" "${rows[@]}")
server_libs="$(python scripts/triton_env.py env | sed 's/^export LD_LIBRARY_PATH=//')"

pids=()
stop_all() {
  trap - INT TERM EXIT
  # The frontend first (pids[1]): closing its streams cancels their Triton requests. tritonserver waits for
  # requests in flight, up to its exit timeout, and crashes past it, before the models' finalize has run.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
trap stop_all INT TERM EXIT

# Only tritonserver gets pytriton's libraries on its library path.
LD_LIBRARY_PATH="$server_libs" "${server_argv[@]}" &
pids+=($!)
for row in "${rows[@]}"; do
  if ! python scripts/triton_env.py wait "http://127.0.0.1:$http_port" "$row" "${LOAD_TIMEOUT:-600}"; then
    [[ "$row" == ernie-4.5-tiny ]] && { echo "serve.sh: the embedded default model failed to load" >&2; exit 1; }
    # A row that fails (e.g. its checkpoint is absent) is reported; the others keep serving.
    echo "serve.sh: $row is not serving (see above); continuing with the other rows" >&2
  fi
done
echo "serve.sh: tritonserver ready: http 127.0.0.1:$http_port grpc 127.0.0.1:$grpc_port metrics 127.0.0.1:$metrics_port"

python -m openai_frontend --triton-url "http://127.0.0.1:$http_port" --port "$openai_port" &
pids+=($!)
# Announced once it answers (its /health: 200 with tritonserver ready), so that the line means "send now".
python -c "import httpx, sys, time
for _ in range(300):
    try:
        if httpx.get('http://127.0.0.1:$openai_port/health', timeout=1).status_code == 200: sys.exit(0)
    except httpx.HTTPError: pass
    time.sleep(0.1)
sys.exit('serve.sh: the OpenAI frontend did not come up within 30 s')"
echo "serve.sh: OpenAI frontend on http://127.0.0.1:$openai_port/v1"
wait -n "${pids[@]}"  # either one exiting stops the other
