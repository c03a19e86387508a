"""Offline engine benchmark on a 0.3B-shaped random checkpoint (built once into a cache folder).

For each concurrency, that many requests with random-token prompts arrive together and decode a fixed
number of tokens (greedy, eos ignored), `--rounds` times (levels interleaved); printed per concurrency, from
its median round by tokens/s: output tokens/s, TTFT and TPOT p50/p99. One round of concurrency 1 lasts
about two seconds, and this VM's memory bandwidth, which sets the batch-1 speed, moves by 20-30 % from
minute to minute: the median of interleaved rounds is the steadier ratio.
Then the engine's per-step overhead: a batch-1 decode `LLMEngine.step()` against the bare model forward
(+ LM head) on the same context length. After each round, the concurrency-16 / concurrency-1 ratio that bare
forwards alone give (the prompts' prefill, then one decode step per output token): the model's own bound on
that round's ratio.

    python scripts/bench_engine.py                 # concurrency 1, 4, 16, 64
    python scripts/bench_engine.py --quick         # fewer tokens, concurrency up to 16
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from cli_args import positive_int  # noqa: E402
from ernie_engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from ernie_engine.layers.attention import AttentionMetadata  # noqa: E402

DEFAULT_CACHE = ROOT / "checkpoints" / "random-0.3b"
MAX_MODEL_LEN = 1024


def ensure_checkpoint(path: Path) -> Path:
    if not (path / "model.safetensors").is_file():
        print(f"building the 0.3b random checkpoint in {path} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_model.py"), "--out", str(path),
                        "--config-preset", "0.3b"], check=True)
    return path


@dataclass
class Timing:
    arrival: float
    first: float | None = None
    finish: float | None = None
    tokens: int = 0
    step_times: list[float] = field(default_factory=list)


def run_concurrency(engine: LLMEngine, concurrency: int, prompt_len: int, max_tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    timings: dict[str, Timing] = {}
    start = time.perf_counter()
    for i in range(concurrency):
        rid = f"c{concurrency}-{i}"
        prompt = rng.integers(10, engine.vocab_size, size=prompt_len).tolist()
        engine.add_request(rid, prompt_token_ids=prompt, sampling_params=params)
        timings[rid] = Timing(arrival=time.perf_counter())
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            t = timings[out.request_id]
            t.tokens += len(out.outputs[0].token_ids)
            t.first = t.first or now
            if out.finished:
                t.finish = now
    elapsed = time.perf_counter() - start
    ttft = [t.first - t.arrival for t in timings.values()]
    tpot = [(t.finish - t.first) / (t.tokens - 1) for t in timings.values() if t.tokens > 1]
    total = sum(t.tokens for t in timings.values())
    return {"concurrency": concurrency, "tok_s": total / elapsed, "elapsed": elapsed,
            "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "tpot_p50": np.percentile(tpot, 50), "tpot_p99": np.percentile(tpot, 99)}


def engine_decode_step(engine: LLMEngine, prompt_len: int, steps: int) -> tuple[float, int]:
    """Median wall time of a batch-1 decode step, and the context length it ended at."""
    prompt = list(range(100, 100 + prompt_len))
    engine.add_request("overhead", prompt_token_ids=prompt,
                       sampling_params=SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # prefill
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), prompt_len + steps


@paddle.no_grad()
def bare_forward(engine: LLMEngine, context_len: int, repeats: int, batch: int = 1,
                 query_len: int = 1) -> float:
    """Median time of model forward + LM head for `batch` sequences of `query_len` new tokens each (1: a
    decode token; context_len: a whole prompt) at `context_len`, metadata prebuilt; logits of each one's last
    token. It writes into KV blocks the engine holds free and unhashed (no prefix cache entry reads them).
    """
    runner = engine.runner
    block_size = runner.block_size
    per_seq = -(-context_len // block_size)
    free = list(engine.block_manager.free_ids)[: batch * per_seq]
    assert len(free) == batch * per_seq, "not enough free KV blocks for the bare forward"
    tables = [free[b * per_seq:(b + 1) * per_seq] for b in range(batch)]
    meta = AttentionMetadata.build([query_len] * batch, [context_len] * batch, tables, block_size)
    ids = paddle.to_tensor(np.full(batch * query_len, 123, dtype=np.int64))
    pos = paddle.to_tensor(np.tile(np.arange(context_len - query_len, context_len, dtype=np.int64), batch))
    last = paddle.to_tensor(np.arange(1, batch + 1, dtype=np.int64) * query_len - 1)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        hidden = runner.model(ids, pos, meta, runner.kv_caches)
        if query_len > 1:
            hidden = paddle.gather(hidden, last)
        runner.model.compute_logits(hidden).numpy()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def bare_ratio(engine: LLMEngine, prompt_len: int, max_tokens: int) -> float:
    """Concurrency-16 / concurrency-1 output tok/s of bare forwards alone (no engine): a level is the prefill
    of its prompts in one forward, then max_tokens - 1 decode forwards (at the level's mean context).

    Prefill is compute-bound at any batch size (16 prompts cost ~12x one), so its share of the c16 level's
    wall, with the decode step's, caps the ratio the engine can reach.
    """
    context = prompt_len + max_tokens // 2

    def level_seconds(batch: int) -> float:
        prefill = bare_forward(engine, prompt_len, repeats=2, batch=batch, query_len=prompt_len)
        return prefill + (max_tokens - 1) * bare_forward(engine, context, repeats=4, batch=batch)

    return 16 * level_seconds(1) / level_seconds(16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_CACHE, help="checkpoint (built if absent)")
    parser.add_argument("--quick", action="store_true",
                        help="concurrency 1, 4, 16 and 12 output tokens unless --max-tokens says")
    parser.add_argument("--prompt-len", type=positive_int, default=32)
    # Issue 13's output length: a throughput ratio over 16-token answers mostly measures prefill.
    parser.add_argument("--max-tokens", type=positive_int, help="default 64 (12 with --quick)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="runs of every level; the median is printed")
    args = parser.parse_args(argv)
    args.max_tokens = args.max_tokens or (12 if args.quick else 64)
    if args.prompt_len + args.max_tokens > MAX_MODEL_LEN:
        parser.error(f"--prompt-len + --max-tokens must fit the engine's max_model_len {MAX_MODEL_LEN}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    levels = [1, 4, 16] if args.quick else [1, 4, 16, 64]
    max_tokens = args.max_tokens
    model = ensure_checkpoint(args.model)
    engine = LLMEngine(EngineConfig(model=str(model), max_model_len=MAX_MODEL_LEN, max_num_seqs=64,
                                    max_num_batched_tokens=2048, kv_cache_memory_bytes=512 << 20))
    run_concurrency(engine, 2, args.prompt_len, 4, seed=0)  # warm-up: first-call kernel setup is not timed
    # Fresh prompts for every level of every round: none is served from an earlier one's prefix cache.
    # Each round is followed by its bare-forward bound: the memory speed of this VM moves minute to minute.
    runs, bounds = [], []
    for r in range(args.rounds):
        runs.append([run_concurrency(engine, c, args.prompt_len, max_tokens, seed=1000 * (r + 1) + c)
                     for c in levels])
        bounds.append(bare_ratio(engine, args.prompt_len, max_tokens))
    levels_runs = list(zip(*runs, strict=True))  # per level, its rounds
    rows = [sorted(level, key=lambda r: r["tok_s"])[len(level) // 2] for level in levels_runs]
    spread = [f"{min(r['tok_s'] for r in lv):.0f}-{max(r['tok_s'] for r in lv):.0f}" for lv in levels_runs]
    print(f"\n0.3B-shaped random checkpoint, prompt {args.prompt_len} tokens, {max_tokens} output tokens, "
          f"greedy; {os.cpu_count()} CPU cores; median of {args.rounds} rounds")
    print(f"{'conc':>5} {'out tok/s':>10} {'x conc1':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'TPOT p99':>9} {'wall s':>7} {'rounds tok/s':>13}")
    base = rows[0]["tok_s"]
    for r, tok_s_range in zip(rows, spread, strict=True):
        print(f"{r['concurrency']:>5} {r['tok_s']:>10.1f} {r['tok_s'] / base:>8.2f} {r['ttft_p50']:>9.3f} "
              f"{r['ttft_p99']:>9.3f} {r['tpot_p50']:>9.3f} {r['tpot_p99']:>9.3f} {r['elapsed']:>7.1f} "
              f"{tok_s_range:>13}")
    step, context = engine_decode_step(engine, args.prompt_len, steps=8 if args.quick else 16)
    bare = bare_forward(engine, context, repeats=8 if args.quick else 16)
    print(f"\nbatch-1 decode at context {context}: bare forward + LM head {bare * 1e3:.1f} ms, "
          f"engine step {step * 1e3:.1f} ms, overhead ratio {step / bare:.2f}")
    bare16 = bare_forward(engine, context, repeats=4, batch=16)
    print(f"bare forward + LM head for 16 decode tokens: {bare16 * 1e3:.1f} ms, so the model alone allows "
          f"at most {16 * bare / bare16:.1f}x the batch-1 decode throughput at concurrency 16")
    ratios = [run[levels.index(16)]["tok_s"] / run[0]["tok_s"] for run in runs]
    print(f"c16 / c1 per round: {', '.join(f'{x:.2f}' for x in ratios)}; bare forwards alone (no engine, "
          f"prefill + decode) after each round: {', '.join(f'{x:.2f}' for x in bounds)}")


if __name__ == "__main__":
    main()
