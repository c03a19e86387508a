"""One rank's model shard, KV cache and forward step (what ModelRunner is to a single device).

The shard is built at rank-local sizes and filled slice by slice through the loader's shard hook: no rank
ever holds a full weight. Its KV cache holds only its KV heads. Every rank runs every step (the layers'
collectives pair them up); logits are gathered over the vocabulary and rank 0 alone answers the engine.
Multimodal models: each rank holds the whole vision encoder and encodes the media a step carries itself, so
every rank's input embeddings are the same without a collective (messages.StepMedia).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from paddle import nn

from ..config import EngineConfig, ModelConfig
from ..device import cpu_weight_dtype, device_tensor, device_type, resolve_dtype
from ..layers import cpu_kernels
from ..layers.attention import AttentionMetadata, KVCache
from ..layers.parallel import gather_vocab_logits
from ..layers.quant.apply import quantize_model
from ..layers.quant.config import QuantConfig
from ..layers.quant.kv_cache import read_static_kv_scales
from ..loader import build_model, checkpoint_dtype, load_weights, prepare_prequantized_shard
from ..model_runner import ModelRunner, float_kv_cache_dtype, token_embedding, vision_token_ids
from ..sampler import score_prompt_rows
from . import parallel_state
from .messages import StepBatch, StepMedia, StepResult
from .sharding import ShardPlan

logger = logging.getLogger(__name__)


def lazy_full_model(config: ModelConfig, dtype: str) -> nn.Layer:
    """The unsharded model built lazily (no memory is allocated): its parameter names and full shapes."""
    with paddle.LazyGuard():
        return build_model(config, dtype)


def load_shard(model_dir: Path, plan: ShardPlan, dtype: str | None, quant: QuantConfig) -> nn.Layer:
    """This rank's model with its slices of the checkpoint (the sharded counterpart of loader.load_model)."""
    device = paddle.get_device()
    compute_dtype = resolve_dtype(dtype, device)
    full = lazy_full_model(plan.config, compute_dtype)
    shapes = {name: tuple(param.shape) for name, param in full.named_parameters()}
    model = build_model(plan.local_config(), compute_dtype)
    plan.parallelize(model)
    if quant.prequantized:  # int8 buffers of this rank's slice shapes; the plan needs their full shapes
        shapes.update(prepare_prequantized_shard(model, model_dir, plan.config, quant, plan.shard))
    if hasattr(model, "load_checkpoint"):  # multimodal: the full model maps the nested parts' tensors
        model.load_checkpoint(model_dir, shard=plan.shard, full_model=full)
    else:
        load_weights(model, model_dir, plan.config, shard=plan.shard, full_shapes=shapes)
    plan.drop_partial_biases(model)
    parallel_state.meet("loaded")  # quantizing row-parallel weights takes collectives
    quantize_model(model, quant)
    if device_type(device) == "cpu":
        bf16 = cpu_weight_dtype(dtype, checkpoint_dtype(model_dir)) == "bfloat16"
        cpu_kernels.prepare_model(model, bf16_weights=bf16)
    model.eval()
    return model


def resident_bytes(model: nn.Layer) -> int:
    """Bytes of every parameter and buffer this rank holds (weights, scales, repacked kernel copies)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not None}
    return sum(int(np.prod(t.shape)) * t.element_size() for t in tensors.values())


class ShardRunner(ModelRunner):
    """ModelRunner's KV sizing and allocation over this rank's heads; its own load and step.

    `model_config` is the rank-local config (local KV heads size the cache); the full one is `plan.config`.
    """

    def __init__(self, config: EngineConfig, model_dir: Path, plan: ShardPlan, vocab_limit: int) -> None:
        # Not ModelRunner.__init__, which would load the whole model; these are what its KV methods use.
        self.config = config
        self.plan = plan
        dtype = None if config.dtype == "auto" else config.dtype
        self.quant = QuantConfig.of_engine(config, plan.config)
        self.model = load_shard(model_dir, plan, dtype, self.quant)
        self.model_config = plan.local_config()
        self.kv_static_scales = None
        if self.quant.kv_cache_int8:
            scales = read_static_kv_scales(model_dir, plan.config.num_hidden_layers)
            self.kv_static_scales = scales and [(self._own_heads(k), self._own_heads(v)) for k, v in scales]
        self.dtype = token_embedding(self.model).weight.dtype
        self.kv_dtype = float_kv_cache_dtype(config, model_dir)
        self.vision_token_ids = vision_token_ids(self.model)  # told to the engine, which builds the masks
        self.block_size = config.block_size
        self.vocab_limit = vocab_limit
        self.kv_caches: list[KVCache] = []

    def _own_heads(self, absmax: paddle.Tensor) -> paddle.Tensor:
        """A C8 per-head scale narrowed to this rank's KV heads (a single scalar serves every head)."""
        absmax = absmax.reshape([-1])
        if absmax.shape[0] == 1:
            return absmax
        start, stop = self.plan.kv_heads
        return absmax[start:stop]

    def kv_bytes_per_token(self) -> int:
        own = super().kv_bytes_per_token()
        # On CPU every rank's cache lives in the same host memory, which is what the block budget is sized on.
        return own * self.plan.world_size if device_type(paddle.get_device()) == "cpu" else own

    @paddle.no_grad()
    def run(self, batch: StepBatch) -> StepResult | None:
        """Forward the batch through this shard; rank 0 returns the sampled rows' result, the others None."""
        meta = AttentionMetadata.build(
            batch.query_lens, batch.context_lens, batch.block_tables, self.block_size
        )
        ids, positions = device_tensor(batch.input_ids), device_tensor(batch.positions)
        hidden = self.model(ids, positions, meta, self.kv_caches, **self._multimodal_inputs(batch, ids))
        scored = []
        if batch.score_rows is not None:
            scored = score_prompt_rows(batch.score_rows, batch.score_targets, batch.score_top,
                                       lambda rows: self._rank0_logits(hidden, rows))
        logits = np.zeros((0, self.vocab_limit), np.float32)
        if batch.sample_rows.size:
            logits = self._rank0_logits(hidden, batch.sample_rows)
        if self.plan.rank != 0:
            return None
        return StepResult(logits[batch.greedy].argmax(axis=1).astype(np.int64), logits[~batch.greedy], scored)

    def _rank0_logits(self, hidden: paddle.Tensor, rows: np.ndarray) -> np.ndarray | None:
        """The full-vocabulary logits of some token rows on rank 0 (None elsewhere); every rank takes part."""
        local = self.model.compute_logits(paddle.gather(hidden, device_tensor(rows)))
        full = gather_vocab_logits(local, self.plan.vocab_shard_size, self.plan.config.vocab_size)
        return full[:, : self.vocab_limit].numpy() if self.plan.rank == 0 else None

    def _multimodal_inputs(self, batch: StepBatch, ids: paddle.Tensor) -> dict[str, Any]:
        """ERNIE-4.5-VL's vision mask; the input embeddings when the step carries media."""
        extra: dict[str, Any] = {}
        if batch.vision_mask is not None:
            extra["vision_mask"] = device_tensor(batch.vision_mask)
        if batch.media is not None:
            extra["inputs_embeds"] = self._embed_with_media(ids, batch.media)
        return extra

    def _embed_with_media(self, ids: paddle.Tensor, media: StepMedia) -> paddle.Tensor:
        """Token embeddings with the placeholders' rows replaced by this rank's vision pass over the media
        (a placeholder id the model sampled is not in `token_rows` and keeps its token embedding)."""
        embeds = self.model.embed_multimodal(media.pixel_values, media.grid_thw)
        if embeds.shape[0] != media.num_rows:
            raise ValueError(f"vision pass gave {embeds.shape[0]} rows for {media.num_rows} placeholders")
        x = token_embedding(self.model)(ids)  # vocab-parallel: every rank takes part
        rows = paddle.gather(embeds, device_tensor(media.embed_rows)).astype(x.dtype)
        logger.debug("rank %d: vision pass over %d items", self.plan.rank, media.grid_thw.shape[0])
        return paddle.scatter(x, device_tensor(media.token_rows), rows, overwrite=True)
