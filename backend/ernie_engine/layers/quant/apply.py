"""Putting quantized weights into a model: Linears and stacked MoE experts.

A quantized Linear keeps its parameter names so the state dict matches a pre-quantized checkpoint:
`weight` becomes an int8 buffer ([in, out], or [in/2, out] packed int4) and `weight_scale` an fp32 buffer
[G, out]; `quant_method` tells `Linear.forward` to call `quantized_linear`. Stacked experts get
`up_gate_proj` / `down_proj` as int8 buffers [E, ...] plus `up_gate_proj_scale` / `down_proj_scale`; a
pre-quantized checkpoint stores them per expert (`<experts>.<j>.up_gate_proj.weight` / `.weight_scale`), which
the loader stacks into those buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import paddle
from paddle import nn

from ..linear import Linear
from ..moe import GroupedExperts
from .config import QuantConfig
from .weights import (
    QuantizedWeight,
    load_prequantized,
    method_bits,
    quantize_for_method,
    tensor_nbytes,
    to_device_layout,
)

logger = logging.getLogger(__name__)

EXPERT_WEIGHTS = ("up_gate_proj", "down_proj")


def _replace_with_buffers(layer: nn.Layer, name: str, qw: QuantizedWeight, scale_name: str) -> None:
    """Drop the float parameter `name`; keep the int weight and its scale resident as buffers."""
    if name in layer._parameters:
        delattr(layer, name)
    layer.register_buffer(name, qw.qweight)
    layer.register_buffer(scale_name, qw.scale)


def quantize_linear(layer: Linear, method: str, group_size: int) -> None:
    qw = quantize_for_method(layer.weight, method, group_size, layer.input_sharded)
    qw = to_device_layout(qw, method, group_size)
    _replace_with_buffers(layer, "weight", qw, "weight_scale")
    layer.quant_method = method
    layer.quant_device_layout = qw.device_layout


def quantize_experts(layer: GroupedExperts, method: str, group_size: int) -> None:
    """Expert by expert, so only one expert's float weight is converted at a time."""
    for name in EXPERT_WEIGHTS:
        stacked, sharded = getattr(layer, name), name == "down_proj" and layer.input_sharded
        parts = [
            quantize_for_method(stacked[e], method, group_size, sharded) for e in range(layer.num_experts)
        ]
        qw = QuantizedWeight(
            paddle.stack([p.qweight for p in parts]),
            paddle.stack([p.scale for p in parts]),
            parts[0].bits,
            parts[0].in_features,
        )
        _replace_with_buffers(layer, name, qw, f"{name}_scale")
    layer.quant_method = method


def untie_lm_head(model: nn.Layer) -> None:
    """Give a tied model its own LM head: a Linear over a copy of the embedding table, which can then be
    quantized while the float table stays for token lookups (the loader ignores a tied `lm_head.weight`)."""
    if getattr(model, "lm_head", None) is not None:
        return
    table = getattr(model, "language_model", model).embed_tokens.weight  # [vocab, hidden]
    head = Linear(table.shape[1], 1)  # a tiny placeholder weight, replaced by the [hidden, vocab] copy
    head.out_features = table.shape[0]
    delattr(head, "weight")
    head.register_buffer("weight", table.transpose([1, 0]).contiguous(), persistable=False)
    model.lm_head = head


def quantize_model(model: nn.Layer, config: QuantConfig) -> None:
    """After loading: quantize the targeted float weights in place; finish pre-quantized ones."""
    if not config.enabled:
        return
    if config.lm_head:
        untie_lm_head(model)
    count = 0
    for name, layer in model.named_sublayers():
        try:
            count += _quantize_layer(name, layer, config)
        except ValueError as err:  # name the layer: a checkpoint may hold NaN / inf weights
            raise ValueError(f"{name}: {err}") from err
    logger.info(
        "quantized %d layers; resident quantized weights %.1f MB", count, quantized_bytes(model) / 2**20
    )


def _quantize_layer(name: str, layer: nn.Layer, config: QuantConfig) -> bool:
    """Quantize (or finish a pre-quantized) Linear or stacked-experts layer; whether it is quantized."""
    if isinstance(layer, Linear):
        method = layer.quant_method or config.method_for(name)
        if layer.quant_method:
            _finish_prequantized(layer, config.group_size)
        elif method:
            quantize_linear(layer, method, config.group_size)
        return bool(method)
    if isinstance(layer, GroupedExperts) and layer.quant_method:
        _finish_prequantized_experts(layer)
        return True
    if isinstance(layer, GroupedExperts) and config.moe_method:
        quantize_experts(layer, config.moe_method, config.group_size)
        return True
    return False


def prepare_prequantized(
    model: nn.Layer, config: QuantConfig, shape_of: Callable[[str], tuple[int, ...] | None]
) -> None:
    """Before loading a pre-quantized checkpoint: int8 buffers shaped as its `.weight` / `.weight_scale`.

    `shape_of(name)` gives a checkpoint tensor's shape by parameter name (None: absent, stays float).
    """
    for name, layer in model.named_sublayers():
        if isinstance(layer, GroupedExperts) and config.moe_method:
            _prepare_prequantized_experts(layer, name, config.moe_method, shape_of)
        method = config.method_for(name) if isinstance(layer, Linear) else ""
        weight_shape, scale_shape = shape_of(f"{name}.weight"), shape_of(f"{name}.weight_scale")
        if not method or weight_shape is None or scale_shape is None:
            continue
        _replace_with_buffers(layer, "weight", _placeholder(weight_shape, scale_shape), "weight_scale")
        layer.quant_method = method


def _placeholder(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> QuantizedWeight:
    """Zero int8 weight and fp32 scale buffers of the stored shapes (the loader fills them)."""
    return QuantizedWeight(paddle.zeros(weight_shape, dtype="int8"), paddle.zeros(scale_shape), 0, 0)


def _prepare_prequantized_experts(
    layer: GroupedExperts, name: str, method: str, shape_of: Callable[[str], tuple[int, ...] | None]
) -> None:
    """Stacked int8 buffers [E, *stored shape] for experts the checkpoint stores as weight + weight_scale.

    Expert 0's tensors give the shapes; the loader checks every expert against them. Experts stored in
    float (no `weight_scale`) stay float and are quantized after loading.
    """
    bits = method_bits(method)
    shapes = {
        w: (shape_of(f"{name}.0.{w}.weight"), shape_of(f"{name}.0.{w}.weight_scale")) for w in EXPERT_WEIGHTS
    }
    if any(scale is None for _, scale in shapes.values()):
        return
    for weight, (weight_shape, scale_shape) in shapes.items():
        _, in_features, out_features = getattr(layer, weight).shape
        stored = [weight_shape[0] * (2 if bits == 4 else 1), weight_shape[1]]
        if stored != [in_features, out_features]:
            raise ValueError(
                f"pre-quantized {name}.0.{weight}.weight {list(weight_shape)} ({method}) does not fit an "
                f"expert weight [{in_features}, {out_features}]"
            )
        stacked = (layer.num_experts, *weight_shape), (layer.num_experts, *scale_shape)
        _replace_with_buffers(layer, weight, _placeholder(*stacked), f"{weight}_scale")
    layer.quant_method = method


def _finish_prequantized(layer: Linear, group_size: int) -> None:
    """Check the loaded int weight against the layer, normalise the scale to [G, out], repack for XPU."""
    if layer.quant_device_layout:
        return
    qw = load_prequantized(layer.weight, layer.weight_scale, method_bits(layer.quant_method))
    expected = [layer.in_features, layer.out_features]
    if [qw.in_features, qw.qweight.shape[-1]] != expected:
        raise ValueError(f"pre-quantized weight {list(layer.weight.shape)} does not fit a Linear {expected}")
    qw = to_device_layout(qw, layer.quant_method, group_size)
    _replace_with_buffers(layer, "weight", qw, "weight_scale")
    layer.quant_device_layout = qw.device_layout


def _finish_prequantized_experts(layer: GroupedExperts) -> None:
    """Per-channel scales stored [out] per expert become [E, 1, out], as quantizing at load makes them."""
    for weight in EXPERT_WEIGHTS:
        bits = method_bits(layer.quant_method)
        qw = load_prequantized(getattr(layer, weight), getattr(layer, f"{weight}_scale"), bits)
        _replace_with_buffers(layer, weight, qw, f"{weight}_scale")


def quantized_buffers(model: nn.Layer) -> dict[str, paddle.Tensor]:
    """Named int weights and scales of pre-quantized layers (the loader fills them like parameters)."""
    found = {}
    for name, layer in model.named_sublayers():
        if isinstance(layer, Linear) and layer.quant_method:
            found[f"{name}.weight"], found[f"{name}.weight_scale"] = layer.weight, layer.weight_scale
        elif isinstance(layer, GroupedExperts) and layer.quant_method:
            for weight in EXPERT_WEIGHTS:
                found[f"{name}.{weight}"] = getattr(layer, weight)
                found[f"{name}.{weight}_scale"] = getattr(layer, f"{weight}_scale")
    return found


def quantized_bytes(model: nn.Layer) -> int:
    """Bytes of the int weights and their scales held by quantized layers."""
    total = 0
    for layer in model.sublayers():
        if getattr(layer, "quant_method", ""):
            total += sum(tensor_nbytes(b) for b in layer.buffers(include_sublayers=False))
    return total


def resident_bytes(model: nn.Layer) -> int:
    """All parameters and buffers of the model (float and int)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor_nbytes(t) for t in tensors)
