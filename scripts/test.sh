#!/usr/bin/env bash
# The test command: installs everything the suite needs (into .venv), then runs ruff and pytest.
# Every server the tests use (tritonserver, the OpenAI frontend) is started by the tests' own fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
source .venv/bin/activate
export MKL_DEBUG_CPU_TYPE=5  # MKL's fast path on AMD CPUs (see docs)
ruff check backend openai_frontend tests scripts
python -m pytest -q -p no:cacheprovider "$@"
