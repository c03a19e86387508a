"""Memory and accuracy of each quantization method against the unquantized model.

    python scripts/bench_quant.py                      # makes /tmp/ernie-0.3b-random (0.3B shape) if absent
    python scripts/bench_quant.py --model DIR --positions 2048 --seq-len 256

Per method: resident bytes of the quantized layers (against the same layers in fp32) and of the whole model,
KV cache bytes per token, and over teacher-forced random token sequences the top-1 agreement with the fp32
model and the mean KL(fp32 || quantized) in nats. "c8" keeps fp32 weights and runs every sequence through
the paged attention path with an int8 KV cache (prefill writes int8, attention reads it back).

Random weights (std 0.02) give near-uniform next-token distributions (mean top-1 probability ~1e-5 over a
103k vocabulary), on which top-1 agreement measures rounding noise between near-equal logits, and each
layer's output dwarfs the residual stream, so weight noise compounds through 18 random layers.
`--embed-scale S` multiplies the (tied, never quantized) embedding table by S: logits (hidden @ E^T) get
sharper and the residual stream carries more token signal. `--residual-scale R` multiplies o_proj and
down_proj by R (GPT-2's residual init uses R = 1/sqrt(2 * layers) = 0.167 at 18 layers); on a quantized
layer it scales the scales, which equals quantizing the scaled weight. The report states the fp32 model's
mean top-1 probability and how often its top-1 is the input token itself, so the regime is visible.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # MKL's fast path on AMD CPUs (see shared NOTES)

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT))
from ernie_engine.layers.attention import AttentionMetadata  # noqa: E402
from ernie_engine.layers.linear import Linear  # noqa: E402
from ernie_engine.layers.quant.apply import quantized_bytes, resident_bytes  # noqa: E402
from ernie_engine.layers.quant.config import QuantConfig  # noqa: E402
from ernie_engine.layers.quant.kv_cache import Int8KVCache, kv_cache_bytes_per_token  # noqa: E402
from ernie_engine.loader import load_model  # noqa: E402

from scripts.make_random_model import PRESETS, make_model  # noqa: E402

logger = logging.getLogger("bench_quant")
DEFAULT_MODEL = Path("/tmp/ernie-0.3b-random")
BLOCK = 64


def target_fp32_bytes(model: paddle.nn.Layer, config: QuantConfig) -> int:
    """fp32 bytes of the layers a method quantizes (measured on the unquantized model)."""
    return sum(
        int(layer.weight.numel()) * 4
        for name, layer in model.named_sublayers()
        if isinstance(layer, Linear) and config.method_for(name)
    )


def forward_logits(model, tokens: np.ndarray, caches) -> np.ndarray:
    """Teacher-forced logits [S, vocab]; with caches, as one paged prefill (blocks 0..n)."""
    if caches is None:
        meta = AttentionMetadata.build([len(tokens)])
    else:
        meta = AttentionMetadata.build(
            [len(tokens)], [len(tokens)], [list(range(-(-len(tokens) // BLOCK)))], BLOCK
        )
    hidden = model(paddle.to_tensor(tokens), paddle.arange(len(tokens), dtype="int64"), meta, caches)
    return model.compute_logits(hidden).numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, out: np.ndarray) -> tuple[int, float]:
    """(number of equal argmaxes, summed KL(ref || out))."""
    ref_lp, out_lp = log_softmax(ref.astype(np.float64)), log_softmax(out.astype(np.float64))
    kl = (np.exp(ref_lp) * (ref_lp - out_lp)).sum(axis=-1)
    return int((ref.argmax(-1) == out.argmax(-1)).sum()), float(kl.sum())


def int8_caches(model, num_tokens: int) -> list[Int8KVCache]:
    mc = model.config
    slots = -(-num_tokens // BLOCK) * BLOCK
    return [
        Int8KVCache.allocate(slots, mc.num_key_value_heads, mc.head_dim) for _ in range(mc.num_hidden_layers)
    ]


def load(model_dir: Path, method: str, embed_scale: float, residual_scale: float):
    model, _ = load_model(model_dir, quantization=QuantConfig.build(method))
    model.embed_tokens.weight.set_value(model.embed_tokens.weight * embed_scale)
    for name, layer in model.named_sublayers():
        if isinstance(layer, Linear) and name.endswith(("o_proj", "down_proj")):
            # Scaling a quantized weight's scales equals quantizing the scaled weight (absmax scales with it).
            target = layer.weight_scale if layer.quant_method else layer.weight
            target.set_value(target * residual_scale)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--methods", default="wint8,wint4,w4a8,c8")
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--embed-scale", type=float, default=1.0)
    parser.add_argument("--residual-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    paddle.set_flags({"FLAGS_use_mkldnn": True})
    if not (args.model / "config.json").is_file():
        print(f"making the 0.3B-shaped random checkpoint at {args.model} ...", flush=True)
        make_model(args.model, PRESETS["0.3b"])

    started = time.monotonic()
    ref_model = load(args.model, "", args.embed_scale, args.residual_scale)
    mc = ref_model.config
    rng = np.random.default_rng(args.seed)
    seqs = [rng.integers(3, mc.vocab_size, args.seq_len) for _ in range(-(-args.positions // args.seq_len))]
    refs = [forward_logits(ref_model, s, None) for s in seqs]
    num_pos = sum(len(s) for s in seqs)
    top_prob = float(np.mean([np.exp(log_softmax(r.astype(np.float64)).max(-1)).mean() for r in refs]))
    copies = float(np.mean([(r.argmax(-1) == s).mean() for r, s in zip(refs, seqs, strict=True)]))
    fp32_total = resident_bytes(ref_model)
    kv_fp32 = kv_cache_bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim)
    print(
        f"model {args.model} ({mc.num_hidden_layers} layers, hidden {mc.hidden_size}, "
        f"vocab {mc.vocab_size}); "
        f"{num_pos} teacher-forced positions; embed scale {args.embed_scale}, residual scale "
        f"{args.residual_scale}; fp32 mean top-1 prob {top_prob:.3f}, top-1 = input token at {copies:.0%}; "
        f"fp32 resident {fp32_total / 2**20:.1f} MiB; KV {kv_fp32} B/token"
    )
    header = (
        f"{'method':7} {'quant layers MiB':>16} {'x fp32':>7} {'total MiB':>10} {'x fp32':>7} "
        f"{'KV B/tok':>9} {'x fp32':>7} {'top-1':>7} {'mean KL':>9} {'s':>5}"
    )
    print(header)
    for method in args.methods.split(","):
        t0 = time.monotonic()
        if method == "c8":
            model, qbytes, target = ref_model, 0, 1
            outs = [forward_logits(model, s, int8_caches(model, len(s))) for s in seqs]
            kv = kv_cache_bytes_per_token(
                mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, int8=True
            )
        else:
            target = target_fp32_bytes(ref_model, QuantConfig.build(method))
            model = load(args.model, method, args.embed_scale, args.residual_scale)
            qbytes = quantized_bytes(model)
            outs = [forward_logits(model, s, None) for s in seqs]
            kv = kv_fp32
        agree, kl = map(sum, zip(*(compare(r, o) for r, o in zip(refs, outs, strict=True)), strict=True))
        total = resident_bytes(model)
        print(
            f"{method:7} {qbytes / 2**20:16.1f} {qbytes / target:7.3f} {total / 2**20:10.1f} "
            f"{total / fp32_total:7.3f} {kv:9d} {kv / kv_fp32:7.3f} {agree / num_pos:7.2%} "
            f"{kl / num_pos:9.5f} "
            f"{time.monotonic() - t0:5.0f}",
            flush=True,
        )
        if model is not ref_model:
            del model
    print(
        f"C8 scales: 4 B per token per KV head per layer for K and V "
        f"({2 * mc.num_hidden_layers * mc.num_key_value_heads * 4} B/token) included above; "
        f"total {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
