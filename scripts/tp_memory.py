"""Per-rank resident weight bytes of a tensor-parallel model, against the whole model loaded on one device.

Each rank loads only its shard; replicated tensors (norms, MoE routers) keep a rank slightly above 1/TP.
Bytes are the parameters and buffers a rank holds (as loaded for serving: CPU kernel repacks included).

    python scripts/tp_memory.py --model checkpoints/random-0.3b --tp 2 4
    (make a checkpoint with: python scripts/make_random_model.py --out /tmp/r03b --config-preset 0.3b)
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))
from ernie_engine.config import EngineConfig  # noqa: E402
from ernie_engine.distributed.executor import TensorParallelExecutor  # noqa: E402
from ernie_engine.distributed.shard_runner import resident_bytes  # noqa: E402
from ernie_engine.loader import load_model  # noqa: E402

MIB = 2**20


def single_device_bytes(model_dir: Path, dtype: str) -> int:
    model, _ = load_model(model_dir, dtype=None if dtype == "auto" else dtype, device="cpu")
    total = resident_bytes(model)
    del model
    gc.collect()
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder")
    parser.add_argument("--tp", type=int, nargs="+", default=[2], help="tensor-parallel sizes to measure")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no checkpoint there (config.json)")
    if min(args.tp) < 1:
        parser.error(f"--tp sizes must be at least 1, got {args.tp}")
    logging.basicConfig(level=logging.WARNING)

    total = single_device_bytes(args.model, args.dtype)
    print(f"{args.model}: TP=1 holds {total / MIB:.1f} MiB of weights")
    for tp in args.tp:
        config = EngineConfig(model=str(args.model), tensor_parallel_size=tp, dtype=args.dtype)
        executor = TensorParallelExecutor(config, args.model)
        try:
            per_rank = executor.resident_bytes
        finally:
            executor.shutdown()
        print(f"TP={tp}: ideal 1/TP = {total / tp / MIB:.1f} MiB per rank")
        for rank, nbytes in enumerate(per_rank):
            print(f"  rank {rank}: {nbytes / MIB:8.1f} MiB = {nbytes / total:6.1%} of TP=1 "
                  f"({nbytes * tp / total:.3f} x 1/TP)")
        print(f"  sum over ranks: {sum(per_rank) / MIB:.1f} MiB ({sum(per_rank) / total:.3f} x TP=1)")


if __name__ == "__main__":
    main()
