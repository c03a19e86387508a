"""Structured-output overhead: decode step time of a batch of 16 with half the requests grammar-constrained.

    python scripts/bench_structured.py                      # a tiny random checkpoint made on the fly
    python scripts/bench_structured.py --model checkpoints/ernie-4.5-tiny --steps 64

Both runs decode the same prompts for the same number of steps (free requests ignore eos; the schema's
string is long enough that no constrained request completes early). Prints the median step time of each
and their ratio (target: constrained / unconstrained <= 1.5).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))
from ernie_engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

BATCH = 16
WARMUP_STEPS = 3  # prefill and the first decode steps
SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 400, "maxLength": 400}},
    "required": ["text"],
    "additionalProperties": False,
}


def step_times(engine: LLMEngine, constrained: int, steps: int, tag: str) -> list[float]:
    """Decode-step wall times with `constrained` of the BATCH requests carrying the JSON schema."""
    for i in range(BATCH):
        guided = {"guided_json": SCHEMA} if i < constrained else {}
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=steps + WARMUP_STEPS, ignore_eos=True,
                                **guided)
        engine.add_request(f"{tag}-{i}", prompt=f"Request {i}: describe the weather.", sampling_params=params)
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[WARMUP_STEPS:WARMUP_STEPS + steps]


def make_random_model(out: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_model.py"), "--out", str(out)],
                   check=True, capture_output=True)
    return out


def run(model: Path, steps: int) -> None:
    engine = LLMEngine(EngineConfig(model=str(model), max_model_len=1024, max_num_seqs=BATCH, block_size=16,
                                    num_gpu_blocks_override=BATCH * 1024 // 16))
    step_times(engine, BATCH // 2, 4, "warmup")  # compiles the grammar, warms caches
    free = statistics.median(step_times(engine, 0, steps, "free"))
    mixed = statistics.median(step_times(engine, BATCH // 2, steps, "mixed"))
    print(f"model {model} | batch {BATCH} | {steps} decode steps each")
    print(f"  unconstrained          median step {free * 1e3:8.2f} ms")
    print(f"  8 of 16 json_schema    median step {mixed * 1e3:8.2f} ms")
    print(f"  ratio {mixed / free:.2f}x (target <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: a tiny random one)")
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.model:
        run(args.model, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(make_random_model(Path(tmp) / "ernie-random"), args.steps)


if __name__ == "__main__":
    main()
