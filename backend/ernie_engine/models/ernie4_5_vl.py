"""ERNIE-4.5-VL (VL-28B-A3B, VL-424B-A47B, VL-28B-A3B-Thinking): a ViT, a resampler, a modality-isolated MoE.

Vision (`vision_model`, DFN-RoPE ViT): 14 px patches of images or video frames are embedded by one matmul and
pass pre-norm blocks with 2D axial rotary attention within each frame (a batch is packed, attention is
block-diagonal); a final LayerNorm. Patches arrive grouped by 2x2 merge block (see `ErnieVLImageProcessor`).
Resampler (`resampler_model`): each 2x2 block is concatenated and mapped by `spatial_linear`; then every two
consecutive frames of a video are concatenated (a still image is paired with itself) and mapped by
`temporal_linear`; a Linear to the language model's width and an RMSNorm. An image of h x w patches becomes
h*w/4 tokens, a video of t frames t*h*w/8.
Language model (`language_model`): ERNIE-4.5 decoder layers; the first layers are dense (`mlp_layer_types`,
or the MoE start index), the others modality-isolated MoE: text tokens are routed among the text experts,
vision tokens (patches and the image/video start/end tokens) among the vision experts, with separate
routers, correction biases and expert widths; shared experts see every token.
3D rotary: an image token at merged cell (r, c) sits at (t, h, w) = (s, s + r, s + c), video frame pair k at
(s + k, s + r, s + c), with s the position after the preceding text; text after the media resumes at
s + max(rows, cols). Text has the same position on all axes, i.e. plain 1D rotary. ERNIE interleaves the
h and w bands over the first frequencies and gives t the last ones (`VLRotaryEmbedding`).

Checkpoints: the transformers layout (what `save_pretrained` writes, as the -PT release:
`model.vision_model.*`, `model.resampler_model.*`, `model.layers.*`, Linear [out, in]) and the -Paddle one
(`vision_model.*`,
`ernie.resampler_model.*` or `resampler_model.*`, `ernie.layers.*`, Linear [in, out], fused qkv / up_gate).
In both the routers are stored [hidden, experts]: `mlp.gate.weight` for text, `mlp.gate.weight_1` for vision;
`mlp.moe_statics.e_score_correction_bias` is [2, experts] (text row, vision row), and experts 0..E-1 are the
text experts, E..2E-1 the vision ones.

Engine contract (docs/ARCHITECTURE.md, "Multimodal"): as PaddleOCR-VL, plus video and the MoE modality mask:
    embeds = model.embed_multimodal(mm.media.pixel_values, mm.media.grid_thw)  # images + videos, in order
    x = model.get_input_embeddings(input_ids, embeds[mm.image_rows_for(start, end)])
    hidden = model(input_ids, positions, meta, kv_caches, inputs_embeds=x,
                   vision_mask=mm.vision_mask_for(start, end))
`vision_mask` ([T] bool) routes tokens to the vision experts; when omitted it is derived from the token ids
(placeholders and start/end tokens), which is right for prompts; generated tokens are text.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..config import ModelConfig
from ..device import device_tensor
from ..layers.attention import AttentionMetadata, KVCache
from ..layers.linear import Linear
from ..layers.moe import SparseMoeBlock
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..layers.vision import (
    FusedQKVVisionAttention,
    VisionMLP,
    VisionRotaryEmbedding,
    encode_frame_groups,
    frame_seqlens,
    vision_position_ids,
)
from .ernie4_5 import Ernie4_5DecoderLayer, Ernie4_5MLP
from .vl_common import MRopeTextModel, VisionLanguageModel

if TYPE_CHECKING:
    from ..loader import ParamSpec

logger = logging.getLogger(__name__)

# transformers' defaults (Ernie4_5_VLMoeConfig); -Paddle configs name the patch token `im_patch_id`.
TOKEN_DEFAULTS = {
    "image_token_id": 100295,
    "image_start_token_id": 101304,
    "image_end_token_id": 101305,
    "video_start_token_id": 101306,
    "video_end_token_id": 101307,
    "video_token_id": 103367,
}
DEFAULT_MROPE_SECTION = [22, 22, 20]  # h, w, t bands of the 64 frequencies of head_dim 128


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_config(cls, config: ModelConfig) -> VisionConfig:
        """transformers' `vision_config`, or the -Paddle one (DFN-RoPE keys: embed_dim, mlp_ratio; merge sizes
        as top-level spatial_conv_size / temporal_conv_size)."""
        raw, top = dict(config.extra.get("vision_config") or {}), config.extra
        hidden = int(raw.get("embed_dim") or raw.get("hidden_size") or cls.hidden_size)
        intermediate = raw.get("intermediate_size") or hidden * int(raw.get("mlp_ratio", 4))
        rope = raw.get("rope_parameters") or {}
        return cls(
            depth=int(raw.get("depth", cls.depth)),
            hidden_size=hidden,
            intermediate_size=int(intermediate),
            num_heads=int(raw.get("num_heads", cls.num_heads)),
            in_channels=int(raw.get("in_channels", cls.in_channels)),
            patch_size=int(raw.get("patch_size", cls.patch_size)),
            spatial_merge_size=int(raw.get("spatial_merge_size") or top.get("spatial_conv_size") or 2),
            temporal_merge_size=int(raw.get("temporal_merge_size") or top.get("temporal_conv_size") or 2),
            layer_norm_eps=float(raw.get("rms_norm_eps", cls.layer_norm_eps)),
            rope_theta=float(rope.get("rope_theta", cls.rope_theta)),
            hidden_act=str(raw.get("hidden_act", cls.hidden_act)),
        )


@dataclass
class MoeLayout:
    """Per-modality MoE sizes ((text, vision) pairs) and which layers are sparse."""

    num_experts: tuple[int, int]
    intermediate_size: tuple[int, int]
    sparse_layers: list[bool]

    @classmethod
    def from_config(cls, config: ModelConfig) -> MoeLayout:
        def pair(value: Any) -> tuple[int, int]:
            values = list(value) if isinstance(value, list | tuple) else [value, value]
            return int(values[0]), int(values[-1])

        layer_types = config.extra.get("mlp_layer_types")
        if layer_types is not None:
            sparse = [kind == "sparse" for kind in layer_types]
        else:  # -Paddle: start / end index (per modality when lists; text's decides) and interval
            start = pair(config.moe_layer_start_index)[0]
            end = pair(config.moe_layer_end_index)[0]
            interval = max(1, config.moe_layer_interval)
            sparse = [start <= i <= end and (i + 1) % interval == 0 for i in range(config.num_hidden_layers)]
        if len(sparse) != config.num_hidden_layers:
            raise ValueError(
                f"mlp_layer_types has {len(sparse)} entries for {config.num_hidden_layers} layers"
            )
        return cls(pair(config.moe_num_experts), pair(config.moe_intermediate_size), sparse)


def token_ids(config: ModelConfig) -> dict[str, int]:
    """The multimodal special token ids of a checkpoint (transformers' keys, -Paddle's `im_patch_id`)."""
    ids = {key: int(config.extra.get(key, default)) for key, default in TOKEN_DEFAULTS.items()}
    if "im_patch_id" in config.extra and "image_token_id" not in config.extra:
        # Legacy (-Paddle) prompts use the image patch token for video frames too.
        ids["image_token_id"] = ids["video_token_id"] = int(config.extra["im_patch_id"])
    return ids


def mrope_section(config: ModelConfig) -> list[int]:
    """[h, w, t] frequency bands: rope_parameters.mrope_section, or -Paddle's `freq_allocation` (t's)."""
    rope = config.extra.get("rope_parameters") or config.extra.get("rope_scaling") or {}
    if rope.get("mrope_section"):
        return [int(v) for v in rope["mrope_section"]]
    if "freq_allocation" in config.extra:
        t = int(config.extra["freq_allocation"])
        hw = (config.head_dim // 2 - t) // 2
        return [hw, hw, t]
    return list(DEFAULT_MROPE_SECTION)


# ---- 3D rotary ------------------------------------------------------------------------------------------


class VLRotaryEmbedding(RotaryEmbedding):
    """ERNIE-4.5-VL's 3D rotary for the interleaved (GPT-J) pair layout of `apply_rotary`.

    Pair i rotates with the usual frequency theta^(-2i/d); its position comes from the h axis for even
    i < h + w, the w axis for odd i < h + w, and the t axis for the last t pairs (mrope_section [h, w, t]).
    Returns (cos, sin) shaped as `RotaryEmbedding` does, so the decoder layers are unchanged.
    """

    def __init__(self, head_dim: int, theta: float, section: list[int]) -> None:
        super().__init__(head_dim, theta)
        h, w, t = section
        if h != w or h + w + t != head_dim // 2:
            raise ValueError(
                f"mrope_section {section}: need [h, w, t] with h == w summing to {head_dim // 2}"
            )
        pair = np.arange(head_dim // 2)
        axis = np.where(pair < h + w, np.where(pair % 2 == 0, 1, 2), 0)  # 0: t, 1: h, 2: w
        one_hot = (axis[None, :] == np.arange(3)[:, None]).astype(np.float32)
        self.register_buffer("axis_one_hot", paddle.to_tensor(one_hot[:, None, :]), persistable=False)

    def forward(self, positions: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """positions [3, T] (t, h, w) or [T] (text only) -> (cos, sin), each [T, 1, head_dim / 2]."""
        if positions.ndim == 1:
            return super().forward(positions)
        angles = positions.astype("float32").unsqueeze(-1) * self.inv_freq  # [3, T, head_dim/2]
        # Selecting by a 0/1 mask and summing keeps each angle exact.
        angles = (angles * self.axis_one_hot).sum(axis=0).unsqueeze(1)
        return paddle.cos(angles), paddle.sin(angles)


# ---- vision encoder and resampler -----------------------------------------------------------------------


class PatchEmbed(nn.Layer):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = Linear(config.in_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, patches: paddle.Tensor) -> paddle.Tensor:
        """[N, C * p * p] -> [N, hidden]."""
        return self.proj(patches.reshape([patches.shape[0], -1]))


class VisionBlock(nn.Layer):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.attn = FusedQKVVisionAttention(config.hidden_size, config.num_heads)
        self.norm2 = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, activation=config.hidden_act)

    def forward(
        self, x: paddle.Tensor, seqlens: list[int], rotary: tuple[paddle.Tensor, paddle.Tensor]
    ) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x), seqlens, rotary)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Layer):
    """Packed frames in (patches in merge-block order), one feature per patch out, same order."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.merge = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config)
        self.rotary = VisionRotaryEmbedding(config.hidden_size // config.num_heads, config.rope_theta)
        self.blocks = nn.LayerList([VisionBlock(config) for _ in range(config.depth)])
        self.ln = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)

    def forward(self, pixel_values: paddle.Tensor, grid_thw: np.ndarray) -> paddle.Tensor:
        x = self.patch_embed(pixel_values)
        rotary = self.rotary(device_tensor(vision_position_ids(grid_thw, self.merge)))
        seqlens = frame_seqlens(grid_thw)
        for block in self.blocks:
            x = block(x, seqlens, rotary)
        return self.ln(x)


class ResamplerMLP(nn.Layer):
    """fc1 -> GELU -> fc2 -> LayerNorm (the checkpoints' `.0`, `.2`, `.3` of a Sequential)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.fc1 = Linear(in_dim, out_dim, bias=True)
        self.fc2 = Linear(out_dim, out_dim, bias=True)
        self.ln = nn.LayerNorm(out_dim, epsilon=eps)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.ln(self.fc2(F.gelu(self.fc1(x))))


class VariableResolutionResampler(nn.Layer):
    """Patch features -> language-model tokens: spatial 2x2 merge, temporal pair merge, projection."""

    def __init__(self, vision: VisionConfig, text_hidden: int, text_eps: float) -> None:
        super().__init__()
        if vision.temporal_merge_size != 2:
            raise ValueError(f"temporal_merge_size {vision.temporal_merge_size} is not supported (2)")
        self.spatial_merge = vision.spatial_merge_size
        spatial_dim = vision.hidden_size * self.spatial_merge**2
        self.spatial_linear = ResamplerMLP(spatial_dim, spatial_dim, vision.layer_norm_eps)
        self.temporal_linear = ResamplerMLP(2 * spatial_dim, spatial_dim, vision.layer_norm_eps)
        self.mlp = Linear(spatial_dim, text_hidden, bias=True)
        self.after_norm = RMSNorm(text_hidden, text_eps)

    def temporal_pairs(self, grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (of spatially merged tokens) of the first and second frame of every temporal pair; a still
        image (t = 1) is paired with itself."""
        first, second, offset = [], [], 0
        for t, h, w in np.asarray(grid_thw).tolist():
            per_frame = h * w // self.spatial_merge**2
            frames = np.arange(per_frame)[None, :] + offset
            starts = np.arange(t) * per_frame
            if t == 1:
                first.append(frames[0])
                second.append(frames[0])
            else:
                first.append((frames + starts[0::2, None]).reshape(-1))
                second.append((frames + starts[1::2, None]).reshape(-1))
            offset += t * per_frame
        return np.concatenate(first), np.concatenate(second)

    def forward(self, features: paddle.Tensor, grid_thw: np.ndarray) -> paddle.Tensor:
        """[N patches, vision hidden] in merge-block order -> [tokens, text hidden]."""
        x = self.spatial_linear(features.reshape([-1, features.shape[-1] * self.spatial_merge**2]))
        first, second = self.temporal_pairs(grid_thw)
        x = paddle.concat(
            [paddle.gather(x, device_tensor(first)), paddle.gather(x, device_tensor(second))], axis=-1
        )
        return self.after_norm(self.mlp(self.temporal_linear(x)))


# ---- language model --------------------------------------------------------------------------------------


class ModalityIsolatedMoe(nn.Layer):
    """Text tokens through the text experts, vision tokens through the vision experts; shared ones see all."""

    def __init__(self, config: ModelConfig, moe: MoeLayout) -> None:
        super().__init__()

        def experts(modality: int) -> SparseMoeBlock:
            return SparseMoeBlock(
                hidden_size=config.hidden_size,
                num_experts=moe.num_experts[modality],
                top_k=config.moe_k,
                intermediate_size=moe.intermediate_size[modality],
                norm_min=config.moe_norm_min,
                shared_experts=None,
            )

        self.text_moe = experts(0)
        self.vision_moe = experts(1)
        self.shared_experts = None
        if config.moe_num_shared_experts > 0:
            width = moe.intermediate_size[0] * config.moe_num_shared_experts
            self.shared_experts = Ernie4_5MLP(config.hidden_size, width, bias=config.use_bias)

    def forward(self, x: paddle.Tensor, vision_mask: paddle.Tensor) -> paddle.Tensor:
        """x [T, h], vision_mask [T] bool -> [T, h]."""
        vision_rows = paddle.nonzero(vision_mask).reshape([-1])
        if vision_rows.shape[0] == 0:
            out = self.text_moe(x)
        else:
            out = paddle.zeros_like(x)
            text_rows = paddle.nonzero(~vision_mask).reshape([-1])
            for rows, block in ((text_rows, self.text_moe), (vision_rows, self.vision_moe)):
                if rows.shape[0]:
                    out = paddle.scatter(out, rows, block(paddle.gather(x, rows)), overwrite=True)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class VLDecoderLayer(Ernie4_5DecoderLayer):
    """The ERNIE-4.5 block; its MoE additionally needs to know which tokens are vision tokens."""

    def feed_forward(self, h: paddle.Tensor, vision_mask: paddle.Tensor | None = None) -> paddle.Tensor:
        return self.mlp(h, vision_mask) if isinstance(self.mlp, ModalityIsolatedMoe) else self.mlp(h)


def _feed_forward(config: ModelConfig, moe: MoeLayout, sparse: bool) -> nn.Layer:
    if sparse:
        return ModalityIsolatedMoe(config, moe)
    return Ernie4_5MLP(config.hidden_size, config.intermediate_size, bias=config.use_bias)


class VLTextModel(MRopeTextModel):
    def __init__(self, config: ModelConfig, moe: MoeLayout) -> None:
        layers = [VLDecoderLayer(config, _feed_forward(config, moe, sparse)) for sparse in moe.sparse_layers]
        rotary = VLRotaryEmbedding(config.head_dim, config.rope_theta, mrope_section(config))
        super().__init__(config, rotary, layers)


class Ernie4_5_VLMoeForConditionalGeneration(VisionLanguageModel, nn.Layer):
    """Inference-only: parameters are filled by `load_checkpoint` and never need gradients."""

    media_kinds = "image/video"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_config = VisionConfig.from_config(config)
        self.moe_layout = MoeLayout.from_config(config)
        self.token_ids = token_ids(config)
        self.vision_model = VisionTransformer(self.vision_config)
        self.resampler_model = VariableResolutionResampler(
            self.vision_config, config.hidden_size, config.rms_norm_eps
        )
        self.language_model = VLTextModel(config, self.moe_layout)
        self.add_lm_head_and_freeze()

    @property
    def placeholder_ids(self) -> list[int]:
        return sorted({self.token_ids["image_token_id"], self.token_ids["video_token_id"]})

    @property
    def vision_token_ids(self) -> list[int]:
        """Tokens the MoE routes to the vision experts: placeholders and the start/end tokens."""
        return sorted(set(self.token_ids.values()))

    def embed_multimodal(
        self, pixel_values: paddle.Tensor | np.ndarray, grid_thw: np.ndarray
    ) -> paddle.Tensor:
        """Packed patches [N, C*p*p] of images (t = 1) and videos (t even) with grids [items, 3], in any
        mix -> [tokens, hidden]: each item's rows in item order (t*h*w/4 per image, t*h*w/8 per video)."""
        dtype = self.vision_model.patch_embed.proj.weight.dtype
        pixels, grid_thw = self.packed_pixels(pixel_values, grid_thw, dtype)
        odd = [g for g in grid_thw.tolist() if g[0] > 1 and g[0] % 2]
        if odd:
            raise ValueError(
                f"videos need an even number of frames (pad with the last frame), got grids {odd}"
            )
        return encode_frame_groups(self._embed, pixels, grid_thw, unit=self.vision_config.temporal_merge_size)

    def _embed(self, pixels: paddle.Tensor, grid_thw: np.ndarray) -> paddle.Tensor:
        return self.resampler_model(self.vision_model(pixels, grid_thw), grid_thw)

    def forward(
        self,
        input_ids: paddle.Tensor,
        positions: paddle.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
        inputs_embeds: paddle.Tensor | None = None,
        vision_mask: paddle.Tensor | None = None,
    ) -> paddle.Tensor:
        """Flat batch: input_ids [T], positions [3, T] or [T] -> final-normed hidden states [T, hidden]."""
        x = self.language_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if vision_mask is None:
            vision_mask = paddle.isin(
                input_ids, device_tensor(np.asarray(self.vision_token_ids, dtype=np.int64))
            )
        return self.language_model(x, positions, meta, kv_caches, vision_mask.astype("bool"))

    # ---- checkpoint ----------------------------------------------------------------------------------------

    def checkpoint_specs(
        self, params: dict[str, paddle.Tensor], names: set[str]
    ) -> tuple[list[ParamSpec], str]:
        """The transformers or -Paddle layout, whichever the tensor names are in."""
        mapping = CheckpointMapping.detect(names, self.config, self.moe_layout)
        specs = [spec for name, p in params.items() for spec in mapping.specs(name, tuple(p.shape))]
        return specs, mapping.layout


_MOE_PARAM = re.compile(
    r"^(?P<layer>layers\.\d+\.mlp)\.(?P<modality>text|vision)_moe\."
    r"(?P<rest>gate\.weight|moe_statics\.e_score_correction_bias|experts\.up_gate_proj|experts\.down_proj)$"
)
# Our resampler MLP names -> the checkpoints' Sequential indices.
_RESAMPLER_RENAMES = {".fc1.": ".0.", ".fc2.": ".2.", ".ln.": ".3."}


@dataclass
class CheckpointMapping:
    """Where each parameter of the model lives in one checkpoint layout."""

    layout: str  # "transformers" or "paddle"
    config: ModelConfig
    moe: MoeLayout
    resampler_prefix: str

    @classmethod
    def detect(cls, names: set[str], config: ModelConfig, moe: MoeLayout) -> CheckpointMapping:
        if any(name.startswith("ernie.") for name in names):
            paddle_prefix = "ernie." if any(n.startswith("ernie.resampler_model.") for n in names) else ""
            return cls("paddle", config, moe, paddle_prefix + "resampler_model.")
        if any(name.startswith("model.") for name in names):
            return cls("transformers", config, moe, "model.resampler_model.")
        raise ValueError(
            f"cannot tell the ERNIE-4.5-VL checkpoint layout from tensor names like {sorted(names)[:5]}"
        )

    def specs(self, param: str, shape: tuple[int, ...]) -> list[ParamSpec]:
        from ..loader import ParamSpec, Piece

        if param.startswith("language_model."):
            return self._language_model(param, shape)
        if param == "lm_head.weight":
            return [self._text_spec(param, param, shape)]
        if param.startswith("vision_model."):
            tensor = ("model." if self.layout == "transformers" else "") + param
        else:
            tensor = self.resampler_prefix + param.removeprefix("resampler_model.")
            for ours, theirs in _RESAMPLER_RENAMES.items():
                tensor = tensor.replace(ours, theirs)
        transpose = self.layout == "transformers" and len(shape) == 2 and param.endswith(".weight")
        stored = tuple(reversed(shape)) if transpose else shape
        return [ParamSpec(param, shape, (Piece(tensor, stored, transpose=transpose),))]

    def _text_spec(self, param: str, name: str, shape: tuple[int, ...]) -> ParamSpec:
        """A language-model parameter named `name` in the text-only ERNIE-4.5 layouts."""
        from ..loader import paddle_spec, transformers_spec

        layout_fn = transformers_spec if self.layout == "transformers" else paddle_spec
        return replace(layout_fn(name, shape, self.config), param=param)

    def _language_model(self, param: str, shape: tuple[int, ...]) -> list[ParamSpec]:
        from ..loader import ParamSpec, Piece

        name = param.removeprefix("language_model.")
        match = _MOE_PARAM.match(name)
        if match is None:
            return [self._text_spec(param, name, shape)]
        prefix = ("model." if self.layout == "transformers" else "ernie.") + match["layer"]
        modality = 0 if match["modality"] == "text" else 1
        rest = match["rest"]
        if rest == "gate.weight":  # stored [hidden, experts] in both layouts
            tensor = f"{prefix}.gate.weight" + ("_1" if modality else "")
            return [ParamSpec(param, shape, (Piece(tensor, shape),))]
        if rest.startswith("moe_statics"):  # one [2, E] tensor: the text row, then the vision row
            tensor = f"{prefix}.moe_statics.e_score_correction_bias"
            piece = Piece(tensor, (2, shape[1]), start=modality, stop=modality + 1)
            return [ParamSpec(param, shape, (piece,))]
        weight = rest.removeprefix("experts.")
        offset = self.moe.num_experts[0] if modality else 0  # vision experts follow the text experts
        return [
            replace(
                self._text_spec(param, f"{match['layer']}.experts.{offset + j}.{weight}.weight", shape[1:]),
                index=j,
            )
            for j in range(shape[0])
        ]
