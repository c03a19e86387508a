"""Generate a PaddleOCR-VL checkpoint with random weights in the layout `PaddlePaddle/PaddleOCR-VL` ships.

Files as the hub repository has them: a flat config.json (`PaddleOCRVLForConditionalGeneration`, vision_config
nested), generation_config.json, preprocessor_config.json (the real pixel limits and normalisation),
chat_template.jinja, a sentencepiece tokenizer (scripts/make_random_model.py's) whose image tokens
`<|IMAGE_PLACEHOLDER|>`, `<|IMAGE_START|>`, `<|IMAGE_END|>` are added tokens at the real ids (0.9b preset) or
right after the sentencepiece pieces (tiny), and one BF16 model.safetensors with the shipped tensor names:
`visual.vision_model.*` (incl. the unused pooling head and packing position table), `mlp_AR.*`, `model.*`,
`lm_head.weight`. Same arguments give byte-identical files.

    python scripts/make_random_ocr_model.py --out /tmp/paddleocr-vl-tiny
    python scripts/make_random_ocr_model.py --out /tmp/paddleocr-vl-0.9b --preset 0.9b
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))
from ernie_engine.multimodal.processor import PADDLEOCR_VL_TEMPLATE  # noqa: E402
from make_random_model import (  # noqa: E402
    added_tokens_decoder,
    tokenizer_files,
    train_tokenizer,
    write_random_safetensors,
)

logger = logging.getLogger("make_random_ocr_model")

IMAGE_PLACEHOLDER, IMAGE_START, IMAGE_END = "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>"
# The released checkpoint's ids (vocab 103424); video_token_id is in its config but unused for OCR.
REAL_IDS = {IMAGE_PLACEHOLDER: 100295, IMAGE_START: 101305, IMAGE_END: 101306, "video": 101307}
POSITION_PACKING_ROWS = 32768  # `packing_position_embedding` of the shipped vision model (unused)


@dataclass(frozen=True)
class OcrShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    vocab_size: int = 0  # 0: the tokenizer's pieces plus the image tokens
    weight_std: float = 0.02


PRESETS = {
    # Small enough for tests; large enough weights that greedy decoding does not settle on one token.
    "tiny": OcrShape(64, 128, 2, 4, 2, 16, (2, 3, 3), 48, 96, 2, 4, weight_std=0.3),
    # PaddleOCR-VL-0.9B: ERNIE-4.5-0.3B + the NaViT SigLIP-so400m encoder.
    "0.9b": OcrShape(1024, 3072, 18, 16, 2, 128, (16, 24, 24), 1152, 4304, 27, 16, vocab_size=103424),
}


def token_ids(shape: OcrShape, num_pieces: int) -> dict[str, int]:
    if shape.vocab_size >= REAL_IDS["video"] + 1:
        return dict(REAL_IDS)
    names = [IMAGE_PLACEHOLDER, IMAGE_START, IMAGE_END, "video"]
    return {name: num_pieces + i for i, name in enumerate(names)}


def vision_shapes(shape: OcrShape, image_size: int, patch: int) -> dict[str, tuple[int, ...]]:
    h, inner = shape.vision_hidden_size, shape.vision_intermediate_size
    p = "visual.vision_model."
    shapes: dict[str, tuple[int, ...]] = {
        p + "embeddings.patch_embedding.weight": (h, 3, patch, patch),
        p + "embeddings.patch_embedding.bias": (h,),
        p + "embeddings.position_embedding.weight": ((image_size // patch) ** 2, h),
        p + "embeddings.packing_position_embedding.weight": (POSITION_PACKING_ROWS, h),
    }
    for i in range(shape.vision_layers):
        layer = f"{p}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[layer + norm + ".weight"] = shapes[layer + norm + ".bias"] = (h,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (h, h)
            shapes[f"{layer}self_attn.{proj}.bias"] = (h,)
        shapes.update(_mlp(layer + "mlp.", h, inner))
    shapes[p + "post_layernorm.weight"] = shapes[p + "post_layernorm.bias"] = (h,)
    # The pooling head SigLIP ships; PaddleOCR-VL never runs it.
    shapes[p + "head.probe"] = (1, 1, h)
    shapes[p + "head.attention.in_proj_weight"] = (3 * h, h)
    shapes[p + "head.attention.in_proj_bias"] = (3 * h,)
    shapes[p + "head.attention.out_proj.weight"] = (h, h)
    shapes[p + "head.attention.out_proj.bias"] = (h,)
    shapes[p + "head.layernorm.weight"] = shapes[p + "head.layernorm.bias"] = (h,)
    shapes.update(_mlp(p + "head.mlp.", h, inner))
    return shapes


def _mlp(prefix: str, hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "fc1.weight": (inner, hidden),
        prefix + "fc1.bias": (inner,),
        prefix + "fc2.weight": (hidden, inner),
        prefix + "fc2.bias": (hidden,),
    }


def weight_shapes(shape: OcrShape, image_size: int, patch: int, merge: int) -> dict[str, tuple[int, ...]]:
    """Shipped names and shapes: Linear weights [out, in] (transformers' convention)."""
    shapes = vision_shapes(shape, image_size, patch)
    merged = shape.vision_hidden_size * merge * merge
    shapes.update(
        {
            "mlp_AR.pre_norm.weight": (shape.vision_hidden_size,),
            "mlp_AR.pre_norm.bias": (shape.vision_hidden_size,),
            "mlp_AR.linear_1.weight": (merged, merged),
            "mlp_AR.linear_1.bias": (merged,),
            "mlp_AR.linear_2.weight": (shape.hidden_size, merged),
            "mlp_AR.linear_2.bias": (shape.hidden_size,),
        }
    )
    h, q, kv = shape.hidden_size, shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads
    shapes["model.embed_tokens.weight"] = (shape.vocab_size, h)
    for i in range(shape.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes[layer + "input_layernorm.weight"] = shapes[layer + "post_attention_layernorm.weight"] = (h,)
        shapes[layer + "self_attn.q_proj.weight"] = (q, h)
        shapes[layer + "self_attn.k_proj.weight"] = shapes[layer + "self_attn.v_proj.weight"] = (
            kv * shape.head_dim,
            h,
        )
        shapes[layer + "self_attn.o_proj.weight"] = (h, q)
        shapes[layer + "mlp.gate_proj.weight"] = shapes[layer + "mlp.up_proj.weight"] = (
            shape.intermediate_size,
            h,
        )
        shapes[layer + "mlp.down_proj.weight"] = (h, shape.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (shape.vocab_size, h)
    return shapes


def text_config(shape: Any) -> dict[str, Any]:
    """The text model's config.json keys, flat in both multimodal releases (`shape`: OcrShape or VLShape)."""
    return {
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": 131072,
        "rope_theta": 500000,
    }


def model_config(shape: OcrShape, ids: dict[str, int], sp: spm.SentencePieceProcessor) -> dict:
    """config.json as shipped: the text model's keys flat, the vision encoder's nested."""
    return {
        "architectures": ["PaddleOCRVLForConditionalGeneration"],
        "model_type": "paddleocr_vl",
        **text_config(shape),
        "rope_scaling": {
            "mrope_section": list(shape.mrope_section),
            "rope_type": "default",
            "type": "default",
        },
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "use_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "pad_token_id": sp.unk_id(),
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "image_token_id": ids[IMAGE_PLACEHOLDER],
        "video_token_id": ids["video"],
        "vision_start_token_id": ids[IMAGE_START],
        "vision_end_token_id": ids[IMAGE_END],
        "use_cache": False,
        "vision_config": {
            "architectures": ["SiglipVisionModel"],
            "model_type": "paddleocr_vl",
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": shape.vision_hidden_size,
            "intermediate_size": shape.vision_intermediate_size,
            "num_hidden_layers": shape.vision_layers,
            "num_attention_heads": shape.vision_heads,
            "num_channels": 3,
            "image_size": 384,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "layer_norm_eps": 1e-06,
            "attention_dropout": 0.0,
            "tokens_per_second": 2,
            "torch_dtype": "bfloat16",
        },
    }


PREPROCESSOR = {
    "image_processor_type": "SiglipImageProcessor",
    "processor_class": "PaddleOCRVLProcessor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "min_pixels": 147384,
    "max_pixels": 2822400,
    "size": {"min_pixels": 147384, "max_pixels": 2822400},
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 1,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
}


def tokenizer_config(
    sp: spm.SentencePieceProcessor,
    ids: dict[str, int],
    max_len: int,
    media_tokens: tuple[str, ...] = (IMAGE_PLACEHOLDER, IMAGE_START, IMAGE_END),
) -> dict[str, dict]:
    """make_random_model's tokenizer files, `media_tokens` moved to their ids, the template as .jinja."""
    files = tokenizer_files(sp, "ernie-4.5", max_len)
    config = files["tokenizer_config.json"]
    del config["chat_template"]
    decoder = {k: v for k, v in added_tokens_decoder(sp).items() if v["content"] not in media_tokens}
    for token in media_tokens:
        decoder[str(ids[token])] = {
            "content": token,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
    config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda item: int(item[0])))
    for specials in (config, files["special_tokens_map.json"]):
        extra = [t for t in specials["additional_special_tokens"] if t != IMAGE_PLACEHOLDER]
        specials["additional_special_tokens"] = [*extra, IMAGE_PLACEHOLDER]
    return files


def write_tokenizer(out: Path, seed: int, tokenizer_vocab: int) -> spm.SentencePieceProcessor:
    """A new checkpoint folder holding make_random_model's sentencepiece model; returns it loaded."""
    out.mkdir(parents=True, exist_ok=True)
    model_bytes = train_tokenizer(tokenizer_vocab, seed)
    (out / "tokenizer.model").write_bytes(model_bytes)
    return spm.SentencePieceProcessor(model_proto=model_bytes)


def generation_config(sp: spm.SentencePieceProcessor, **sampling: float) -> dict[str, Any]:
    """generation_config.json: the tokenizer's special ids, then any sampling defaults."""
    return {
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "pad_token_id": sp.unk_id(),
        **sampling,
        "use_cache": True,
    }


def write_files(out: Path, files: dict[str, dict], template: str) -> None:
    """The JSON files and chat_template.jinja."""
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def write_weights(
    out: Path,
    shape: Any,
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    init: Callable[[str, np.ndarray], np.ndarray],
) -> None:
    write_random_safetensors(out / "model.safetensors", shapes, seed, init)
    logger.info(
        "wrote %s (%s, %.1fM parameters)",
        out,
        asdict(shape),
        sum(int(np.prod(s)) for s in shapes.values()) / 1e6,
    )


def make_ocr_model(out: Path, shape: OcrShape, *, seed: int = 0, tokenizer_vocab: int = 3000) -> Path:
    """Write a complete checkpoint folder; returns it."""
    sp = write_tokenizer(out, seed, tokenizer_vocab)
    ids = token_ids(shape, sp.get_piece_size())
    if shape.vocab_size == 0:
        shape = replace(shape, vocab_size=max(ids.values()) + 1)
    files = {
        **tokenizer_config(sp, ids, 131072),
        "config.json": model_config(shape, ids, sp),
        "generation_config.json": generation_config(sp),
        "preprocessor_config.json": PREPROCESSOR,
    }
    write_files(out, files, PADDLEOCR_VL_TEMPLATE)
    std = shape.weight_std

    def init(name: str, values: np.ndarray) -> np.ndarray:
        # Norm scales near 1 and biases near 0 (not exactly) so that a loader mixing them up shows.
        if "norm" in name and name.endswith(".weight"):
            return 1.0 + 0.05 * values
        return 0.02 * values if values.ndim == 1 else std * values

    write_weights(out, shape, weight_shapes(shape, 384, 14, 2), seed, init)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(make_ocr_model(args.out, PRESETS[args.preset], seed=args.seed))


if __name__ == "__main__":
    main()
