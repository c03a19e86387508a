"""Runs one scheduled step on the model: flat inputs + attention metadata -> logits of the sampling rows.

Owns the model and the paged KV caches (one (keys, values) pair per layer, each
[num_blocks * block_size, num_kv_heads, head_dim] in the model's dtype - bf16 on CPU too for bf16 weights,
`device.kv_cache_dtype` - or int8 with scales when the cache is C8). Only the last token of each sequence
that samples this step goes through the LM head: prefill chunks short of the prompt's end produce no
logits, and the [T, vocab] matrix of a long prefill is never built.

Multimodal models (`embed_multimodal`): a request's image embeddings are computed at its first prefill chunk
holding placeholders (one vision pass for all such requests of the step), the placeholders of each chunk take
their rows through `inputs_embeds`, and positions are [3, T] (t, h, w) while any multimodal prompt is being
prefilled, else [T] with each sequence's mrope delta added.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paddle

from .config import EngineConfig, ModelConfig
from .device import device_tensor, keep_freed_memory, kv_cache_dtype
from .layers.attention import AttentionMetadata, KVCache
from .layers.quant.config import QuantConfig
from .layers.quant.kv_cache import Int8KVCache, kv_cache_bytes_per_token, read_static_kv_scales
from .loader import checkpoint_dtype, load_model
from .multimodal.engine_inputs import step_positions, step_vision_mask
from .sampler import PromptScoring, SampledToken, Sampler, argmax_only, score_prompt_rows
from .scheduler import SchedulerOutput
from .sequence import Sequence

if TYPE_CHECKING:
    from .multimodal.engine_inputs import MultimodalInputs

logger = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")


def host_memory_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (what can be allocated without swapping)."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def kv_budget_source(config: EngineConfig) -> str:
    """What sets the KV cache's size, for error messages."""
    if config.num_gpu_blocks_override:
        return f"num_gpu_blocks_override={config.num_gpu_blocks_override}"
    if config.kv_cache_memory_bytes:
        return f"kv_cache_memory_bytes={config.kv_cache_memory_bytes}"
    return (f"gpu_memory_utilization={config.gpu_memory_utilization} of kv_cache_host_fraction="
            f"{config.kv_cache_host_fraction} of available host memory, at most kv_cache_max_host_bytes="
            f"{config.kv_cache_max_host_bytes}")


def token_embedding(model: paddle.nn.Layer) -> paddle.nn.Embedding:
    """Text models hold it at the top, multimodal ones in their language model."""
    language_model = getattr(model, "language_model", None)
    return model.embed_tokens if language_model is None else language_model.embed_tokens


def vision_token_ids(model: paddle.nn.Layer) -> list[int] | None:
    """The tokens ERNIE-4.5-VL's MoE sends to its vision experts; None for models taking no vision mask."""
    takes_mask = "vision_mask" in inspect.signature(model.forward).parameters
    return model.vision_token_ids if takes_mask else None


def float_kv_cache_dtype(config: EngineConfig, model_dir: Path) -> str:
    """The dtype of a float (not C8) KV cache for this config on the current device."""
    dtype = None if config.dtype == "auto" else config.dtype
    return kv_cache_dtype(config.kv_cache_dtype, dtype, paddle.get_device(), checkpoint_dtype(model_dir))


def greedy_token_ids(logits: paddle.Tensor) -> np.ndarray:
    """Row-wise argmax of logits [B, V]. On a device it runs there, so only [B] ids leave it; on CPU NumPy's
    argmax over a zero-copy view is ~4x faster than Paddle's (16 rows of a 103k vocabulary: 0.3 vs 1.4 ms)."""
    if logits.place.is_cpu_place():
        return np.from_dlpack(logits).argmax(axis=1)
    return paddle.argmax(logits, axis=1).numpy()


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, vocab_limit: int | None = None):
        self.config = config
        self.sampler = Sampler(config.logprobs_mode)  # a bad mode fails before the load
        dtype = None if config.dtype == "auto" else config.dtype
        self.quant = QuantConfig.of_engine(config, ModelConfig.from_dir(model_dir))
        self.model, self.model_config = load_model(model_dir, dtype=dtype, quantization=self.quant)
        self.kv_static_scales = None  # C8 per-head scales, when the checkpoint ships them
        if self.quant.kv_cache_int8:
            self.kv_static_scales = read_static_kv_scales(model_dir, self.model_config.num_hidden_layers)
        self.dtype = token_embedding(self.model).weight.dtype
        self.kv_dtype = float_kv_cache_dtype(config, model_dir)
        self.block_size = config.block_size
        # Ids the tokenizer cannot decode (padded embedding rows) are never sampled.
        vocab = self.model_config.vocab_size
        self.vocab_limit = min(vocab, vocab_limit) if vocab_limit else vocab
        self.kv_caches: list[KVCache] = []
        self.multimodal = hasattr(self.model, "embed_multimodal")
        self.vision_token_ids = vision_token_ids(self.model)
        placeholders = getattr(self.model, "placeholder_ids", None)
        self.placeholder_ids = frozenset(placeholders or [getattr(self.model, "image_token_id", -1)])

    # KV cache ---------------------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        mc = self.model_config
        return kv_cache_bytes_per_token(
            mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, self.kv_dtype,
            int8=self.quant.kv_cache_int8, static_scales=self.kv_static_scales is not None,
        )

    def num_kv_blocks(self, max_model_len: int) -> int:
        """From num_gpu_blocks_override, else kv_cache_memory_bytes, else a share of free host memory."""
        block_bytes = self.kv_bytes_per_token() * self.block_size
        num_blocks = self.config.num_gpu_blocks_override or self._kv_budget(max_model_len) // block_bytes
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget ({kv_budget_source(self.config)}) holds no block of "
                             f"{block_bytes} bytes ({self.block_size} tokens)")
        if self.config.max_model_len and not self.config.num_gpu_blocks_override:
            self._check_one_sequence_fits(num_blocks, max_model_len, block_bytes)
        need, available = num_blocks * block_bytes, host_memory_available()
        if paddle.get_device() == "cpu" and need > available:
            # Refused here rather than left to the OOM killer halfway through zeroing the cache.
            raise ValueError(f"a KV cache of {num_blocks} blocks needs {need / 2**30:.2f} GiB but the host "
                             f"has {available / 2**30:.2f} GiB available ({kv_budget_source(self.config)})")
        return num_blocks

    def _check_one_sequence_fits(self, num_blocks: int, max_model_len: int, block_bytes: int) -> None:
        """As vLLM: a max_model_len asked for must fit once (the engine lowers only a length left unset)."""
        need_mib = self._sequence_bytes(max_model_len) / 2**20
        have_mib = num_blocks * block_bytes / 2**20
        if have_mib < need_mib:
            raise ValueError(
                f"max_model_len {max_model_len} needs {need_mib:.1f} MiB of KV cache for one sequence, but "
                f"the budget ({kv_budget_source(self.config)}) holds {have_mib:.1f} MiB "
                f"({num_blocks * self.block_size} tokens): lower max_model_len or give the KV cache more "
                "memory"
            )

    def _sequence_bytes(self, max_model_len: int) -> int:
        """The KV cache one sequence of max_model_len tokens takes, in whole blocks."""
        return -(-max_model_len // self.block_size) * self.block_size * self.kv_bytes_per_token()

    def _kv_budget(self, max_model_len: int) -> int:
        config = self.config
        if config.kv_cache_memory_bytes:
            return config.kv_cache_memory_bytes
        if not paddle.get_device().startswith("cpu"):
            logger.warning("KV cache sized from host memory: set kv_cache_memory_bytes on accelerators")
        share = host_memory_available() * config.kv_cache_host_fraction * config.gpu_memory_utilization
        # More than every sequence at full length is never used. The byte cap keeps tests and CPUs sane, but
        # never below one full-length sequence: a row's max_model_len must fit if the host share allows it.
        one_sequence = self._sequence_bytes(max_model_len)
        useful = config.max_num_seqs * one_sequence
        return int(min(share, max(min(useful, config.kv_cache_max_host_bytes), one_sequence)))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = [num_blocks * self.block_size, mc.num_key_value_heads, mc.head_dim]
        if self.quant.kv_cache_int8:  # C8: int8 keys/values + fp32 scales (layers/quant/kv_cache.py)
            scales = self.kv_static_scales or [None] * mc.num_hidden_layers
            self.kv_caches = [Int8KVCache.allocate(*shape, static_scales=s) for s in scales]
        else:
            self.kv_caches = [
                (paddle.zeros(shape, dtype=self.kv_dtype), paddle.zeros(shape, dtype=self.kv_dtype))
                for _ in range(mc.num_hidden_layers)
            ]
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * self.block_size * self.kv_bytes_per_token() / 2**20)
        if paddle.get_device() == "cpu":  # the last big allocation: from here on, activations come and go
            keep_freed_memory()

    # Step -------------------------------------------------------------------------------------------

    @paddle.no_grad()
    def execute(self, out: SchedulerOutput) -> list[SampledToken]:
        """Run the scheduled tokens; returns one sampled token per `out.sampling` sequence, in order."""
        seqs = list(out.scheduled)
        query_lens = [out.scheduled[seq] for seq in seqs]
        input_ids, positions, meta = self._prepare(seqs, query_lens)
        extra = self._multimodal_inputs(seqs, query_lens, input_ids)
        hidden = self.model(input_ids, positions, meta, self.kv_caches, **extra)
        if scoring := PromptScoring.of_step(seqs, query_lens):
            scoring.deliver(score_prompt_rows(scoring.rows, scoring.targets, scoring.top,
                                              lambda rows: self._logits(hidden, rows).numpy()))
        if not out.sampling:
            return []
        sampling = set(out.sampling)
        ends = np.cumsum(meta.query_lens) - 1
        rows = np.array([end for seq, end in zip(seqs, ends, strict=True) if seq in sampling], dtype=np.int64)
        logits = self._logits(hidden, rows)  # prefill chunks: only a sequence's last token is sampled
        if all(argmax_only(seq) for seq in out.sampling):
            return [SampledToken(int(t)) for t in greedy_token_ids(logits)]
        return self.sampler(logits.numpy(), out.sampling)

    def _logits(self, hidden: paddle.Tensor, rows: np.ndarray) -> paddle.Tensor:
        """Logits [len(rows), sampleable vocab] of some flat token rows (all of them: no gather)."""
        if len(rows) < hidden.shape[0]:
            hidden = paddle.gather(hidden, device_tensor(rows))
        return self.model.compute_logits(hidden)[:, : self.vocab_limit]

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
        positions = step_positions(seqs, starts, context_lens)
        tables = [seq.block_table for seq in seqs]
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.block_size)
        return device_tensor(input_ids), device_tensor(positions), meta

    def _multimodal_inputs(
        self, seqs: list[Sequence], query_lens: list[int], input_ids: paddle.Tensor
    ) -> dict[str, Any]:
        """`inputs_embeds` when image placeholders are in the batch; ERNIE-4.5-VL's `vision_mask`."""
        if not self.multimodal:
            return {}
        spans = [(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
                 for seq, n in zip(seqs, query_lens, strict=True)]
        extra: dict[str, Any] = {}
        if self.vision_token_ids is not None:
            starts, ends = [s for _, s, _ in spans], [e for _, _, e in spans]
            mask = step_vision_mask(seqs, starts, ends, self.vision_token_ids)
            extra["vision_mask"] = device_tensor(mask)
        media = [seq.request.mm for seq, s, e in spans if seq.request.mm and seq.request.mm.has_media(s, e)]
        if media:
            self._encode_media([mm for mm in media if mm.embeds is None])
            rows = paddle.concat([row for span in spans for row in self._placeholder_rows(*span)])
            extra["inputs_embeds"] = self.model.get_input_embeddings(input_ids, rows)
        return extra

    def _placeholder_rows(self, seq: Sequence, start: int, end: int) -> list[paddle.Tensor]:
        """Embedding rows for the placeholder ids among a sequence's tokens [start, end), in order."""
        rows = []
        mm = seq.request.mm
        if mm is not None and mm.has_media(start, end):
            rows.append(mm.embed_rows(start, end))
        generated = seq.token_ids[max(start, seq.num_prompt_tokens) : end]
        sampled = [t for t in generated if t in self.placeholder_ids]
        if sampled:  # a placeholder id the model itself sampled is just that token's embedding
            rows.append(token_embedding(self.model)(device_tensor(np.asarray(sampled, dtype=np.int64))))
        return rows

    def _encode_media(self, pending: list[MultimodalInputs]) -> None:
        """One vision pass over the images of every request that needs its embeddings this step."""
        pending = list(dict.fromkeys(pending))  # n > 1: siblings share their request's inputs
        if not pending:
            return
        pixels = np.concatenate([mm.prompt.images.pixel_values for mm in pending])
        grids = np.concatenate([mm.prompt.images.grid_thw for mm in pending])
        embeds = self.model.embed_multimodal(pixels, grids)
        sizes = [mm.num_placeholders for mm in pending]
        for mm, rows in zip(pending, paddle.split(embeds, sizes), strict=True):
            mm.embeds = rows
        logger.debug("vision pass: %d requests, %d patches", len(pending), pixels.shape[0])
