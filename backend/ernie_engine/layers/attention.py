"""Attention over a paged KV cache for a mixed batch of prefill chunks and decode tokens, in one call.

The batch is flat: T new tokens from B sequences, sequence after sequence. Each sequence b brings
`query_lens[b]` new tokens and, after this step, has `context_lens[b]` tokens of keys/values (cached + new).
New keys/values are written into the cache at `slot_mapping` (slot = block * block_size + offset); every
query then attends causally to its sequence's context, gathered through the block table.

Without a cache (`slot_mapping is None`) the context is the new tokens themselves: plain causal attention
over packed sequences, which is what reference tests and one-shot scoring use.

This is the portable Paddle path. Faster kernels (a CPU custom op, XPU's block attention) plug in behind
`paged_attention` with the same metadata. On CPU (fp32 or bf16 caches), `fused_qkv_attention` goes further:
from the fused q/k/v projection's output, one op rotates q and k and writes k/v into the cache, and the
attention kernel reads it (`qkv_attention_fused` says when; the layers fall back to rotary +
`paged_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import paddle
import paddle.nn.functional as F

from ..device import device_tensor
from . import cpu_kernels
from .quant.kv_cache import Int8KVCache

# (keys, values), each [num_slots, num_kv_heads, head_dim]; or int8 with scales (C8, layers/quant/kv_cache.py)
KVCache = tuple[paddle.Tensor, paddle.Tensor] | Int8KVCache


@dataclass
class AttentionMetadata:
    """One step's attention inputs. The CPU kernel reads only `slot_mapping`, `kv_index` and `lens`; the
    portable Paddle path's (XPU today, or no kernels) padded indices and mask are built the first time it
    asks, since the mask alone is [B, 1, max_q, max_kv] floats (a 2048-token prefill: 16 MB and ~15 ms of
    numpy per step)."""

    query_lens: list[int]
    context_lens: list[int]
    slot_mapping: paddle.Tensor | None  # [T] int64, or None for no cache
    kv_index: paddle.Tensor  # [B * max_kv] int64: cache slot (or flat token) behind each padded key

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)

    @cached_property
    def lens(self) -> paddle.Tensor:
        """[2, B] int64: query_lens then context_lens (built once per step, shared by every layer)."""
        return device_tensor(np.asarray([self.query_lens, self.context_lens], dtype=np.int64))

    @cached_property
    def query_index(self) -> paddle.Tensor:
        """[B * max_q] int64: the flat token behind each padded query (pads -> 0)."""
        max_q = self.max_query_len
        index = np.zeros((self.num_seqs, max_q), dtype=np.int64)
        starts = np.cumsum([0, *self.query_lens[:-1]])
        for b, (start, q_len) in enumerate(zip(starts, self.query_lens, strict=True)):
            index[b, :q_len] = np.arange(start, start + q_len)
        return device_tensor(index.reshape(-1))

    @cached_property
    def output_index(self) -> paddle.Tensor:
        """[T] int64: the padded position (b * max_q + i) of each flat token."""
        max_q = self.max_query_len
        return device_tensor(
            np.concatenate([b * max_q + np.arange(q_len) for b, q_len in enumerate(self.query_lens)])
        )

    @cached_property
    def mask(self) -> paddle.Tensor:
        """[B, 1, max_q, max_kv] additive float mask (0 or -inf): causal within each sequence's context."""
        max_q, max_kv = self.max_query_len, self.max_context_len
        mask = np.full((self.num_seqs, 1, max_q, max_kv), -np.inf, dtype=np.float32)
        for b, (q_len, ctx_len) in enumerate(zip(self.query_lens, self.context_lens, strict=True)):
            # Query i sits at position ctx_len - q_len + i and sees keys 0..that position.
            visible = np.arange(max_kv)[None, :] <= (ctx_len - q_len + np.arange(q_len))[:, None]
            mask[b, 0, :q_len][visible] = 0.0
            mask[b, 0, q_len:, 0] = 0.0  # padded query rows see one key so softmax stays finite
        return device_tensor(mask)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int] | None = None,
        block_tables: list[list[int]] | None = None,
        block_size: int = 0,
    ) -> AttentionMetadata:
        """Metadata for one step. `block_tables=None` means no cache (context_lens must equal query_lens)."""
        query_lens = list(query_lens)
        context_lens = list(query_lens) if context_lens is None else list(context_lens)
        if len(context_lens) != len(query_lens):
            raise ValueError("query_lens and context_lens differ in length")
        kv_index = np.zeros((len(query_lens), max(context_lens)), dtype=np.int64)
        slots = []
        start = 0
        for b, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens, strict=True)):
            if q_len > ctx_len or q_len <= 0:
                raise ValueError(f"sequence {b}: query_len {q_len} must be in 1..context_len {ctx_len}")
            if block_tables is None:
                if ctx_len != q_len:
                    raise ValueError("without a cache every sequence's context is its query")
                kv_index[b, :ctx_len] = np.arange(start, start + ctx_len)
            else:
                positions = np.arange(ctx_len)
                table = np.asarray(block_tables[b], dtype=np.int64)
                ctx_slots = table[positions // block_size] * block_size + positions % block_size
                kv_index[b, :ctx_len] = ctx_slots
                slots.append(ctx_slots[ctx_len - q_len :])
            start += q_len
        slot_mapping = None if block_tables is None else device_tensor(np.concatenate(slots))
        return cls(query_lens, context_lens, slot_mapping, device_tensor(kv_index.reshape(-1)))


def qkv_attention_fused(
    qkv: paddle.Tensor,
    rope: tuple[paddle.Tensor, paddle.Tensor],
    meta: AttentionMetadata,
    kv_cache: KVCache | None,
) -> bool:
    """Whether `fused_qkv_attention` takes this layer: exactly when the unfused path would run the CPU rotary,
    cache writes and the CPU attention kernel (fp32 activations, fp32 or bf16 caches, kernels available)."""
    return (
        meta.slot_mapping is not None
        and isinstance(kv_cache, tuple)  # not C8's Int8KVCache, not None
        and cpu_kernels.fp32_supported(qkv, *rope)
        and cpu_kernels.caches_supported(*kv_cache)
    )


def fused_qkv_attention(
    qkv: paddle.Tensor,
    cos: paddle.Tensor,
    sin: paddle.Tensor,
    meta: AttentionMetadata,
    kv_cache: tuple[paddle.Tensor, paddle.Tensor],
    scale: float,
) -> paddle.Tensor:
    """qkv [T, (H + 2 KVH) * D] -> attention output [T, H, D], with rotary (cos, sin) applied to q and k and
    the new keys/values written into the cache; bit-identical to the unfused path."""
    key_cache, value_cache = kv_cache
    q = cpu_kernels.rotary_kv_write(qkv, cos, sin, key_cache, value_cache, meta.slot_mapping)
    return cpu_kernels.paged_attention(q, key_cache, value_cache, meta, scale)


def write_rows(cache: paddle.Tensor, slots: paddle.Tensor, rows: paddle.Tensor) -> None:
    """cache[slots] = rows in the cache's dtype (Paddle's CPU scatter has no bf16 kernel; index_put has)."""
    rows = rows.astype(cache.dtype)
    if cache.dtype is cpu_kernels.BF16 and cpu_kernels.on_cpu(cache):
        paddle.index_put_(cache, (slots,), rows)
    else:
        paddle.scatter_(cache, slots, rows, overwrite=True)


def paged_attention(
    q: paddle.Tensor,
    k: paddle.Tensor,
    v: paddle.Tensor,
    meta: AttentionMetadata,
    kv_cache: KVCache | None,
    scale: float,
) -> paddle.Tensor:
    """q [T, H, D], k/v [T, KVH, D] for the new tokens -> attention output [T, H, D].

    An `Int8KVCache` (C8) quantizes on write and dequantizes only the gathered keys/values.
    """
    if isinstance(kv_cache, Int8KVCache) and meta.slot_mapping is not None:
        kv_cache.write(meta.slot_mapping, k, v)
        k_ctx, v_ctx = kv_cache.gather(meta.kv_index)
    else:
        if meta.slot_mapping is not None:
            key_cache, value_cache = kv_cache
            write_rows(key_cache, meta.slot_mapping, k)
            write_rows(value_cache, meta.slot_mapping, v)
            k, v = key_cache, value_cache
        if cpu_kernels.fp32_supported(q) and cpu_kernels.caches_supported(k, v):  # in place: no padded copies
            return cpu_kernels.paged_attention(q, k, v, meta, scale)
        k_ctx, v_ctx = paddle.gather(k, meta.kv_index), paddle.gather(v, meta.kv_index)
    num_seqs, max_q, max_kv = meta.num_seqs, meta.max_query_len, meta.max_context_len
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_ctx.shape[1]
    q_pad = paddle.gather(q, meta.query_index).reshape([num_seqs, max_q, num_heads, head_dim])
    k_pad = k_ctx.reshape([num_seqs, max_kv, num_kv_heads, head_dim])
    v_pad = v_ctx.reshape([num_seqs, max_kv, num_kv_heads, head_dim])
    out = F.scaled_dot_product_attention(
        q_pad, k_pad.astype(q.dtype), v_pad.astype(q.dtype), attn_mask=meta.mask, scale=scale
    )
    return paddle.gather(out.reshape([num_seqs * max_q, num_heads, head_dim]), meta.output_index)
