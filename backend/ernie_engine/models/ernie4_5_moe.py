"""ERNIE-4.5 mixture-of-experts decoder (e.g. ERNIE-4.5-21B-A3B, 300B-A47B).

The dense decoder with the feed-forward block of some layers replaced by a sparse MoE block: a router
picks `moe_k` of `moe_num_experts` SwiGLU experts per token, and `moe_num_shared_experts` shared experts
(one SwiGLU of width moe_intermediate_size * moe_num_shared_experts) see every token. Layer i is MoE when
start <= i <= end and (i + 1) % moe_layer_interval == 0 (`ModelConfig.is_moe_layer`); the others keep
the dense MLP. Routing details live in `layers/moe.py`.
"""

from __future__ import annotations

from paddle import nn

from ..config import ModelConfig
from ..layers.moe import SparseMoeBlock
from .ernie4_5 import Ernie4_5ForCausalLM, Ernie4_5MLP


class Ernie4_5_MoeForCausalLM(Ernie4_5ForCausalLM):
    def make_mlp(self, config: ModelConfig, layer_idx: int) -> nn.Layer:
        if not config.is_moe_layer(layer_idx):
            return super().make_mlp(config, layer_idx)
        shared = None
        if config.moe_num_shared_experts > 0:
            width = config.moe_intermediate_size * config.moe_num_shared_experts
            shared = Ernie4_5MLP(config.hidden_size, width, bias=config.use_bias)
        return SparseMoeBlock(
            hidden_size=config.hidden_size,
            num_experts=config.moe_num_experts,
            top_k=config.moe_k,
            intermediate_size=config.moe_intermediate_size,
            norm_min=config.moe_norm_min,
            shared_experts=shared,
        )
