"""Benchmark the MoE layer at ERNIE-4.5-21B-A3B shapes: grouped dispatch vs a masked loop over all experts.

Each step runs the decoder's feed-forward part on a decode batch: router, routed experts, shared experts.
"grouped" is `layers.moe.SparseMoeBlock` (slots sorted by expert, one matmul per active expert);
"masked loop" runs every expert on every token and zeroes the unchosen ones, the naive baseline.
Both are timed on the routed experts alone and on whole layers (router and shared experts included), and
both multiply by the same weights the same way (`GroupedExperts.expert_forward`): fp32 through Paddle, or,
with --weights bfloat16 / wint8 / wint4, repacked for the CPU kernels as the loader does for such a model.

    python scripts/bench_moe.py [--batch 16 64] [--layers 1] [--steps 5] [--weights bfloat16]

One layer of 64 fp32 experts is ~3 GB of weights, so keep --layers small on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # MKL's fast path on AMD CPUs; must precede paddle's import

import paddle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))
from ernie_engine.layers import cpu_kernels  # noqa: E402
from ernie_engine.layers.moe import SparseMoeBlock  # noqa: E402
from ernie_engine.layers.quant.apply import quantize_model  # noqa: E402
from ernie_engine.layers.quant.config import QuantConfig  # noqa: E402
from ernie_engine.models.ernie4_5 import Ernie4_5MLP  # noqa: E402

# ERNIE-4.5-21B-A3B
HIDDEN, NUM_EXPERTS, TOP_K, EXPERT_WIDTH, NUM_SHARED = 2560, 64, 6, 1536, 2


def build_layer(seed: int, weights: str) -> SparseMoeBlock:
    paddle.seed(seed)
    shared = Ernie4_5MLP(HIDDEN, EXPERT_WIDTH * NUM_SHARED)
    block = SparseMoeBlock(HIDDEN, NUM_EXPERTS, TOP_K, EXPERT_WIDTH, 1e-12, shared)
    for param in block.parameters():
        if param.ndim == 3:  # expert by expert: a 2 GB random temporary would double the peak memory
            for expert in range(param.shape[0]):
                param[expert] = paddle.normal(0.0, 0.02, param.shape[1:])
        else:
            param.set_value(paddle.normal(0.0, 0.02, param.shape))
    block.moe_statics.e_score_correction_bias.set_value(paddle.randn([1, NUM_EXPERTS]) * 1e-3)
    if weights in ("wint8", "wint4"):  # routed and shared experts, as `--quantization wint8/wint4` does
        quantize_model(block, QuantConfig(dense_method=weights, moe_method=weights))
    if weights != "float32":
        cpu_kernels.prepare_model(block, bf16_weights=weights == "bfloat16")
    return block


def masked_experts(
    block: SparseMoeBlock, x: paddle.Tensor, weights: paddle.Tensor, expert_ids: paddle.Tensor
) -> paddle.Tensor:
    """Every expert over every token; a token's weight is 0 for the experts it did not choose."""
    dense = paddle.zeros([x.shape[0], NUM_EXPERTS]).put_along_axis(expert_ids, weights, axis=-1)
    out = paddle.zeros_like(x)
    for e in range(NUM_EXPERTS):
        out = out + dense[:, e : e + 1] * block.experts.expert_forward(e, x)
    return out


def masked_layer(block: SparseMoeBlock, x: paddle.Tensor) -> paddle.Tensor:
    """The whole MoE layer (router, routed experts, shared experts) with the masked loop."""
    weights, expert_ids = block.gate(x, block.moe_statics.e_score_correction_bias)
    return masked_experts(block, x, weights, expert_ids) + block.shared_experts(x)


def median_seconds(run: Callable[[], paddle.Tensor], steps: int) -> float:
    """Median wall time of `run` over `steps` calls, after one warm-up call."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        run().numpy()  # wait for the result
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def bench_batch(layers: list[SparseMoeBlock], batch: int, steps: int) -> list[tuple[str, float, float]]:
    """(what, masked ms, grouped ms) for the routed experts alone and for whole layers."""
    x = paddle.randn([batch, HIDDEN])
    first = layers[0]
    weights, ids = first.gate(x, first.moe_statics.e_score_correction_bias)
    masked = masked_experts(first, x, weights, ids)
    # Relative: bf16 kernels round x to bf16 for batched rows only, and the two paths batch differently.
    diff = float((first.experts(x, weights, ids) - masked).abs().max() / masked.abs().max())
    if diff > 1e-2:
        raise AssertionError(f"grouped and masked experts disagree by {diff} (relative)")

    def through(forward: Callable[[SparseMoeBlock, paddle.Tensor], paddle.Tensor]) -> paddle.Tensor:
        h = x
        for layer in layers:
            h = forward(layer, h)
        return h

    active = len(set(ids.numpy().ravel().tolist()))
    return [
        (
            f"routed experts, layer 0 ({active}/{NUM_EXPERTS} active)",
            median_seconds(lambda: masked_experts(first, x, weights, ids), steps),
            median_seconds(lambda: first.experts(x, weights, ids), steps),
        ),
        (
            f"{len(layers)} whole MoE layer(s): router + experts + shared",
            median_seconds(lambda: through(masked_layer), steps),
            median_seconds(lambda: through(lambda layer, h: layer(h)), steps),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="tokens per step (decode batch)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--weights",
        choices=["float32", "bfloat16", "wint8", "wint4"],
        default="float32",
        help="expert and shared-expert weights: fp32 via Paddle, else repacked for the CPU kernels",
    )
    args = parser.parse_args(argv)
    if min(*args.batch, args.layers, args.steps) < 1:
        parser.error("--batch, --layers and --steps must be at least 1")
    if args.weights != "float32" and not cpu_kernels.available():
        parser.error(f"--weights {args.weights} needs the CPU kernels (see the log for why they are off)")

    print(
        f"MoE at ERNIE-4.5-21B-A3B shapes: hidden {HIDDEN}, {NUM_EXPERTS} experts, top-{TOP_K}, expert width "
        f"{EXPERT_WIDTH}, {NUM_SHARED} shared experts; {args.weights} weights (fp32 compute) on "
        f"{paddle.get_device()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"median of {args.steps} steps"
    )
    print(f"{'batch':>5}  {'what':<52}{'masked ms':>11}{'grouped ms':>12}{'speed-up':>10}")
    with paddle.no_grad():
        layers = [build_layer(seed, args.weights) for seed in range(args.layers)]
        for batch in args.batch:
            for what, masked, grouped in bench_batch(layers, batch, args.steps):
                times = f"{masked * 1e3:>11.1f}{grouped * 1e3:>12.1f}{masked / grouped:>9.2f}x"
                print(f"{batch:>5}  {what:<52}{times}")


if __name__ == "__main__":
    main()
