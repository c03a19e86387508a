"""Which slice of each parameter a tensor-parallel rank holds (Megatron), and the model that holds it.

Per rank r of W:
- attention: query heads [r*H/W, (r+1)*H/W); KV heads split the same way, or, when there are fewer KV
  heads than ranks, the one KV head this rank's query heads use (replicated over W/KVH ranks). Each part of
  the fused q/k/v projection is narrowed separately, so the rank's qkv_proj is [q_r | k_r | v_r].
- MLP, shared experts and every routed expert: the intermediate slice r of W, taken from the gate and the
  up half separately (the rank's up_gate_proj is [gate_r | up_r]); down_proj keeps the matching rows.
- o_proj rows follow the query heads. The router, norms and MoE statics are replicated.
- vocabulary: rows [r*S, min((r+1)*S, V)) of the embedding and columns of an untied LM head, S = ceil(V/W).
- multimodal models (PaddleOCR-VL, ERNIE-4.5-VL): the language model (`language_model.*`) and the LM head as
  above; ERNIE-4.5-VL's text and vision experts each split their own intermediate size, both routers are
  replicated. The vision encoder and projector are replicated whole: small next to the language model, and
  every rank encodes a step's media itself (docs/ARCHITECTURE.md, "Tensor parallelism").
- pre-quantized weights (docs/QUANTIZATION.md layout): column-parallel `weight` / `weight_scale` split their
  output channels like a float weight. Row-parallel ones split along the input: packed int4 rows hold two
  input rows each and group scales one group each, so the rank's share must be whole bytes and whole groups
  (checked, naming the tensor); a per-channel scale serves every input row and is replicated. C8 KV scales
  follow the KV heads (shard_runner.py).

The model is built at rank-local sizes (`local_config`), then `parallelize` swaps in the vocab-parallel
embedding and the partial-sum reductions; the loader reads only the slices `shard` names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import paddle
from paddle import nn

from ..config import ModelConfig
from ..layers.moe import GroupedExperts
from ..layers.parallel import VocabParallelEmbedding, reduce_output
from ..layers.quant.config import QuantConfig
from ..loader import ParamSpec, Piece
from ..models.ernie4_5 import Ernie4_5DecoderLayer

MULTIMODAL_ARCHITECTURES = {"PaddleOCRVLForConditionalGeneration", "Ernie4_5_VLMoeForConditionalGeneration"}
# Architectures whose parameters `shard` knows.
SUPPORTED_ARCHITECTURES = {
    "Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM", "Ernie4_5_MoeForCausalLM", *MULTIMODAL_ARCHITECTURES
}
# What a multimodal model shards; everything else (vision encoder, projector) is replicated.
_SHARDED_PREFIXES = ("language_model.", "lm_head.")
_STACKED_EXPERTS = re.compile(r"\.experts\.(?P<name>up_gate_proj|down_proj)(?P<scale>_scale)?$")
INT4_METHODS = ("wint4", "w4a8")
# Row-parallel projections: partial sums, so their bias is added on rank 0 only.
_ROW_PARALLEL = ("o_proj", "down_proj")

Range = tuple[int, int]


def check_supported(config: ModelConfig, world_size: int) -> None:
    """Raise ValueError when `config` cannot be split over `world_size` ranks (checked before any spawn)."""
    problems = []
    if config.architecture not in SUPPORTED_ARCHITECTURES:
        problems.append(f"architecture {config.architecture} has no tensor-parallel support")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % world_size:
        problems.append(f"num_attention_heads {heads} is not a multiple of the TP size")
    if kv_heads % world_size and world_size % kv_heads:
        problems.append(f"num_key_value_heads {kv_heads} neither divides nor is a multiple of the TP size")
    if config.intermediate_size % world_size:
        problems.append(f"intermediate_size {config.intermediate_size} is not a multiple of the TP size")
    if any(size % world_size for size in _per_modality(config.moe_intermediate_size)):
        problems.append(
            f"moe_intermediate_size {config.moe_intermediate_size} is not a multiple of the TP size"
        )
    if config.vocab_size < world_size:
        problems.append(f"vocab_size {config.vocab_size} is smaller than the TP size")
    if problems:
        raise ValueError(f"tensor_parallel_size {world_size}: " + "; ".join(problems))


def check_quantized(config: ModelConfig, world_size: int, quant: QuantConfig) -> None:
    """Raise ValueError when a 4-bit method would pack an odd share of a row-parallel input on a rank (two
    int4 rows per byte), naming the size: checked before any spawn, the ranks would fail deep in packing."""
    sizes: dict[str, list[int]] = {}
    if quant.dense_method in INT4_METHODS:
        sizes["intermediate_size"] = [config.intermediate_size]
        sizes["num_attention_heads * head_dim"] = [config.num_attention_heads * config.head_dim]
        if config.moe_num_shared_experts:
            sizes["moe_intermediate_size * moe_num_shared_experts"] = [
                s * config.moe_num_shared_experts for s in _per_modality(config.moe_intermediate_size)
            ]
    if quant.moe_method in INT4_METHODS and config.is_moe:
        sizes["moe_intermediate_size"] = _per_modality(config.moe_intermediate_size)
    odd = [f"{name} {size} gives {size // world_size} rows per rank"
           for name, values in sizes.items() for size in values if size // world_size % 2]
    if odd:
        methods = "/".join(sorted({quant.dense_method, quant.moe_method} & set(INT4_METHODS)))
        raise ValueError(f"tensor_parallel_size {world_size} with {methods} (two int4 input rows per byte): "
                         + "; ".join(odd) + ", an odd number")


def _per_modality(size: int | list[int]) -> list[int]:
    """A MoE size as a list: ERNIE-4.5-VL gives [text, vision], the text models one int."""
    return list(size) if isinstance(size, list | tuple) else [size]


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig  # the full model's
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        check_supported(self.config, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside 0..{self.world_size - 1}")

    # Ranges -----------------------------------------------------------------------------------------

    def even(self, size: int) -> Range:
        """This rank's equal share of `size` (a multiple of the world size)."""
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part

    @property
    def q_heads(self) -> Range:
        return self.even(self.config.num_attention_heads)

    @property
    def kv_heads(self) -> Range:
        kv = self.config.num_key_value_heads
        if kv >= self.world_size:
            return self.even(kv)
        head = self.q_heads[0] * kv // self.config.num_attention_heads  # the KV head of our query heads
        return head, head + 1

    @property
    def multimodal(self) -> bool:
        return self.config.architecture in MULTIMODAL_ARCHITECTURES

    @property
    def vocab_shard_size(self) -> int:
        return -(-self.config.vocab_size // self.world_size)

    @property
    def vocab(self) -> Range:
        size = self.vocab_shard_size
        return self.rank * size, min((self.rank + 1) * size, self.config.vocab_size)

    def local_config(self) -> ModelConfig:
        """The sizes one rank's model is built with."""
        c, w = self.config, self.world_size
        start, stop = self.kv_heads
        return dataclasses.replace(
            c,
            num_attention_heads=c.num_attention_heads // w,
            num_key_value_heads=stop - start,
            intermediate_size=c.intermediate_size // w,
            moe_intermediate_size=_divide(c.moe_intermediate_size, w),
            vocab_size=self.vocab[1] - self.vocab[0],
        )

    # Loader hook ------------------------------------------------------------------------------------

    def shard(self, spec: ParamSpec) -> ParamSpec:
        """Narrow a full parameter spec to this rank's slice (the loader's `shard` hook)."""
        if self.multimodal and not spec.param.startswith(_SHARDED_PREFIXES):
            return spec  # vision encoder / projector
        names = spec.param.split(".")
        stacked = _STACKED_EXPERTS.search(spec.param)
        module = stacked["name"] if stacked else (names[-2] if len(names) >= 2 else "")
        leaf = ("weight_scale" if stacked["scale"] else "weight") if stacked else names[-1]
        if module == "qkv_proj":
            dim = self.config.head_dim
            (q0, q1), (k0, k1) = self.q_heads, self.kv_heads
            ranges = [(q0 * dim, q1 * dim), (k0 * dim, k1 * dim), (k0 * dim, k1 * dim)]
            return _narrow_parts(spec, ranges)
        if module == "up_gate_proj":
            return _narrow_parts(spec, [self.even(p.value_shape()[spec.axis]) for p in spec.pieces])
        if module in _ROW_PARALLEL and leaf == "weight":  # o_proj rows follow the query heads: an even split
            return _narrow(spec, 0, self.input_rows(spec, "input rows (int4: bytes of two rows)"))
        if module in _ROW_PARALLEL and leaf == "weight_scale":
            if len(spec.shape) == 1 or spec.shape[0] == 1:
                return spec  # per output channel
            return _narrow(spec, 0, self.input_rows(spec, "scale groups"))
        if module == "embed_tokens":
            return _narrow(spec, 0, self.vocab)
        if module == "lm_head":
            return _narrow(spec, len(spec.shape) - 1, self.vocab)
        return spec  # replicated

    def input_rows(self, spec: ParamSpec, unit: str) -> Range:
        """This rank's equal share of a row-parallel tensor's rows (input rows, int4 bytes, scale groups)."""
        rows, size = spec.shape[0], self.world_size
        if rows % size:  # float sizes were checked up front: this is packing or grouping
            raise ValueError(
                f"tensor_parallel_size {size}: {spec.pieces[0].tensor} has {rows} {unit}, not a multiple of "
                f"{size}; a rank's share of the input would split an int4 byte or a scale group"
            )
        return self.even(rows)

    # Model ------------------------------------------------------------------------------------------

    def parallelize(self, model: nn.Layer) -> None:
        """Make a model built from `local_config()` this rank's tensor-parallel shard (before loading)."""
        text = _text_model(model)
        old = text.embed_tokens
        text.embed_tokens = VocabParallelEmbedding(*self.vocab, old.weight.shape[1], old.weight.dtype)
        for layer in text.layers:
            if not isinstance(layer, Ernie4_5DecoderLayer):
                raise TypeError(f"cannot parallelize decoder layer {type(layer).__name__}")
            reduce_output(layer.self_attn)  # partial over this rank's heads (o_proj rows)
            reduce_output(layer.mlp)  # partial over the intermediate slice (dense, or experts + shared)
        for name, sublayer in text.named_sublayers():
            if name.endswith(_ROW_PARALLEL) or isinstance(sublayer, GroupedExperts):
                sublayer.input_sharded = True

    def drop_partial_biases(self, model: nn.Layer) -> None:
        """After loading: a row-parallel bias is added once over the all-reduce, so only rank 0 keeps it."""
        if self.rank == 0:
            return
        for name, param in _text_model(model).named_parameters():
            parts = name.split(".")
            if parts[-1] == "bias" and len(parts) >= 2 and parts[-2] in _ROW_PARALLEL:
                param.set_value(paddle.zeros_like(param))


def _divide(size: int | list[int], world_size: int) -> int | list[int]:
    return [s // world_size for s in size] if isinstance(size, list | tuple) else size // world_size


def _text_model(model: nn.Layer) -> nn.Layer:
    """The layers that are sharded: a multimodal model's language model, or the text model itself."""
    return getattr(model, "language_model", model)


def _narrow_piece(piece: Piece, axis: int, start: int, stop: int) -> Piece:
    """`piece` restricted to [start, stop) of its own extent along `axis` (parameter orientation)."""
    if piece.axis == axis:
        end = piece.start + stop
        if piece.stop is not None and end > piece.stop:
            raise ValueError(f"shard range [{start}, {stop}) exceeds piece {piece}")
        return dataclasses.replace(piece, start=piece.start + start, stop=end)
    if piece.start != 0 or piece.stop is not None:
        raise ValueError(f"piece {piece} is already ranged along another axis")
    return dataclasses.replace(piece, axis=axis, start=start, stop=stop)


def _with_size(spec: ParamSpec, axis: int, size: int, pieces: tuple[Piece, ...]) -> ParamSpec:
    shape = list(spec.shape)
    shape[axis] = size
    return dataclasses.replace(spec, shape=tuple(shape), pieces=pieces, axis=axis)


def _narrow(spec: ParamSpec, axis: int, span: Range) -> ParamSpec:
    """A single-piece parameter restricted to `span` along `axis`."""
    if len(spec.pieces) != 1:
        raise ValueError(f"parameter {spec.param}: expected one piece, got {len(spec.pieces)}")
    start, stop = span
    return _with_size(spec, axis, stop - start, (_narrow_piece(spec.pieces[0], axis, start, stop),))


def _narrow_parts(spec: ParamSpec, spans: list[Range]) -> ParamSpec:
    """A fused parameter whose parts (its pieces, along `spec.axis`) are each restricted to their span."""
    if len(spans) != len(spec.pieces):
        raise ValueError(f"parameter {spec.param}: {len(spec.pieces)} parts, {len(spans)} shard ranges")
    pieces = tuple(_narrow_piece(p, spec.axis, a, b) for p, (a, b) in zip(spec.pieces, spans, strict=True))
    return _with_size(spec, spec.axis, sum(b - a for a, b in spans), pieces)
