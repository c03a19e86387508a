"""Generate an ERNIE-4.5-VL checkpoint with random weights in the layout `ERNIE-4.5-VL-28B-A3B-Paddle` ships.

Files as the hub repository has them: a flat config.json (`Ernie4_5_VLMoeForConditionalGeneration`, -Paddle
keys: `im_patch_id`, `freq_allocation`, per-modality `moe_num_experts` / `moe_intermediate_size`,
`spatial_conv_size` / `temporal_conv_size`, the DFN-RoPE `vision_config` with `embed_dim` / `mlp_ratio`),
generation_config.json, preprocessor_config.json (the real pixel limits and CLIP normalisation),
chat_template.jinja (`Picture N:` / `Video N:` markers, `<think>` by `enable_thinking`), the sentencepiece
tokenizer of scripts/make_random_model.py with the image / video tokens as added tokens, and one BF16
model.safetensors: `vision_model.*`, `ernie.resampler_model.*` (Sequential indices .0/.2/.3), `ernie.layers.*`
(fused qkv / up_gate, Linear [in, out]; MoE layers with routers `mlp.gate.weight` / `mlp.gate.weight_1`
[hidden, experts], `moe_statics.e_score_correction_bias` [2, experts], experts 0..E-1 text, E..2E-1 vision,
shared experts). Weights are large enough that the answer depends on the image. Same arguments give
byte-identical files.

    python scripts/make_random_vl_model.py --out /tmp/ernie-vl-tiny
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_ocr_model import (  # noqa: E402
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    generation_config,
    text_config,
    tokenizer_config,
    write_files,
    write_tokenizer,
    write_weights,
)

logger = logging.getLogger("make_random_vl_model")

VIDEO_START, VIDEO_END = "<|VIDEO_START|>", "<|VIDEO_END|>"
MEDIA_TOKENS = (IMAGE_PLACEHOLDER, IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END)
# The released checkpoints' ids (vocab 103424); -Paddle prompts use the image patch token for videos too.
REAL_IDS = dict(zip(MEDIA_TOKENS, (100295, 101304, 101305, 101306, 101307), strict=True))
PATCH = 14

# The shipped template's format: media numbered per kind before their text, thinking by `enable_thinking`
# (on unless turned off, which is what the engine's reasoning parsers assume).
ERNIE_VL_TEMPLATE = """\
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{{- "<|begin_of_sentence|>" -}}
{%- if tools -%}
{{- "You may call the tools below. Each is described by a JSON schema:\\n<tools>\\n" -}}
{%- for tool in tools -%}
{{- (tool.function if tool.function is defined else tool) | tojson + "\\n" -}}
{%- endfor -%}
{{- "</tools>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role in ["system", "user", "tool"] -%}
{%- if message.role == "user" -%}{{- "User: " -}}{%- endif -%}
{%- if message.role == "tool" -%}{{- "User: <tool_response>\\n" -}}{%- endif -%}
{%- if message.content is string -%}
{{- message.content -}}
{%- else -%}
{%- for part in message.content -%}
{%- if part.type == "text" -%}
{{- part.text -}}
{%- elif part.type in ["image_url", "image"] -%}
{%- set image_count.value = image_count.value + 1 -%}
{{- "Picture " ~ image_count.value ~ ":<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>" -}}
{%- elif part.type in ["video_url", "video"] -%}
{%- set video_count.value = video_count.value + 1 -%}
{{- "Video " ~ video_count.value ~ ":<|VIDEO_START|><|video@placeholder|><|VIDEO_END|>" -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- if message.role == "tool" -%}{{- "\\n</tool_response>" -}}{%- endif -%}
{{- "\\n" -}}
{%- elif message.role == "assistant" -%}
{{- "Assistant: " -}}
{%- if message.content is string -%}
{{- message.content -}}
{%- elif message.content -%}
{%- for part in message.content if part.type == "text" -%}{{- part.text -}}{%- endfor -%}
{%- endif -%}
{{- "<|end_of_sentence|>" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt is not defined or add_generation_prompt -%}
{{- "Assistant: " -}}
{%- if enable_thinking is defined and not enable_thinking -%}
{{- "<think>\\n\\n</think>\\n\\n" -}}
{%- else -%}
{{- "<think>" -}}
{%- endif -%}
{%- endif -%}
"""

PREPROCESSOR = {
    "image_processor_type": "AdaptiveImageProcessor",
    "processor_class": "Ernie_45T_VLProcessor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 4816896,
    "patch_size": PATCH,
    "merge_size": 2,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
}


@dataclass(frozen=True)
class VLShape:
    hidden_size: int = 64
    intermediate_size: int = 128  # the dense first layer's
    num_hidden_layers: int = 3  # layer 0 dense, the rest modality-isolated MoE
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    freq_allocation: int = 2  # rotary pairs for t; h and w share the rest (mrope_section [3, 3, 2])
    moe_num_experts: int = 4  # per modality
    moe_k: int = 2
    moe_intermediate_size: tuple[int, int] = (32, 24)  # text, vision
    moe_num_shared_experts: int = 1
    vision_depth: int = 2
    vision_hidden_size: int = 48
    vision_mlp_ratio: int = 4
    vision_heads: int = 4
    vocab_size: int = 0  # 0: the tokenizer's pieces plus the media tokens
    # Large enough that greedy decoding varies and depends on the image.
    weight_std: float = 0.3


def token_ids(shape: VLShape, num_pieces: int) -> dict[str, int]:
    if shape.vocab_size > max(REAL_IDS.values()):
        return dict(REAL_IDS)
    return {token: num_pieces + i for i, token in enumerate(MEDIA_TOKENS)}


def vision_shapes(shape: VLShape) -> dict[str, tuple[int, ...]]:
    """`vision_model.*` (DFN-RoPE ViT) and `ernie.resampler_model.*`, Linear weights [in, out]."""
    h, inner = shape.vision_hidden_size, shape.vision_hidden_size * shape.vision_mlp_ratio
    shapes: dict[str, tuple[int, ...]] = {"vision_model.patch_embed.proj.weight": (3 * PATCH * PATCH, h)}
    for i in range(shape.vision_depth):
        block = f"vision_model.blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[f"{block}{norm}.weight"] = shapes[f"{block}{norm}.bias"] = (h,)
        shapes.update(_linear(block + "attn.qkv", h, 3 * h))
        shapes.update(_linear(block + "attn.proj", h, h))
        shapes.update(_linear(block + "mlp.fc1", h, inner))
        shapes.update(_linear(block + "mlp.fc2", inner, h))
    shapes["vision_model.ln.weight"] = shapes["vision_model.ln.bias"] = (h,)
    merged, r = 4 * h, "ernie.resampler_model."
    for name, width in (("spatial_linear", merged), ("temporal_linear", 2 * merged)):
        shapes.update(_linear(f"{r}{name}.0", width, merged))
        shapes.update(_linear(f"{r}{name}.2", merged, merged))
        shapes[f"{r}{name}.3.weight"] = shapes[f"{r}{name}.3.bias"] = (merged,)  # LayerNorm
    shapes.update(_linear(r + "mlp", merged, shape.hidden_size))
    shapes[r + "after_norm.weight"] = (shape.hidden_size,)
    return shapes


def _linear(prefix: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {prefix + ".weight": (fan_in, fan_out), prefix + ".bias": (fan_out,)}


def _mlp(prefix: str, hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "up_gate_proj.weight": (hidden, 2 * inner), prefix + "down_proj.weight": (inner, hidden)}


def text_shapes(shape: VLShape) -> dict[str, tuple[int, ...]]:
    h, experts = shape.hidden_size, shape.moe_num_experts
    qkv = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim
    shapes: dict[str, tuple[int, ...]] = {"ernie.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_hidden_layers):
        p = f"ernie.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = (h, qkv)
        shapes[p + "self_attn.o_proj.weight"] = (shape.num_attention_heads * shape.head_dim, h)
        if i == 0:
            shapes.update(_mlp(p + "mlp.", h, shape.intermediate_size))
            continue
        shapes[p + "mlp.gate.weight"] = shapes[p + "mlp.gate.weight_1"] = (h, experts)
        shapes[p + "mlp.moe_statics.e_score_correction_bias"] = (2, experts)
        for j in range(2 * experts):
            shapes.update(_mlp(f"{p}mlp.experts.{j}.", h, shape.moe_intermediate_size[j >= experts]))
        width = shape.moe_intermediate_size[0] * shape.moe_num_shared_experts
        shapes.update(_mlp(p + "mlp.shared_experts.", h, width))
    shapes["ernie.norm.weight"] = (h,)
    return shapes


def model_config(shape: VLShape, ids: dict[str, int], sp: spm.SentencePieceProcessor) -> dict:
    """config.json as the -Paddle release has it: the text model's keys flat, the vision encoder's nested."""
    return {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
        "model_type": "ernie4_5_moe_vl",
        **text_config(shape),
        "freq_allocation": shape.freq_allocation,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "use_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "moe_num_experts": [shape.moe_num_experts] * 2,
        "moe_intermediate_size": list(shape.moe_intermediate_size),
        "moe_k": shape.moe_k,
        "moe_num_shared_experts": shape.moe_num_shared_experts,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": shape.num_hidden_layers - 1,
        "moe_layer_interval": 1,
        "moe_use_aux_free": True,
        "pad_token_id": sp.unk_id(),
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "im_patch_id": ids[IMAGE_PLACEHOLDER],
        "image_start_token_id": ids[IMAGE_START],
        "image_end_token_id": ids[IMAGE_END],
        "video_start_token_id": ids[VIDEO_START],
        "video_end_token_id": ids[VIDEO_END],
        "spatial_conv_size": 2,
        "temporal_conv_size": 2,
        "pixel_hidden_size": shape.vision_hidden_size,
        "vision_config": {
            "model_type": "DFNRope_vision_transformer",
            "depth": shape.vision_depth,
            "embed_dim": shape.vision_hidden_size,
            "hidden_size": shape.vision_hidden_size,
            "mlp_ratio": shape.vision_mlp_ratio,
            "num_heads": shape.vision_heads,
            "hidden_act": "quick_gelu",
            "in_channels": 3,
            "patch_size": PATCH,
            "spatial_merge_size": 2,
        },
    }


def init(std: float) -> Callable[[str, np.ndarray], np.ndarray]:
    """Norm scales near 1, biases near 0 (not exactly: a loader mixing them up shows), the rest N(0, std)."""

    def values_for(name: str, values: np.ndarray) -> np.ndarray:
        if values.ndim == 1 and name.endswith(".weight"):  # every 1-D weight is a norm scale
            return 1.0 + 0.05 * values
        if values.ndim == 1 or "e_score_correction_bias" in name:
            return 0.02 * values
        return std * values

    return values_for


def make_vl_model(
    out: Path, shape: VLShape = VLShape(), *, seed: int = 0, tokenizer_vocab: int = 3000
) -> Path:
    """Write a complete checkpoint folder; returns it."""
    sp = write_tokenizer(out, seed, tokenizer_vocab)
    ids = token_ids(shape, sp.get_piece_size())
    if shape.vocab_size == 0:
        shape = replace(shape, vocab_size=max(ids.values()) + 1)
    files = {
        **tokenizer_config(sp, ids, 131072, MEDIA_TOKENS),
        "config.json": model_config(shape, ids, sp),
        "generation_config.json": generation_config(sp, top_p=0.8, temperature=0.2),
        "preprocessor_config.json": PREPROCESSOR,
    }
    write_files(out, files, ERNIE_VL_TEMPLATE)
    write_weights(out, shape, {**vision_shapes(shape), **text_shapes(shape)}, seed, init(shape.weight_std))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(make_vl_model(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
