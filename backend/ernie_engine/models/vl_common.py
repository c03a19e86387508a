"""What PaddleOCR-VL and ERNIE-4.5-VL share: the 3D-rotary ERNIE-4.5 language model, and the multimodal
model's plumbing (packed pixels in, placeholder rows out, logits, checkpoint loading).

A model mixes in `VisionLanguageModel` and provides `language_model` (an `MRopeTextModel`), `config`,
`placeholder_ids`, `checkpoint_specs(params, names)` and, when the checkpoint needs it, `after_load()`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import paddle
from paddle import nn

from ..config import ModelConfig
from ..device import device_tensor
from ..layers.attention import AttentionMetadata, KVCache
from ..layers.linear import ZEROS, Linear
from ..layers.norm import RMSNorm
from .ernie4_5 import final_norm

if TYPE_CHECKING:
    from ..loader import ParamSpec, ShardFn

logger = logging.getLogger(__name__)


class MRopeTextModel(nn.Layer):
    """ERNIE-4.5 decoder layers under a 3D (t, h, w) rotary embedding; extra forward arguments (ERNIE-4.5-VL's
    vision mask) go to every layer."""

    def __init__(self, config: ModelConfig, rotary: nn.Layer, layers: list[nn.Layer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, weight_attr=paddle.ParamAttr(initializer=ZEROS)
        )
        self.rotary_emb = rotary
        self.layers = nn.LayerList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: paddle.Tensor,
        positions: paddle.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None,
        *layer_args: paddle.Tensor,
    ) -> paddle.Tensor:
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        rope = self.rotary_emb(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            kv_cache = None if kv_caches is None else kv_caches[i]
            x, residual = layer(x, residual, rope, meta, kv_cache, *layer_args)
        return final_norm(self.norm, x, residual)


class VisionLanguageModel:
    """Mixin for an `nn.Layer` multimodal model (see the module docstring)."""

    config: ModelConfig
    language_model: MRopeTextModel
    lm_head: Linear | None
    placeholder_ids: list[int]
    media_kinds = "image"  # how errors name the placeholders
    # Checkpoint tensors with no role in inference (not loaded, not "unexpected").
    unused_tensors: re.Pattern[str] | None = None
    # (parameters, the checkpoint's tensor names) -> (where each parameter lives, the layout's name).
    checkpoint_specs: Callable[[dict[str, paddle.Tensor], set[str]], tuple[list[ParamSpec], str]]

    def add_lm_head_and_freeze(self) -> None:
        """Last in __init__: a tied head reads the embedding table; parameters never need gradients."""
        config = self.config
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        for param in self.parameters():
            param.stop_gradient = True

    def packed_pixels(
        self, pixel_values: paddle.Tensor | np.ndarray, grid_thw: np.ndarray, dtype: paddle.dtype
    ) -> tuple[paddle.Tensor, np.ndarray]:
        """The packed items' patches as a `dtype` tensor and their grids [items, 3], checked to agree."""
        grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        if int(np.prod(grid_thw, axis=1).sum()) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} patches do not match grid_thw {grid_thw.tolist()}")
        pixels = device_tensor(pixel_values) if isinstance(pixel_values, np.ndarray) else pixel_values
        return pixels.astype(dtype), grid_thw

    def get_input_embeddings(
        self, input_ids: paddle.Tensor, mm_embeds: paddle.Tensor | None = None
    ) -> paddle.Tensor:
        """Token embeddings [T, hidden]; the placeholders take the rows of `mm_embeds`, in order."""
        x = self.language_model.embed_tokens(input_ids)
        is_media = paddle.isin(input_ids, device_tensor(np.asarray(self.placeholder_ids, dtype=np.int64)))
        num_placeholders = int(is_media.astype("int64").sum())
        num_embeds = 0 if mm_embeds is None else mm_embeds.shape[0]
        if num_placeholders != num_embeds:
            raise ValueError(
                f"{num_placeholders} {self.media_kinds} placeholder tokens but {num_embeds} embeddings"
            )
        if num_embeds == 0:
            return x
        rows = paddle.nonzero(is_media).reshape([-1])
        return paddle.scatter(x, rows, mm_embeds.astype(x.dtype), overwrite=True)

    def compute_logits(self, hidden: paddle.Tensor) -> paddle.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        if self.lm_head is None:
            logits = paddle.matmul(hidden, self.language_model.embed_tokens.weight, transpose_y=True)
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32")

    def after_load(self) -> None:
        """Fix-ups of loaded values a layout needs (none by default)."""

    def load_checkpoint(
        self,
        model_dir: str | Path,
        shard: ShardFn | None = None,
        full_model: VisionLanguageModel | None = None,
    ) -> None:
        """Fill every parameter from the safetensors in `model_dir`; one error lists every mismatch.

        A tensor-parallel shard passes `full_model`, the same model built lazily at the checkpoint's sizes,
        which maps the tensors, and `shard`, which narrows each mapping to this rank's slice.
        """
        from ..loader import Checkpoint, check_plan, fill_parameters  # the loader imports the model registry

        started = time.monotonic()
        params = dict(self.named_parameters())
        planner = full_model or self
        with Checkpoint(model_dir) as checkpoint:
            names = set(checkpoint.names())
            specs, layout = planner.checkpoint_specs(dict(planner.named_parameters()), names)
            specs = [shard(spec) for spec in specs] if shard else specs
            check_plan(specs, checkpoint, planner.config, self.unused_tensors)
            fill_parameters(params, specs, checkpoint)
        self.after_load()
        elapsed = time.monotonic() - started
        logger.info(
            "loaded %d parameters (%s layout) from %s in %.1f s", len(params), layout, model_dir, elapsed
        )
