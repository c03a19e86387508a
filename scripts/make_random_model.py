"""Generate a small ERNIE-4.5 checkpoint in the `-Paddle` layout with random weights, deterministically.

The tokenizer is a real sentencepiece BPE model trained on a built-in multilingual text (English, Chinese,
digits, punctuation; anything else, e.g. emoji, goes through byte fallback) with the ERNIE special tokens at
the ids the real checkpoints use (`<unk>` 0, `<s>` 1, `</s>` 2). Same arguments give byte-identical files.

    python scripts/make_random_model.py --out checkpoints/ernie-4.5-tiny-random
    python scripts/make_random_model.py --out /tmp/ernie-0.3b-random --config-preset 0.3b
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))
from ernie_engine.chat_template import BUILTIN_TEMPLATES  # noqa: E402

logger = logging.getLogger("make_random_model")

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CLS, SEP = "<|begin_of_sentence|>", "<|end_of_sentence|>"
# Markup the parsers read back from generated text: kept by skip_special_tokens (HF "special": false).
TEXT_MARKUP_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
CONTROL_TOKENS = [
    CLS,
    SEP,
    "<|IMAGE_START|>",
    "<|IMAGE_END|>",
    "<|VIDEO_START|>",
    "<|VIDEO_END|>",
    "<|image@placeholder|>",
    "<|video@placeholder|>",
    "<mask:0>",
    "<mask:1>",
]
USER_SYMBOLS = CONTROL_TOKENS[:2] + TEXT_MARKUP_TOKENS + CONTROL_TOKENS[2:]

_EN = (
    "The quick brown fox jumps over the lazy dog. Where is the capital of China? Beijing is the capital. "
    "Please describe the content of the image. The weather today is sunny with a light breeze. "
    "Large language models generate text one token at a time, and a tokenizer splits text into pieces. "
    "Adapt Li Bai's poem into a modern poem. How many apples are there in the picture? "
    "The server streams responses to the client while the engine schedules requests in batches."
)
_ZH = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。中国的首都是北京。今天天气晴朗，温度二十三度。"
    "请描述图片的内容。大语言模型一次生成一个词元，分词器把文本切分成片段。北京今天天气怎么样？"
    "服务器把结果流式返回给客户端，引擎按批次调度请求。图中左边的老人坐在空桌子的后面。"
)
_WORDS_EN = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "hello",
    "world",
    "model",
    "token",
    "stream",
    "batch",
    "cache",
    "block",
    "prefix",
    "server",
    "client",
    "request",
    "weather",
    "city",
    "image",
    "video",
    "answer",
    "question",
    "please",
    "thank",
    "good",
    "new",
    "old",
    "great",
    "small",
    "large",
    "think",
    "tool",
    "call",
    "result",
    "error",
    "value",
    "name",
    "type",
    "function",
    "arguments",
    "location",
    "unit",
    "temperature",
    "sunny",
    "rain",
    "today",
    "tomorrow",
]
_WORDS_ZH = ["模型", "词元", "缓存", "请求", "服务", "天气", "城市", "图片", "视频", "思考", "工具", "调用"]
# Frequent Chinese characters, so common text does not all fall back to bytes.
_HANZI = (
    "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去过家学对可她里后小么"
    "心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样"
    "现分将外但身些与高意进把法此实回二理美点月明社问题写字工具调用结果温度城市北京上海晴朗下雨今明世界你好"
)


def build_corpus(seed: int) -> list[str]:
    """A few thousand short lines mixing languages, numbers, JSON and chat markup (seeded)."""
    rng = random.Random(seed)
    lines = [s.strip() + "." for s in _EN.split(".") if s.strip()]
    lines += [s + "。" for s in _ZH.replace("？", "。").split("。") if s]
    for _ in range(6000):
        kind = rng.randrange(5)
        if kind == 0:
            words = [rng.choice(_WORDS_EN) for _ in range(rng.randint(3, 12))]
            words = [w.capitalize() if rng.random() < 0.2 else w for w in words]
            lines.append(" ".join(words).capitalize() + rng.choice(".,!?:;"))
        elif kind == 1:
            words = [rng.choice(_WORDS_ZH) if rng.random() < 0.3 else rng.choice(_HANZI) for _ in range(12)]
            lines.append("".join(words) + rng.choice("。，！？：；"))
        elif kind == 2:
            lines.append(
                f"{rng.randint(0, 99999)} + {rng.randint(0, 999)} = {rng.random() * 1000:.3f}; "
                f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:00"
            )
        elif kind == 3:
            args = {"location": rng.choice(["Beijing", "北京", "Shanghai"]), "unit": rng.choice("cf")}
            call = json.dumps({"name": "get_weather", "arguments": args}, ensure_ascii=False)
            lines.append(
                f"<think>\nThe user asks about weather.\n</think>\n\n<tool_call>\n{call}\n</tool_call>"
            )
        else:
            lines.append(
                f"{CLS}User: {rng.choice(_WORDS_EN)} {rng.choice(_WORDS_ZH)}?\nAssistant: "
                f"{rng.choice(_WORDS_EN)} (ok) [{rng.randint(0, 9)}]{SEP}"
            )
    return lines


def train_tokenizer(
    vocab_size: int, seed: int, sentences: list[str] | None = None, extra_symbols: tuple[str, ...] = ()
) -> bytes:
    """Train the sentencepiece BPE model and return its serialized bytes (single-threaded: deterministic).

    `sentences`: the training text (default: the built-in multilingual corpus; the demo model passes its own).
    `extra_symbols`: pieces always kept whole (plain text, not added tokens), after the ERNIE specials.
    """
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(build_corpus(seed) if sentences is None else sentences),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        user_defined_symbols=USER_SYMBOLS + list(extra_symbols),
        # Identity normalisation without a dummy prefix keeps encode/decode an exact round trip.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return buffer.getvalue()


@dataclass
class ModelShape:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    vocab_size: int = 0  # 0: the tokenizer's size
    max_position_embeddings: int = 4096


PRESETS = {
    "tiny": ModelShape(),
    "0.3b": ModelShape(
        hidden_size=1024,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=103424,
        max_position_embeddings=131072,
    ),
}


def weight_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the -Paddle layout (Linear weights stored [in, out])."""
    h, q_dim = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    qkv = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim
    shapes: dict[str, tuple[int, ...]] = {"ernie.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_hidden_layers):
        p = f"ernie.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = (h, qkv)
        shapes[p + "self_attn.o_proj.weight"] = (q_dim, h)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.up_gate_proj.weight"] = (h, 2 * shape.intermediate_size)
        shapes[p + "mlp.down_proj.weight"] = (shape.intermediate_size, h)
    shapes["ernie.norm.weight"] = (h,)
    return shapes


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16; numpy has no bf16 type."""
    bits = x.astype(np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def write_random_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    init: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> None:
    """Write BF16 tensors one at a time (the 0.3b preset is ~700 MB) with a hand-built safetensors header.

    `init(name, standard_normal_values)` -> the tensor's values (default: norms near 1, the rest N(0, 0.02)).
    """
    header: dict[str, object] = {"__metadata__": {"format": "np"}}
    offset = 0
    for name, shp in shapes.items():
        nbytes = 2 * int(np.prod(shp))
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment with spaces
    rng = np.random.Generator(np.random.PCG64(seed))
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shp in shapes.items():
            values = rng.standard_normal(shp, dtype=np.float32)
            if init is not None:
                values = init(name, values)
            else:  # norm weights near 1 (not exactly 1) so that a loader mixing them up changes the logits
                values = 1.0 + 0.05 * values if name.endswith("norm.weight") else 0.02 * values
            f.write(to_bf16_bits(values).tobytes())


def added_tokens_decoder(sp: spm.SentencePieceProcessor) -> dict[str, dict[str, object]]:
    tokens = {}
    for piece in [UNK, BOS, EOS] + USER_SYMBOLS:
        tokens[str(sp.piece_to_id(piece))] = {
            "content": piece,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": piece not in TEXT_MARKUP_TOKENS,
        }
    return tokens


def tokenizer_files(sp: spm.SentencePieceProcessor, template: str, max_len: int) -> dict[str, dict]:
    specials = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": UNK,
        "cls_token": CLS,
        "sep_token": SEP,
        "additional_special_tokens": CONTROL_TOKENS[2:],
    }
    config = {
        "tokenizer_class": "Ernie4_5_Tokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "padding_side": "left",
        "split_special_tokens": False,
        **specials,
        "added_tokens_decoder": added_tokens_decoder(sp),
        "chat_template": BUILTIN_TEMPLATES[template],
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def model_files(shape: ModelShape, sp: spm.SentencePieceProcessor) -> dict[str, dict]:
    config = {
        "architectures": ["Ernie4_5ForCausalLM"],
        "model_type": "ernie4_5",
        **{k: v for k, v in asdict(shape).items()},
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "use_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "pad_token_id": sp.unk_id(),
        "use_cache": True,
    }
    generation = {
        "do_sample": True,
        "top_p": 0.8,
        "temperature": 0.8,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "bos_token_id": sp.bos_id(),
        "eos_token_id": [sp.eos_id(), sp.piece_to_id(SEP)],
        "pad_token_id": sp.unk_id(),
    }
    return {"config.json": config, "generation_config.json": generation}


def make_model(
    out: Path, shape: ModelShape, *, seed: int = 0, tokenizer_vocab: int = 3000, template: str = "ernie-4.5"
) -> Path:
    """Write a complete checkpoint folder; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    model_bytes = train_tokenizer(tokenizer_vocab, seed)
    (out / "tokenizer.model").write_bytes(model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    if shape.vocab_size == 0:
        shape = ModelShape(**{**asdict(shape), "vocab_size": sp.get_piece_size()})
    if shape.vocab_size < sp.get_piece_size():
        raise ValueError(
            f"vocab_size {shape.vocab_size} is smaller than the tokenizer ({sp.get_piece_size()})"
        )
    files = {**tokenizer_files(sp, template, shape.max_position_embeddings), **model_files(shape, sp)}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    write_random_safetensors(out / "model.safetensors", weight_shapes(shape), seed)
    logger.info("wrote %s (vocab %d, tokenizer %d pieces)", out, shape.vocab_size, sp.get_piece_size())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config-preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--hidden", type=int, help="hidden_size (overrides the preset)")
    parser.add_argument("--layers", type=int, help="num_hidden_layers (overrides the preset)")
    parser.add_argument("--intermediate", type=int, help="intermediate_size (overrides the preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-vocab", type=int, default=3000)
    parser.add_argument("--template", choices=sorted(BUILTIN_TEMPLATES), default="ernie-4.5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shape = asdict(PRESETS[args.config_preset])
    for key, value in (
        ("hidden_size", args.hidden),
        ("num_hidden_layers", args.layers),
        ("intermediate_size", args.intermediate),
    ):
        if value is not None:
            shape[key] = value
    out = make_model(
        args.out,
        ModelShape(**shape),
        seed=args.seed,
        tokenizer_vocab=args.tokenizer_vocab,
        template=args.template,
    )
    print(out)


if __name__ == "__main__":
    main()
