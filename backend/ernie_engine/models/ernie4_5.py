"""ERNIE-4.5 dense decoder (e.g. ERNIE-4.5-0.3B) on a flat batch with a paged KV cache.

Per layer: x += Attention(RMSNorm(x)); x += MLP(RMSNorm(x)). Attention uses one fused q/k/v projection,
interleaved RoPE and grouped-query heads; the MLP is SwiGLU with one fused gate/up projection (gate half
first, as the -Paddle checkpoints store it). Parameter names follow the -Paddle checkpoints without their
`ernie.` prefix, so the loader's mapping stays a table.

As in vLLM, a layer takes and returns (output, residual) - the residual stream being their sum - and each
RMSNorm adds the two before normalizing (layers/norm), so the adds cost no ops of their own on CPU. With fp32
caches on CPU the attention input is one op too (layers/attention.fused_qkv_attention).

Subclasses change the MLP per layer through `make_mlp` (MoE: `Ernie4_5_MoeForCausalLM`).
"""

from __future__ import annotations

import paddle
from paddle import nn

from ..config import ModelConfig
from ..layers.activation import swiglu
from ..layers.attention import (
    AttentionMetadata,
    KVCache,
    fused_qkv_attention,
    paged_attention,
    qkv_attention_fused,
)
from ..layers.linear import ZEROS, Linear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding, apply_rotary

Rope = tuple[paddle.Tensor, paddle.Tensor]  # (cos, sin) for the batch's positions


class Ernie4_5Attention(nn.Layer):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {config.num_key_value_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.use_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.use_bias)

    def forward(
        self, x: paddle.Tensor, rope: Rope, meta: AttentionMetadata, kv_cache: KVCache | None
    ) -> paddle.Tensor:
        qkv = self.qkv_proj(x)
        if qkv_attention_fused(qkv, rope, meta, kv_cache):
            out = fused_qkv_attention(qkv, *rope, meta, kv_cache, self.scale)
        else:
            q, k, v = paddle.split(qkv, self.split_sizes, axis=-1)
            q = apply_rotary(q.reshape([-1, self.num_heads, self.head_dim]), *rope)
            k = apply_rotary(k.reshape([-1, self.num_kv_heads, self.head_dim]), *rope)
            v = v.reshape([-1, self.num_kv_heads, self.head_dim])
            out = paged_attention(q, k, v, meta, kv_cache, self.scale)
        return self.o_proj(out.reshape([-1, self.num_heads * self.head_dim]))


class Ernie4_5MLP(nn.Layer):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul (gate half first)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_gate_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(swiglu(self.up_gate_proj(x)))


Residual = paddle.Tensor | None  # the residual stream before a layer's input (None before the first layer)


class Ernie4_5DecoderLayer(nn.Layer):
    """Pre-norm block passing (output, residual) on; `mlp` is any layer mapping [T, hidden] -> [T, hidden]
    (dense or MoE)."""

    def __init__(self, config: ModelConfig, mlp: nn.Layer) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Ernie4_5Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        x: paddle.Tensor,
        residual: Residual,
        rope: Rope,
        meta: AttentionMetadata,
        kv_cache: KVCache | None,
        *mlp_args: paddle.Tensor | None,
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """(previous output, residual) -> (MLP output, residual): the stream after the layer is their sum."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, meta, kv_cache), residual)
        return self.feed_forward(h, *mlp_args), residual

    def feed_forward(self, h: paddle.Tensor, *mlp_args: paddle.Tensor | None) -> paddle.Tensor:
        """The MLP on the normed stream; a subclass whose MLP needs more per-token inputs takes them here."""
        return self.mlp(h)


def final_norm(norm: RMSNorm, x: paddle.Tensor, residual: Residual) -> paddle.Tensor:
    """The model's last RMSNorm over the residual stream x + residual (x alone without layers)."""
    return norm(x) if residual is None else norm(x, residual)[0]


class Ernie4_5ForCausalLM(nn.Layer):
    """Inference-only model: parameters never need gradients (the loader fills them)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, weight_attr=paddle.ParamAttr(initializer=ZEROS)
        )
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.LayerList(
            [Ernie4_5DecoderLayer(config, self.make_mlp(config, i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied: logits use the embedding table, so there is no lm_head parameter to load.
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        for param in self.parameters():
            param.stop_gradient = True

    def make_mlp(self, config: ModelConfig, layer_idx: int) -> nn.Layer:
        """The feed-forward block of layer `layer_idx`; MoE subclasses override this."""
        return Ernie4_5MLP(config.hidden_size, config.intermediate_size, bias=config.use_bias)

    def forward(
        self,
        input_ids: paddle.Tensor,
        positions: paddle.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
    ) -> paddle.Tensor:
        """input_ids, positions: [T] int64 (flat batch) -> final-normed hidden states [T, hidden]."""
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        rope = self.rotary_emb(positions)
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, meta, None if kv_caches is None else kv_caches[i])
        return final_norm(self.norm, x, residual)

    def compute_logits(self, hidden: paddle.Tensor) -> paddle.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        if self.lm_head is None:
            logits = paddle.matmul(hidden, self.embed_tokens.weight, transpose_y=True)
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32")
