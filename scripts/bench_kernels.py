"""Benchmark the CPU custom ops (layers/cpu_kernels.py) on the ERNIE-4.5-0.3B shapes against Paddle fp32.

Prints the machine's streaming read bandwidth, then per Linear shape at M = 1, 16 and 32 (--rows) the median
time, the weight bytes streamed per second and the GFLOP/s for Paddle's fp32 matmul and the bf16 / wint8 /
wint4 kernels; then paged attention for a decode batch (bf16 and fp32 caches) and for prefills (--prefill),
and a decode-step estimate (18 layers + LM head + attention).
Each weight is cycled through enough copies to exceed the last-level cache, so decode numbers are DRAM-bound
as in a real step; the attention benches' caches (one layer's, a few MB) stay in the L3 cache. The machine
is shared: every figure is a median over --repeats runs.

    MKL_DEBUG_CPU_TYPE=5 python scripts/bench_kernels.py [--repeats 15] [--rows 1,16,32] [--formats fp32,bf16]
    ERNIE_CPU_KERNELS_THREADS=1 python scripts/bench_kernels.py --cpu-time --formats bf16 --rows 16,64,512
    python scripts/bench_kernels.py --formats none --rows 16 --prefill 16x128,4x256+768  # attention only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paddle

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_args import positive_int, positive_ints  # noqa: E402
from ernie_engine.device import keep_freed_memory  # noqa: E402
from ernie_engine.layers import cpu_kernels  # noqa: E402
from ernie_engine.layers.attention import AttentionMetadata, paged_attention  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, VOCAB = 1024, 16, 2, 128, 3072, 18, 103424
# (name, K, N) of the 0.3B model's Linears; lm_head is the tied embedding table.
SHAPES = [
    ("qkv_proj", HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
    ("o_proj", HEADS * HEAD_DIM, HIDDEN),
    ("up_gate_proj", HIDDEN, 2 * INTER),
    ("down_proj", INTER, HIDDEN),
    ("lm_head", HIDDEN, VOCAB),
]
CACHE_BYTES = 96 * 2**20  # > the 32 MiB L3: weights come from DRAM as in a real decode step
FORMATS = ("fp32", "bf16", "wint8", "wint4")
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "wint8": 1.0, "wint4": 0.5}


# Wall time by default; --cpu-time switches to the process's CPU time (steadier on a shared machine).
clock: Callable[[], float] = time.perf_counter


def median_time(fn: Callable[[int], object], repeats: int) -> float:
    """Median seconds of fn(i) over `repeats` calls (after one warm-up call)."""
    fn(0)
    times = []
    for i in range(repeats):
        start = clock()
        fn(i + 1)
        times.append(clock() - start)
    return statistics.median(times)


def read_bandwidth(repeats: int) -> float:
    buffer = paddle.ones([512 * 2**20 // 8], dtype="int64")
    seconds = median_time(lambda _: cpu_kernels.read_sum(buffer), repeats)
    return 512 * 2**20 / seconds / 1e9


def make_weights(fmt: str, k: int, n: int) -> list[tuple[paddle.Tensor, ...]]:
    """Enough copies of one weight (in its kernel layout) to exceed the cache."""
    copies = max(1, int(CACHE_BYTES // (k * n * BYTES_PER_WEIGHT[fmt])) + 1)
    out = []
    for _ in range(copies):
        if fmt == "fp32":
            out.append((paddle.randn([k, n]),))
        elif fmt == "bf16":
            out.append((cpu_kernels.pack_weight(paddle.randn([n, k]).astype("bfloat16"), 16),))
        elif fmt == "wint8":
            q = paddle.randint(-127, 128, [n, k]).astype("int8")
            out.append((cpu_kernels.pack_weight(q, 8), paddle.rand([1, n])))
        else:
            q = paddle.randint(-128, 128, [n, k // 2]).astype("int8")
            out.append((cpu_kernels.pack_weight(q, 4), paddle.rand([k // 128, n])))
    return out


def run_linear(fmt: str, x: paddle.Tensor, weights: tuple[paddle.Tensor, ...]) -> paddle.Tensor:
    if fmt == "fp32":
        return paddle.matmul(x, weights[0])
    n = weights[0].shape[0] * cpu_kernels.LANES
    if fmt == "bf16":
        return cpu_kernels.linear_packed(x, weights[0], n, 16)
    return cpu_kernels.linear_packed(x, weights[0], n, 8 if fmt == "wint8" else 4, weights[1])


def bench_linears(repeats: int, rows: list[int], formats: list[str]) -> dict[tuple[str, str, int], float]:
    print("\n## Linear (median ms; GB/s = weight bytes / time; GFLOP/s = 2 M K N / time)")
    print(f"{'shape':<28}{'M':>4}" + "".join(f"{f:>34}" for f in formats))
    times: dict[tuple[str, str, int], float] = {}
    for name, k, n in SHAPES:
        per_format = {fmt: make_weights(fmt, k, n) for fmt in formats}
        for m in rows:
            x = paddle.randn([m, k])
            cells = []
            for fmt, copies in per_format.items():
                seconds = median_time(
                    lambda i, f=fmt, c=copies, x=x: run_linear(f, x, c[i % len(c)]), repeats
                )
                times[(name, fmt, m)] = seconds
                gbps = k * n * BYTES_PER_WEIGHT[fmt] / seconds / 1e9
                gflops = 2 * m * k * n / seconds / 1e9
                cells.append(f"{seconds * 1e3:9.3f} ms {gbps:6.1f} GB/s {gflops:6.1f} GF/s")
            print(f"{f'{name} {k}->{n}':<28}{m:>4}" + "".join(f"{c:>34}" for c in cells))
        del per_format
    return times


def attention_step(
    seqs: int, query: int, context: int, cache_dtype: str = "bfloat16", block_size: int = 16
) -> Callable[[int], object]:
    """One paged-attention call: `seqs` sequences of `query` new tokens, each `context` tokens long, over
    caches of `cache_dtype` (bf16: the engine's for bf16 weights)."""
    blocks = -(-context // block_size)
    tables = [list(range(b * blocks, (b + 1) * blocks)) for b in range(seqs)]
    meta = AttentionMetadata.build([query] * seqs, [context] * seqs, tables, block_size)
    slots = seqs * blocks * block_size
    caches = tuple(paddle.randn([slots, KV_HEADS, HEAD_DIM]).astype(cache_dtype) for _ in range(2))
    q = paddle.randn([seqs * query, HEADS, HEAD_DIM])
    k, v = paddle.randn([seqs * query, KV_HEADS, HEAD_DIM]), paddle.randn([seqs * query, KV_HEADS, HEAD_DIM])

    def step(_: int) -> paddle.Tensor:
        if cpu_kernels.caches_supported(*caches):  # the kernel alone: the engine writes k / v in rotary's op
            return cpu_kernels.paged_attention(q, *caches, meta, HEAD_DIM**-0.5)
        return paged_attention(q, k, v, meta, caches, HEAD_DIM**-0.5)  # Paddle: scatter, gather, SDPA

    return step


def bench_attention(repeats: int, batch: int, context: int) -> tuple[float, float, float]:
    """One decode step's attention over `batch` sequences of `context` tokens: (kernel on bf16 caches, kernel
    on fp32 caches, Paddle on fp32 caches) seconds."""
    kernel = median_time(attention_step(batch, 1, context), repeats)
    fp32_step = attention_step(batch, 1, context, "float32")
    kernel_fp32 = median_time(fp32_step, repeats)
    cpu_kernels.set_enabled(False)
    try:
        fallback = median_time(fp32_step, repeats)
    finally:
        cpu_kernels.set_enabled(True)
    return kernel, kernel_fp32, fallback


def bench_prefill_attention(repeats: int, seqs: int, query: int, cached: int) -> float:
    """One prefill call's attention: `seqs` sequences of `query` new tokens after `cached` ones, seconds."""
    return median_time(attention_step(seqs, query, cached + query), repeats)


def prefill_cases(text: str) -> list[tuple[int, int, int]]:
    """SEQSxTOKENS[+CACHED],... -> (seqs, query tokens, cached tokens) per case."""
    cases = []
    for case in text.split(","):
        shape, plus, cached = case.partition("+")
        seqs, query = (positive_int(n) for n in shape.split("x"))  # ValueError unless exactly two
        cached_tokens = int(cached) if plus else 0
        if cached_tokens < 0:
            raise ValueError(case)
        cases.append((seqs, query, cached_tokens))
    return cases


def formats_subset(text: str) -> list[str]:
    names = text.split(",")
    if not set(names) <= set(FORMATS):
        raise argparse.ArgumentTypeError(f"{text!r}: each must be one of {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in names]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument(
        "--context", type=positive_int, default=192, help="tokens per sequence for the attention bench"
    )
    parser.add_argument("--rows", type=positive_ints, default="1,16,32",
                        help="comma-separated M (decode batch sizes)")
    parser.add_argument(
        "--prefill",
        type=prefill_cases,
        default="16x128,4x256+768",
        help="comma-separated prefill attention cases: SEQSxTOKENS[+CACHED] (a chunk after CACHED tokens)",
    )
    parser.add_argument("--formats", type=formats_subset, default=",".join(FORMATS),
                        help=f"comma-separated subset of {FORMATS}")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time this process's CPU seconds, not wall time (ERNIE_CPU_KERNELS_THREADS=1: one core's rate)",
    )
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    keep_freed_memory()  # as the engine does: outputs reuse memory instead of page-faulting fresh pages
    if args.cpu_time:
        global clock
        clock = time.process_time
    rows, formats = args.rows, args.formats
    if not cpu_kernels.available():
        sys.exit("cpu kernels unavailable (see the log)")
    paddle.set_device("cpu")
    bandwidth = read_bandwidth(args.repeats)
    print(f"streaming read bandwidth (all threads, 512 MiB buffer): {bandwidth:.1f} GB/s")
    times = bench_linears(args.repeats, rows, formats)

    print(f"\n## Paged attention, decode, context {args.context} (median ms)")
    attention = {}
    for batch in rows:
        kernel, kernel_fp32, fallback = bench_attention(args.repeats, batch, args.context)
        attention[batch] = (kernel, fallback)
        print(
            f"batch {batch:>2}: kernel {kernel * 1e3:.3f} ms on bf16 caches, {kernel_fp32 * 1e3:.3f} ms on "
            f"fp32 ones; Paddle gather+SDPA {fallback * 1e3:.3f} ms ({fallback / kernel:.1f}x)"
        )

    print("\n## Paged attention, prefill (median ms; GFLOP/s = 4 D H sum of the keys each query sees / time)")
    for seqs, query, cached in args.prefill:
        seconds = bench_prefill_attention(args.repeats, seqs, query, cached)
        keys = seqs * sum(cached + i + 1 for i in range(query))
        gflops = 4 * HEAD_DIM * HEADS * keys / seconds / 1e9
        label = f"{seqs} x {query} tokens" + (f" after {cached} cached" if cached else "")
        print(f"{label:<32} kernel {seconds * 1e3:8.3f} ms {gflops:6.1f} GFLOP/s")

    print("\n## 0.3B decode step estimate: 18 x (4 Linears + attention) + LM head (norms/rope/etc. excluded)")
    layer_names = [name for name, _, _ in SHAPES if name != "lm_head"]
    for m in rows:
        for fmt in formats:
            # Quantized rows keep the LM head in bf16 (layers/quant leaves it unquantized).
            head_fmt = fmt if fmt in ("fp32", "bf16") else "bf16"
            if ("lm_head", head_fmt, m) not in times:
                continue
            attn = attention[m][1 if fmt == "fp32" else 0]
            step = (
                LAYERS * (sum(times[(n, fmt, m)] for n in layer_names) + attn)
                + times[("lm_head", head_fmt, m)]
            )
            weight_bytes = (
                LAYERS * sum(k * n for name, k, n in SHAPES if name != "lm_head") * BYTES_PER_WEIGHT[fmt]
            )
            weight_bytes += HIDDEN * VOCAB * BYTES_PER_WEIGHT[head_fmt]
            print(
                f"M={m:>2} {fmt:<6} {step * 1e3:8.1f} ms/step  {m / step:7.1f} tok/s  "
                f"{weight_bytes / step / 1e9:5.1f} GB/s of weights ({weight_bytes / 2**20:.0f} MiB/step)"
            )
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"\n(machine read bandwidth {bandwidth:.1f} GB/s; load average {load})")


if __name__ == "__main__":
    main()
