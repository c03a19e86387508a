"""Memory, accuracy and decode speed of each quantization method against the unquantized model.

    python scripts/bench_quant.py           # 0.3B-shaped random checkpoint (made at /tmp/ernie-0.3b-random)
    python scripts/bench_quant.py --model checkpoints/ernie-4.5-tiny --text corpus    # trained demo model
    python scripts/bench_quant.py --decode --batches 1,16          # decode step time, bf16 vs wint8

Accuracy, per method: resident bytes of the quantized layers (against the same layers in fp32) and of the
whole model, KV cache bytes per token, and over teacher-forced positions the top-1 agreement with the fp32
model, the mean KL(fp32 || quantized) in nats, and the RMS logit error ("dlogit", to set against the fp32
top-1 - top-2 logit gap in the header: top-1 flips where the error spans the gap). "c8" keeps fp32 weights
and runs every sequence through the paged attention path with an int8 KV cache (prefill writes int8,
attention reads it back).

Text. `--text random`: uniform random token sequences, every position scored. `--text corpus`:
conversations of scripts/demo_corpus.py rendered with the checkpoint's own chat template and tokenizer (as
scripts/train_demo_model.py trains the demo model), one sequence per conversation; scored are the positions
that predict the final assistant turn (what the model was trained on, so its logits are peaked there); the
"all" columns score every position. The header gives the fp32 model's mean top-1 probability on the scored
positions, so the regime is visible: a random-init model (~1e-5 over a 103k vocabulary) compares rounding
noise between near-equal logits; a trained one compares real predictions.

Weights are never edited after loading: each run loads the checkpoint as the engine does (fp32 reference with
`dtype="float32"`; quantized layers on the CPU custom kernels when available, as served).

Decode (`--decode`): one decode step (model forward + LM head) at each batch size over a `--context`-token
paged fp32 cache, as served on CPU: bf16 float weights (`dtype="bfloat16"`) against wint8 projections with the
LM head in bf16 (as FastDeploy) or in int8 (`quantize_lm_head`, as llama.cpp's q8_0); median of `--repeats`
steps. `--methods` also takes `wint8+lm_head` for the accuracy of the latter.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # MKL's fast path on AMD CPUs (see shared NOTES)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT))
from ernie_engine.chat_template import ChatTemplate  # noqa: E402
from ernie_engine.layers import cpu_kernels  # noqa: E402
from ernie_engine.layers.attention import AttentionMetadata  # noqa: E402
from ernie_engine.layers.linear import Linear  # noqa: E402
from ernie_engine.layers.quant.apply import quantized_bytes, resident_bytes  # noqa: E402
from ernie_engine.layers.quant.config import QuantConfig  # noqa: E402
from ernie_engine.layers.quant.kv_cache import Int8KVCache, kv_cache_bytes_per_token  # noqa: E402
from ernie_engine.loader import load_model  # noqa: E402
from ernie_engine.tokenizer import Tokenizer  # noqa: E402

from scripts import demo_corpus  # noqa: E402
from scripts.make_random_model import PRESETS, make_model  # noqa: E402
from scripts.train_demo_model import TEMPLATE, split_turn  # noqa: E402

logger = logging.getLogger("bench_quant")
DEFAULT_MODEL = Path("/tmp/ernie-0.3b-random")
BLOCK = 64


@dataclasses.dataclass
class Sequence:
    tokens: np.ndarray  # [S] int64
    scored: np.ndarray  # [S] bool: positions whose next-token prediction counts


def random_sequences(vocab: int, positions: int, seq_len: int, seed: int) -> list[Sequence]:
    rng = np.random.default_rng(seed)
    count = -(-positions // seq_len)
    return [Sequence(rng.integers(3, vocab, seq_len), np.ones(seq_len, bool)) for _ in range(count)]


def corpus_sequences(model_dir: Path, positions: int, seed: int) -> list[Sequence]:
    """Demo-corpus conversations (shuffled by `seed`) until >= `positions` assistant-turn predictions."""
    template = ChatTemplate.from_dir(model_dir, fallback=TEMPLATE)
    tokenizer = Tokenizer.from_dir(model_dir)
    conversations = demo_corpus.build_corpus(seed)
    np.random.default_rng(seed).shuffle(conversations)
    sequences, total = [], 0
    for conv in conversations:
        prompt, completion = split_turn(template, conv)
        prompt_ids = tokenizer.encode(prompt)
        tokens = np.asarray(prompt_ids + tokenizer.encode(completion), dtype=np.int64)
        scored = np.zeros(len(tokens), bool)
        scored[len(prompt_ids) - 1 : -1] = True  # logits at i predict token i + 1
        sequences.append(Sequence(tokens, scored))
        total += int(scored.sum())
        if total >= positions:
            return sequences
    raise ValueError(f"the demo corpus has only {total} assistant-turn positions, fewer than {positions}")


def target_fp32_bytes(model: paddle.nn.Layer, config: QuantConfig) -> int:
    """fp32 bytes of the layers a method quantizes (measured on the unquantized model; a tied LM head
    counts as the embedding table it copies)."""
    total = sum(
        int(layer.weight.numel()) * 4
        for name, layer in model.named_sublayers()
        if isinstance(layer, Linear) and config.method_for(name)
    )
    if config.lm_head and model.lm_head is None:
        total += int(model.embed_tokens.weight.numel()) * 4
    return total


def forward_logits(model: paddle.nn.Layer, tokens: np.ndarray, caches: list | None) -> np.ndarray:
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


@dataclasses.dataclass
class Agreement:
    positions: int = 0
    agree: int = 0
    kl: float = 0.0
    sq_dlogit: float = 0.0  # sum over positions of the mean squared logit error

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        ref_lp, out_lp = log_softmax(ref.astype(np.float64)), log_softmax(out.astype(np.float64))
        self.kl += float((np.exp(ref_lp) * (ref_lp - out_lp)).sum())
        self.agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        self.sq_dlogit += float(((out.astype(np.float64) - ref) ** 2).mean(-1).sum())
        self.positions += len(ref)

    def row(self) -> str:
        """Top-1 agreement, mean KL, RMS logit error."""
        rms = np.sqrt(self.sq_dlogit / self.positions)
        return f"{self.agree / self.positions:7.2%} {self.kl / self.positions:9.5f} {rms:7.4f}"


def int8_caches(model: paddle.nn.Layer, num_tokens: int) -> list[Int8KVCache]:
    mc = model.config
    slots = -(-num_tokens // BLOCK) * BLOCK
    return [
        Int8KVCache.allocate(slots, mc.num_key_value_heads, mc.head_dim) for _ in range(mc.num_hidden_layers)
    ]


def load_fp32(model_dir: Path, config: QuantConfig | None = None) -> paddle.nn.Layer:
    model, _ = load_model(model_dir, dtype="float32", quantization=config)
    return model


def run_method(
    spec: str, model_dir: Path, ref_model: paddle.nn.Layer, seqs: list[Sequence], refs: list[np.ndarray]
) -> tuple[paddle.nn.Layer, int, int, Agreement, Agreement]:
    """(model, quantized bytes, fp32 bytes of those layers, scored agreement, all-position agreement)."""
    if spec == "c8":
        model, qbytes, target = ref_model, 0, 1
        outs = [forward_logits(model, s.tokens, int8_caches(model, len(s.tokens))) for s in seqs]
    elif spec == "bf16":  # unquantized, as a bf16 checkpoint is served: bf16 weights and activations
        model, qbytes, target = load_model(model_dir, dtype="bfloat16")[0], 0, 1
        outs = [forward_logits(model, s.tokens, None) for s in seqs]
    else:
        method, _, part = spec.partition("+")  # "wint8+lm_head": the LM head quantized too
        config = QuantConfig.build(method, lm_head=part == "lm_head")
        target = target_fp32_bytes(ref_model, config)
        model = load_fp32(model_dir, config)
        qbytes = quantized_bytes(model)
        outs = [forward_logits(model, s.tokens, None) for s in seqs]
    scored, every = Agreement(), Agreement()
    for seq, ref, out in zip(seqs, refs, outs, strict=True):
        scored.add(ref[seq.scored], out[seq.scored])
        every.add(ref[:-1], out[:-1])  # the last position predicts nothing in the text
    return model, qbytes, target, scored, every


@dataclasses.dataclass
class ReferenceStats:
    """The fp32 model on the scored positions."""

    positions: int
    top_prob: float  # mean top-1 probability
    next_token: float  # share of positions whose top-1 is the text's next token
    gap: float  # median logit gap between the top-1 and top-2 tokens

    @classmethod
    def of(cls, seqs: list[Sequence], refs: list[np.ndarray]) -> ReferenceStats:
        top_probs, gaps, hits, num_next = [], [], 0, 0
        for seq, ref in zip(seqs, refs, strict=True):
            scored = ref[seq.scored].astype(np.float64)
            top_probs.append(np.exp(log_softmax(scored).max(-1)))
            top2 = np.sort(scored, axis=-1)[:, -2:]
            gaps.append(top2[:, 1] - top2[:, 0])
            index = np.flatnonzero(seq.scored[:-1])  # positions with a next token in the text
            hits += int((ref[index].argmax(-1) == seq.tokens[index + 1]).sum())
            num_next += len(index)
        probs = np.concatenate(top_probs)
        gap = float(np.median(np.concatenate(gaps)))
        return cls(len(probs), float(probs.mean()), hits / max(num_next, 1), gap)


def accuracy(args: argparse.Namespace) -> None:
    started = time.monotonic()
    ref_model = load_fp32(args.model)
    mc = ref_model.config
    if args.text == "corpus":
        seqs = corpus_sequences(args.model, args.positions, args.seed)
    else:
        seqs = random_sequences(mc.vocab_size, args.positions, args.seq_len, args.seed)
    refs = [forward_logits(ref_model, s.tokens, None) for s in seqs]
    stats = ReferenceStats.of(seqs, refs)
    fp32_total = resident_bytes(ref_model)
    kv_fp32 = kv_cache_bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim)
    kv_c8 = kv_cache_bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, int8=True)
    print(
        f"model {args.model} ({mc.num_hidden_layers} layers, hidden {mc.hidden_size}, "
        f"vocab {mc.vocab_size}); text {args.text}: {len(seqs)} sequences, "
        f"{sum(len(s.tokens) for s in seqs)} tokens, {stats.positions} scored positions; "
        f"fp32 on scored: mean top-1 prob {stats.top_prob:.3g}, top-1 = actual next token "
        f"{stats.next_token:.1%}, median top-1 - top-2 logit gap {stats.gap:.3g}; "
        f"fp32 resident {fp32_total / 2**20:.1f} MiB; KV {kv_fp32} B/token; "
        f"cpu kernels {'on' if cpu_kernels.available() else 'off'}"
    )
    print(
        f"{'method':13} {'quant MiB':>9} {'x fp32':>7} {'total MiB':>9} {'x fp32':>7} {'KV B/tok':>8} "
        f"{'x fp32':>7} {'top-1':>7} {'mean KL':>9} {'dlogit':>7} {'all: top-1':>7} {'KL':>9} {'dlogit':>7} "
        f"{'s':>5}"
    )
    for spec in args.methods.split(","):
        t0 = time.monotonic()
        model, qbytes, target, scored, every = run_method(spec, args.model, ref_model, seqs, refs)
        kv = kv_c8 if spec == "c8" else kv_fp32
        total = resident_bytes(model)
        print(
            f"{spec:13} {qbytes / 2**20:9.1f} {qbytes / target:7.3f} {total / 2**20:9.1f} "
            f"{total / fp32_total:7.3f} {kv:8d} {kv / kv_fp32:7.3f} {scored.row()} {every.row()} "
            f"{time.monotonic() - t0:5.0f}",
            flush=True,
        )
        del model
    print(
        f"C8 scales: 4 B per token per KV head per layer for K and V "
        f"({2 * mc.num_hidden_layers * mc.num_key_value_heads * 4} B/token) included above; "
        f"total {time.monotonic() - started:.0f} s"
    )


def decode_step_ms(model: paddle.nn.Layer, batch: int, context: int, repeats: int) -> float:
    """Median ms of one decode step: `batch` sequences, one new token each after `context` cached tokens."""
    mc = model.config
    blocks = -(-(context + 1) // BLOCK)
    slots = batch * blocks * BLOCK
    shape = [slots, mc.num_key_value_heads, mc.head_dim]
    caches = [(paddle.rand(shape), paddle.rand(shape)) for _ in range(mc.num_hidden_layers)]
    tables = [list(range(b * blocks, (b + 1) * blocks)) for b in range(batch)]
    meta = AttentionMetadata.build([1] * batch, [context + 1] * batch, tables, BLOCK)
    tokens = paddle.to_tensor(np.random.default_rng(batch).integers(3, mc.vocab_size, batch))
    positions = paddle.full([batch], context, dtype="int64")
    times = []
    for step in range(repeats + 3):  # 3 warm-up steps
        t0 = time.perf_counter()
        model.compute_logits(model(tokens, positions, meta, caches)).numpy()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def decode(args: argparse.Namespace) -> None:
    if not cpu_kernels.available():
        raise SystemExit("--decode measures the CPU custom kernels, which are unavailable here (see the log)")
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"model {args.model}; decode step (forward + LM head), context {args.context}, "
        f"median of {args.repeats}"
    )
    print(f"{'weights':22} " + " ".join(f"{f'batch {b} ms':>11}" for b in batches))
    variants = {
        "bf16": ("bfloat16", None),
        "wint8 (+ bf16 lm_head)": ("auto", QuantConfig.build("wint8")),
        "wint8 (+ int8 lm_head)": ("auto", QuantConfig.build("wint8", lm_head=True)),
    }
    for label, (dtype, config) in variants.items():
        model, _ = load_model(args.model, dtype=dtype, quantization=config)
        times = [decode_step_ms(model, b, args.context, args.repeats) for b in batches]
        print(f"{label:22} " + " ".join(f"{t:11.1f}" for t in times), flush=True)
        del model


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse up front what used to fail after the fp32 reference run (a traceback, or a division by zero)."""
    try:
        batches = [int(b) for b in args.batches.split(",")]
        for spec in set(args.methods.split(",")) - {"bf16", "c8"}:
            method, _, part = spec.partition("+")  # as run_method reads it
            if not method or part not in ("", "lm_head"):
                raise ValueError(f"unknown method {spec!r}")
            QuantConfig.build(method)  # ValueError naming an unknown quantization
    except ValueError as err:
        parser.error(str(err))
    if min(*batches, args.positions, args.seq_len, args.context, args.repeats) < 1:
        parser.error("--batches, --positions, --seq-len, --context and --repeats must be at least 1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--methods", default="wint8,wint4,w4a8,c8")
    parser.add_argument("--text", choices=["random", "corpus"], default="random")
    parser.add_argument("--positions", type=int, default=2048, help="scored positions (at least)")
    parser.add_argument("--seq-len", type=int, default=256, help="random text only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", action="store_true", help="time decode steps instead of accuracy")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ernie_engine").setLevel(logging.WARNING)  # per-load INFO lines would bury the table
    paddle.set_flags({"FLAGS_use_mkldnn": True})
    if not (args.model / "config.json").is_file():
        if args.model != DEFAULT_MODEL:
            raise SystemExit(f"no checkpoint at {args.model}")
        print(f"making the 0.3B-shaped random checkpoint at {args.model} ...", flush=True)
        make_model(args.model, PRESETS["0.3b"])
    with paddle.no_grad():
        decode(args) if args.decode else accuracy(args)


if __name__ == "__main__":
    main()
