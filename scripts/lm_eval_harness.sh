#!/usr/bin/env bash
# Manual, not in CI: lm-evaluation-harness against a running frontend (scripts/serve.sh). Its local-completions
# model finds our remote tokenizer (/tokenizer_info, /tokenize) and scores choices by loglikelihood
# (/v1/completions with echo and logprobs: the prompt tokens' logprobs). Task: the demo model's capitals as
# 4-way multiple choice (scripts/lm_eval_task.py). lm-eval is installed in its own venv the first time.
#
# Usage: scripts/lm_eval_harness.sh [BASE_URL] [MODEL]   (http://127.0.0.1:8188, ernie-4.5-tiny)
#   env: LM_EVAL_DIR (.runtime/lm-eval: venv and task), TORCH_VERSION (2.13.0), LM_EVAL_ARGS (more lm_eval args)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /s/^# \{0,1\}//p' scripts/lm_eval_harness.sh
  exit 0
fi
repo="$(pwd)"
base_url="${1:-http://127.0.0.1:8188}"
model="${2:-ernie-4.5-tiny}"
dir="${LM_EVAL_DIR:-$repo/.runtime/lm-eval}"

if [[ ! -x "$dir/venv/bin/lm_eval" ]]; then
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}" "lm-eval[api]"
fi
"$dir/venv/bin/python" scripts/lm_eval_task.py "$dir/tasks"
# The task's data is a local file: no dataset hub.
# shellcheck disable=SC2086
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$dir/venv/bin/lm_eval" --model local-completions \
  --model_args "model=$model,base_url=$base_url/v1/completions,num_concurrent=2,max_retries=1" \
  --include_path "$dir/tasks" --tasks ernie_demo_capitals ${LM_EVAL_ARGS:-}
