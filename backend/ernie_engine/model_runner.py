"""Runs one scheduled step on the model: flat inputs + attention metadata -> logits of the sampling rows.

Owns the model and the paged KV caches (one (keys, values) pair per layer, each
[num_blocks * block_size, num_kv_heads, head_dim] in the model's dtype, or int8 with scales when the
cache is C8). Only the last token of each sequence that samples this step goes through the LM head:
prefill chunks short of the prompt's end produce no logits, and the [T, vocab] matrix of a long prefill
is never built.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import paddle

from .config import EngineConfig, ModelConfig
from .layers.attention import AttentionMetadata, KVCache
from .layers.quant.config import QuantConfig
from .layers.quant.kv_cache import Int8KVCache, kv_cache_bytes_per_token, read_static_kv_scales
from .loader import load_model
from .sampler import SampledToken, Sampler
from .scheduler import SchedulerOutput
from .sequence import Sequence

logger = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")


def host_memory_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (what can be allocated without swapping)."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, vocab_limit: int | None = None):
        self.config = config
        dtype = None if config.dtype == "auto" else config.dtype
        checkpoint_quant = ModelConfig.from_dir(model_dir).extra.get("quantization_config")
        self.quant = QuantConfig.build(config.quantization, config.kv_cache_dtype, checkpoint_quant)
        self.model, self.model_config = load_model(model_dir, dtype=dtype, quantization=self.quant)
        self.kv_static_scales = None  # C8 per-head scales, when the checkpoint ships them
        if self.quant.kv_cache_int8:
            self.kv_static_scales = read_static_kv_scales(model_dir, self.model_config.num_hidden_layers)
        self.dtype = self.model.embed_tokens.weight.dtype
        self.block_size = config.block_size
        # Ids the tokenizer cannot decode (padded embedding rows) are never sampled.
        vocab = self.model_config.vocab_size
        self.vocab_limit = min(vocab, vocab_limit) if vocab_limit else vocab
        self.kv_caches: list[KVCache] = []
        self.sampler = Sampler()

    # KV cache ---------------------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        mc = self.model_config
        return kv_cache_bytes_per_token(
            mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, self.dtype,
            int8=self.quant.kv_cache_int8, static_scales=self.kv_static_scales is not None,
        )

    def num_kv_blocks(self, max_model_len: int) -> int:
        """From num_gpu_blocks_override, else kv_cache_memory_bytes, else a share of free host memory."""
        config = self.config
        if config.num_gpu_blocks_override:
            return config.num_gpu_blocks_override
        block_bytes = self.kv_bytes_per_token() * self.block_size
        if config.kv_cache_memory_bytes:
            budget = config.kv_cache_memory_bytes
        else:
            if not paddle.get_device().startswith("cpu"):
                logger.warning("KV cache sized from host memory: set kv_cache_memory_bytes on accelerators")
            share = host_memory_available() * config.kv_cache_host_fraction * config.gpu_memory_utilization
            # More than every sequence at full length is never used; the byte cap keeps tests and CPUs sane.
            useful = config.max_num_seqs * max_model_len * block_bytes // self.block_size
            budget = int(min(share, useful, config.kv_cache_max_host_bytes))
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {block_bytes} bytes")
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = [num_blocks * self.block_size, mc.num_key_value_heads, mc.head_dim]
        if self.quant.kv_cache_int8:  # C8: int8 keys/values + fp32 scales (layers/quant/kv_cache.py)
            scales = self.kv_static_scales or [None] * mc.num_hidden_layers
            self.kv_caches = [Int8KVCache.allocate(*shape, static_scales=s) for s in scales]
        else:
            self.kv_caches = [
                (paddle.zeros(shape, dtype=self.dtype), paddle.zeros(shape, dtype=self.dtype))
                for _ in range(mc.num_hidden_layers)
            ]
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * self.block_size * self.kv_bytes_per_token() / 2**20)

    # Step -------------------------------------------------------------------------------------------

    @paddle.no_grad()
    def execute(self, out: SchedulerOutput) -> list[SampledToken]:
        """Run the scheduled tokens; returns one sampled token per `out.sampling` sequence, in order."""
        seqs = list(out.scheduled)
        input_ids, positions, meta = self._prepare(seqs, [out.scheduled[seq] for seq in seqs])
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        if not out.sampling:
            return []
        sampling = set(out.sampling)
        ends = np.cumsum(meta.query_lens) - 1
        rows = np.array([end for seq, end in zip(seqs, ends, strict=True) if seq in sampling], dtype=np.int64)
        logits = self.model.compute_logits(paddle.gather(hidden, paddle.to_tensor(rows)))
        return self.sampler(logits[:, : self.vocab_limit].numpy(), out.sampling)

    def _prepare(
        self, seqs: list[Sequence], query_lens: list[int]
    ) -> tuple[paddle.Tensor, paddle.Tensor, AttentionMetadata]:
        """Flat input ids and positions of the new tokens, and the step's attention metadata."""
        starts = [seq.num_computed_tokens for seq in seqs]
        context_lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
        input_ids = np.fromiter(
            (t for seq, s, e in zip(seqs, starts, context_lens, strict=True) for t in seq.token_ids[s:e]),
            dtype=np.int64,
            count=sum(query_lens),
        )
        positions = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in zip(starts, context_lens,
                                                                                      strict=True)])
        tables = [seq.block_table for seq in seqs]
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.block_size)
        return paddle.to_tensor(input_ids), paddle.to_tensor(positions), meta
