"""PaddleOCR-VL-0.9B: a NaViT-style SigLIP vision encoder, a 2x2 merging projector and ERNIE-4.5-0.3B.

Vision (`visual`): patches of 14 px from images of any size are embedded by one matmul, plus a learned 27x27
table of position embeddings resampled bilinearly to each image's grid; 27 pre-norm ViT blocks with 2D rotary
attention within each image (a batch's images are packed, attention is block-diagonal); a final LayerNorm.
Projector (`projector`, `mlp_AR` in the shipped checkpoint): LayerNorm, then every 2x2 block of patches is
concatenated into one vector and mapped by Linear-GELU-Linear to the language model's width, so an image of
h x w patches becomes h*w/4 tokens.
Language model (`language_model`): ERNIE-4.5-0.3B (`Ernie4_5DecoderLayer`), with 3D rotary positions:
an image token at merged-grid cell (r, c) sits at (t, h, w) = (s, s + r, s + c) with s the position after the
preceding text, and text after the image resumes at s + max(rows, cols) (see `multimodal.mrope_positions`).

Two facts about the checkpoint that the code depends on:
- The text model rotates half-split (NeoX) pairs while our decoder rotates adjacent pairs. Loading permutes
  the q/k output features of every head from [0..D/2 | D/2..D] to interleaved order; q and k are permuted
  alike, so attention scores are unchanged and the shared decoder layers serve this model as they are.
- Tensor names: shipped (`visual.vision_model.*`, `mlp_AR.*`, `model.*`, `lm_head.*`) and transformers' saves
  (`model.visual.vision_model.*`, `model.projector.*`, `model.language_model.*`) are both accepted;
  `vision_model.head.*` and `packing_position_embedding` exist in the shipped files but are unused.

Engine contract (see docs/ARCHITECTURE.md, "Multimodal"):
    embeds = model.embed_multimodal(pixel_values, grid_thw)  # [num image tokens, hidden], in image order
    x = model.get_input_embeddings(input_ids, embeds_for_this_step)  # placeholders take the rows in order
    hidden = model(input_ids, positions, meta, kv_caches, inputs_embeds=x)
    logits = model.compute_logits(hidden[last_token_rows])
`positions` is [3, T] (t, h, w) for prefill of a multimodal prompt, or [T] when every token of the step is
text (decode: position + the sequence's mrope delta). Steps without image tokens may omit `inputs_embeds`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..config import ModelConfig
from ..device import device_tensor
from ..layers.attention import AttentionMetadata, KVCache
from ..layers.linear import ZEROS, Linear
from ..layers.rotary import MRotaryEmbedding
from ..layers.vision import (
    PatchEmbedding,
    VisionAttention,
    VisionMLP,
    VisionRotaryEmbedding,
    bilinear_position_taps,
    encode_frame_groups,
    frame_seqlens,
    vision_position_ids,
)
from .ernie4_5 import Ernie4_5DecoderLayer, Ernie4_5MLP
from .vl_common import MRopeTextModel, VisionLanguageModel

if TYPE_CHECKING:
    from ..loader import ParamSpec

logger = logging.getLogger(__name__)

IMAGE_TOKEN_ID = 100295  # <|IMAGE_PLACEHOLDER|>
VISION_START_TOKEN_ID = 101305  # <|IMAGE_START|>
VISION_END_TOKEN_ID = 101306  # <|IMAGE_END|>
DEFAULT_MROPE_SECTION = [16, 24, 24]  # t, h, w bands of the 64 frequencies of head_dim 128

# Shipped-checkpoint tensors with no role in inference (a pooling head, a training-time position table).
_UNUSED_TENSORS = re.compile(r"(vision_model\.head\.|packing_position_embedding)")


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        raw = dict(raw)
        rope = raw.get("rope_parameters") or {}
        raw.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        if raw.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"vision hidden_act {raw['hidden_act']!r} is not supported (gelu_pytorch_tanh)")
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in raw.items() if k in names and v is not None})


def mrope_section(config: ModelConfig) -> list[int]:
    rope = config.extra.get("rope_parameters") or config.extra.get("rope_scaling") or {}
    return list(rope.get("mrope_section") or DEFAULT_MROPE_SECTION)


# ---- vision encoder ---------------------------------------------------------------------------------------


class SiglipEmbeddings(nn.Layer):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = PatchEmbedding(config.num_channels, config.patch_size, config.hidden_size)
        self.num_grid_per_side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(
            self.num_grid_per_side**2, config.hidden_size, weight_attr=paddle.ParamAttr(initializer=ZEROS)
        )

    def forward(self, pixel_values: paddle.Tensor, grid_thw: np.ndarray) -> paddle.Tensor:
        """[N, C, p, p] -> [N, hidden]: patch embedding + the position table resampled to each grid."""
        indices, weights = bilinear_position_taps(grid_thw, self.num_grid_per_side)
        table = self.position_embedding(device_tensor(indices))  # [N, 4, hidden]
        weights = device_tensor(weights).astype(table.dtype).unsqueeze(-1)
        return self.patch_embedding(pixel_values) + (table * weights).sum(axis=1)


class SiglipEncoderLayer(nn.Layer):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.self_attn = VisionAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: paddle.Tensor, seqlens: list[int], rotary: tuple[paddle.Tensor, paddle.Tensor]
    ) -> paddle.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seqlens, rotary)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Layer):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.LayerList([SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class SiglipVisionModel(nn.Layer):
    """Packed images in, one feature per patch out (raster order within each image)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = VisionRotaryEmbedding(head_dim, config.rope_theta)

    def forward(self, pixel_values: paddle.Tensor, grid_thw: np.ndarray) -> paddle.Tensor:
        x = self.embeddings(pixel_values, grid_thw)
        rotary = self.rotary(device_tensor(vision_position_ids(grid_thw)))
        seqlens = frame_seqlens(grid_thw)
        for layer in self.encoder.layers:
            x = layer(x, seqlens, rotary)
        return self.post_layernorm(x)


class Projector(nn.Layer):
    """LayerNorm, fold each merge x merge block of patches into one vector, then Linear-GELU-Linear."""

    def __init__(self, vision: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.merge = vision.spatial_merge_size
        merged = vision.hidden_size * self.merge**2
        self.pre_norm = nn.LayerNorm(vision.hidden_size, epsilon=1e-5)
        self.linear_1 = Linear(merged, merged, bias=True)
        self.linear_2 = Linear(merged, text_hidden_size, bias=True)

    def merge_order(self, grid_thw: np.ndarray) -> np.ndarray:
        """Patch indices of the pack in merged order: block by block, each block's patches in raster order."""
        order, offset, m = [], 0, self.merge
        for t, h, w in np.asarray(grid_thw).tolist():
            index = np.arange(t * h * w).reshape(t, h // m, m, w // m, m).transpose(0, 1, 3, 2, 4)
            order.append(index.reshape(-1) + offset)
            offset += t * h * w
        return np.concatenate(order)

    def forward(self, features: paddle.Tensor, grid_thw: np.ndarray) -> paddle.Tensor:
        """[N, vision_hidden] -> [N / merge^2, text_hidden]."""
        x = paddle.gather(self.pre_norm(features), device_tensor(self.merge_order(grid_thw)))
        x = x.reshape([-1, features.shape[-1] * self.merge**2])
        return self.linear_2(F.gelu(self.linear_1(x)))


# ---- language model ---------------------------------------------------------------------------------------


class PaddleOCRTextModel(MRopeTextModel):
    """ERNIE-4.5 decoder layers with 3D (t, h, w) rotary positions."""

    def __init__(self, config: ModelConfig) -> None:
        layers = [
            Ernie4_5DecoderLayer(
                config, Ernie4_5MLP(config.hidden_size, config.intermediate_size, bias=config.use_bias)
            )
            for _ in range(config.num_hidden_layers)
        ]
        rotary = MRotaryEmbedding(config.head_dim, config.rope_theta, mrope_section(config))
        super().__init__(config, rotary, layers)


class PaddleOCRVLForConditionalGeneration(VisionLanguageModel, nn.Layer):
    """Inference-only: parameters are filled by `load_checkpoint` and never need gradients."""

    unused_tensors = _UNUSED_TENSORS

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_config = VisionConfig.from_dict(config.extra.get("vision_config") or {})
        self.image_token_id = int(config.extra.get("image_token_id", IMAGE_TOKEN_ID))
        self.visual = SiglipVisionModel(self.vision_config)
        self.projector = Projector(self.vision_config, config.hidden_size)
        self.language_model = PaddleOCRTextModel(config)
        self.add_lm_head_and_freeze()

    @property
    def spatial_merge_size(self) -> int:
        return self.vision_config.spatial_merge_size

    @property
    def placeholder_ids(self) -> list[int]:
        return [self.image_token_id]

    def embed_multimodal(
        self, pixel_values: paddle.Tensor | np.ndarray, grid_thw: np.ndarray
    ) -> paddle.Tensor:
        """Packed patches [N, C, p, p] of the images with grids [num_images, 3] -> [N / merge^2, hidden]."""
        dtype = self.visual.embeddings.patch_embedding.weight.dtype
        pixels, grid_thw = self.packed_pixels(pixel_values, grid_thw, dtype)
        return encode_frame_groups(self._embed, pixels, grid_thw)

    def _embed(self, pixels: paddle.Tensor, grid_thw: np.ndarray) -> paddle.Tensor:
        return self.projector(self.visual(pixels, grid_thw), grid_thw)

    def forward(
        self,
        input_ids: paddle.Tensor,
        positions: paddle.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
        inputs_embeds: paddle.Tensor | None = None,
    ) -> paddle.Tensor:
        """Flat batch: input_ids [T], positions [3, T] or [T] -> final-normed hidden states [T, hidden]."""
        x = self.language_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.language_model(x, positions, meta, kv_caches)

    # ---- checkpoint ----------------------------------------------------------------------------------------

    def checkpoint_specs(
        self, params: dict[str, paddle.Tensor], names: set[str]
    ) -> tuple[list[ParamSpec], str]:
        """The shipped names or transformers' saves, whichever the tensor names are in."""
        shipped = any(name.startswith("mlp_AR.") for name in names)
        specs = [self._spec(name, tuple(p.shape), shipped) for name, p in params.items()]
        return specs, "shipped" if shipped else "transformers"

    def after_load(self) -> None:
        """Interleave the q/k features of every loaded qkv projection (see the module docstring)."""
        for name, param in self.named_parameters():
            if ".self_attn.qkv_proj." in name:
                param.set_value(self._interleave_qk(param))

    def _spec(self, param: str, shape: tuple[int, ...], shipped: bool) -> ParamSpec:
        from ..loader import ParamSpec, Piece, transformers_spec

        if param.startswith("language_model."):
            # The text model is ERNIE-4.5 in transformers' layout under `model.` (shipped) or
            # `model.language_model.` (transformers' saves).
            spec = transformers_spec(param.removeprefix("language_model."), shape, self.config)
            prefix = "model." if shipped else "model.language_model."
            pieces = tuple(
                Piece(prefix + p.tensor.removeprefix("model."), p.shape, p.transpose, p.axis)
                for p in spec.pieces
            )
            return ParamSpec(param, shape, pieces, spec.axis)
        prefixes = {
            "visual.": "visual.vision_model." if shipped else "model.visual.vision_model.",
            "projector.": "mlp_AR." if shipped else "model.projector.",
            "lm_head.": "lm_head.",
        }
        prefix = next(p for p in prefixes if param.startswith(p))
        tensor = prefixes[prefix] + param.removeprefix(prefix)
        linear = len(shape) == 2 and param.endswith(".weight") and "position_embedding" not in param
        stored = tuple(reversed(shape)) if linear else shape
        return ParamSpec(param, shape, (Piece(tensor, stored, transpose=linear),))

    def _interleave_qk(self, qkv: paddle.Tensor) -> paddle.Tensor:
        """Reorder each q/k head's features from half-split to interleaved pairs (see module docstring)."""
        config = self.config
        head_dim, half = config.head_dim, config.head_dim // 2
        within = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
        num_qk_heads = config.num_attention_heads + config.num_key_value_heads
        qk = (np.arange(num_qk_heads)[:, None] * head_dim + within).reshape(-1)
        order = np.concatenate([qk, np.arange(num_qk_heads * head_dim, qkv.shape[-1])])
        return paddle.index_select(qkv, device_tensor(order), axis=-1)

