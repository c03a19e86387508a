"""Weight quantization primitives: per-channel / group-wise int8 and int4, int4 packing, W4A8 emulation."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from ...device import device_type
from ...distributed import parallel_state

logger = logging.getLogger(__name__)

QMAX = {8: 127.0, 4: 7.0}
MIN_SCALE = 1e-12  # an all-zero channel or head must not divide by zero


@dataclass
class QuantizedWeight:
    """Resident int weight of a Linear ([in, out]) or of stacked experts ([E, in, out])."""

    qweight: paddle.Tensor  # int8: [..., in, out], or [..., in/2, out] for two int4 per byte
    scale: paddle.Tensor  # fp32 [..., G, out]
    bits: int
    in_features: int
    device_layout: bool = False  # XPU: qweight/scale are weight_quantize's layout for weight_only_linear

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.qweight) + tensor_nbytes(self.scale)

    @property
    def num_groups(self) -> int:
        return self.scale.shape[-2]


def tensor_nbytes(t: paddle.Tensor) -> int:
    return int(t.numel()) * t.element_size()


def pack_int4(q: paddle.Tensor) -> paddle.Tensor:
    """int8 in [-8, 7], [..., in, out] (in even) -> [..., in/2, out]: even rows low nibble, odd rows high."""
    if q.shape[-2] % 2:
        raise ValueError(f"int4 packing needs an even input size, got {q.shape[-2]}")
    pairs = q.reshape(q.shape[:-2] + [q.shape[-2] // 2, 2, q.shape[-1]])
    low = paddle.bitwise_and(pairs[..., 0, :], paddle.full([1], 0x0F, dtype="int8"))
    high = paddle.bitwise_left_shift(pairs[..., 1, :], paddle.full([1], 4, dtype="int8"))
    return paddle.bitwise_or(low, high)


def unpack_int4(packed: paddle.Tensor) -> paddle.Tensor:
    """Inverse of `pack_int4`: arithmetic shifts sign-extend each nibble."""
    four = paddle.full([1], 4, dtype="int8")
    low = paddle.bitwise_right_shift(paddle.bitwise_left_shift(packed, four), four)
    high = paddle.bitwise_right_shift(packed, four)
    stacked = paddle.stack([low, high], axis=-2)  # [..., in/2, 2, out]
    return stacked.reshape(packed.shape[:-2] + [packed.shape[-2] * 2, packed.shape[-1]])


# The float32 just below 0.5: |x| + it rounds up exactly from halves (x = 0.49999997 stays below 1).
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


def round_half_away(x: paddle.Tensor) -> paddle.Tensor:
    """C `round` (halves away from zero), as Paddle's `weight_quantize` and FastDeploy round: `paddle.round`
    rounds halves to even (2.5 -> 2). Exact for every float32 (floor and copysign are fast on CPU)."""
    return paddle.copysign(paddle.floor(paddle.abs(x) + _BELOW_HALF), x)


def quantize_weight(
    weight: paddle.Tensor, bits: int, group_size: int = -1, sharded_input: bool = False
) -> QuantizedWeight:
    """Symmetric quantization along the input axis of [..., in, out]; error per element <= scale / 2.

    `sharded_input` (row-parallel layers under TP): `weight` holds this rank's slice of the input rows. Its
    scales must be the single device's, or TP=N computes a different model than TP=1: groups are kept only
    when they lie whole inside every rank's slice, per-channel absmaxes are reduced over the ranks.
    """
    w = weight.astype("float32")
    in_features, out_features = w.shape[-2], w.shape[-1]
    groups = _num_groups(in_features, group_size, sharded_input)
    lead = w.shape[:-2]
    grouped = w.reshape(lead + [groups, in_features // groups, out_features])
    qmax = QMAX[bits]
    absmax = grouped.abs().max(axis=-2, keepdim=True)  # [..., G, 1, out]
    if sharded_input and groups == 1:
        absmax = parallel_state.all_reduce_max(absmax)
    check_finite(absmax, "weight")
    scale = paddle.clip(absmax / qmax, min=MIN_SCALE)
    q = paddle.clip(round_half_away(grouped / scale), -qmax, qmax).astype("int8")
    q = q.reshape(lead + [in_features, out_features])
    if bits == 4:
        q = pack_int4(q)
    return QuantizedWeight(q, scale.squeeze(-2), bits, in_features)


def check_finite(t: paddle.Tensor, what: str) -> None:
    """A NaN or inf would silently wipe its whole channel or head (scale NaN / inf, the other values 0)."""
    if not bool(paddle.isfinite(t).all()):
        raise ValueError(f"{what} holds NaN or inf values")


def _num_groups(in_features: int, group_size: int, sharded_input: bool) -> int:
    """Scale groups along this weight's (local) input rows: 1 means per channel."""
    if group_size <= 0:
        return 1
    full = in_features * (parallel_state.world_size() if sharded_input else 1)
    if full % group_size:
        logger.debug("input size %d not a multiple of group %d: per-channel scales", full, group_size)
        return 1
    if in_features % group_size:  # a group would straddle two ranks: no slice matches the single device's
        _warn_straddled_groups(in_features, full, group_size)
        return 1
    return in_features // group_size


@functools.cache
def _warn_straddled_groups(in_features: int, full: int, group_size: int) -> None:
    """Once per shape: a MoE model would otherwise repeat it for every expert of every layer."""
    logger.warning("input rows %d per rank (of %d) split groups of %d: per-channel scales, so this TP size "
                   "quantizes differently from one device", in_features, full, group_size)


def unpack_weight_int(qw: QuantizedWeight) -> paddle.Tensor:
    """The int8-valued weight [..., in, out]."""
    return unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight


def dequantize_weight(qw: QuantizedWeight) -> paddle.Tensor:
    """fp32 [..., in, out]: a transient buffer on CPU, the resident weight stays int."""
    q = unpack_weight_int(qw).astype("float32")
    lead, groups = q.shape[:-2], qw.num_groups
    grouped = q.reshape(lead + [groups, qw.in_features // groups, q.shape[-1]])
    return (grouped * qw.scale.unsqueeze(-2)).reshape(q.shape)


def load_prequantized(weight: paddle.Tensor, scale: paddle.Tensor, bits: int) -> QuantizedWeight:
    """Wrap a checkpoint's `<name>.weight` (int8, packed for 4 bits) and `<name>.weight_scale`."""
    in_features = weight.shape[-2] * (2 if bits == 4 else 1)
    scale = scale.astype("float32")
    check_finite(scale, "weight_scale")
    if scale.ndim == weight.ndim - 1:  # [..., out]: per channel
        scale = scale.unsqueeze(-2)
    if in_features % scale.shape[-2]:
        raise ValueError(f"weight_scale groups {scale.shape[-2]} do not divide input size {in_features}")
    return QuantizedWeight(weight.astype("int8"), scale, bits, in_features)


def is_xpu() -> bool:
    return device_type(paddle.get_device()) == "xpu"


def to_device_layout(qw: QuantizedWeight, method: str, group_size: int) -> QuantizedWeight:
    """XPU: re-quantize through Paddle's own packing so `weight_only_linear` can run it (2-D weights only)."""
    if method == "w4a8" or qw.qweight.ndim != 2 or not is_xpu():
        return qw
    dense = dequantize_weight(qw).astype(paddle.get_default_dtype())
    algo = "weight_only_int8" if qw.bits == 8 else "weight_only_int4"
    group = group_size if qw.num_groups > 1 else -1
    qweight, scale = paddle.nn.quant.weight_quantize(dense, algo=algo, group_size=group)
    return QuantizedWeight(qweight, scale, qw.bits, qw.in_features, device_layout=True)


def quantize_activation(
    x: paddle.Tensor, sharded_input: bool = False
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Dynamic per-token int8: integer-valued fp32 [T, in] and scale [T, 1] (row absmax / 127).

    `sharded_input` (row-parallel layers): `x` is this rank's slice of each row; the absmax is taken over the
    whole row (all-reduce max), so every rank quantizes exactly as a single device would.
    """
    absmax = x.abs().max(axis=-1, keepdim=True)
    if sharded_input:
        absmax = parallel_state.all_reduce_max(absmax)
    scale = paddle.clip(absmax / QMAX[8], min=MIN_SCALE)
    return paddle.clip(round_half_away(x / scale), -QMAX[8], QMAX[8]), scale


def w4a8_matmul(x: paddle.Tensor, qw: QuantizedWeight, sharded_input: bool = False) -> paddle.Tensor:
    """int8 activations x int4 weights (per-channel scales), integer-exact accumulation in fp32."""
    if qw.num_groups != 1:
        raise ValueError("w4a8 needs per-channel weight scales (group-wise partial sums are not integers)")
    xq, x_scale = quantize_activation(x.astype("float32"), sharded_input)
    acc = paddle.matmul(xq, unpack_weight_int(qw).astype("float32"))
    return (acc * x_scale * qw.scale.reshape([1, -1])).astype(x.dtype)  # bf16 in, bf16 out as the others


def quantized_matmul(
    x: paddle.Tensor, qw: QuantizedWeight, method: str, sharded_input: bool = False
) -> paddle.Tensor:
    """x [..., in] @ W [in, out] for one quantized Linear (no bias)."""
    lead = x.shape[:-1]
    flat = x.reshape([-1, x.shape[-1]])
    if method == "w4a8":
        out = w4a8_matmul(flat, qw, sharded_input)
    elif qw.device_layout:
        dtype = "int8" if qw.bits == 8 else "int4"
        out = paddle.nn.quant.weight_only_linear(flat, qw.qweight, weight_scale=qw.scale, weight_dtype=dtype)
    else:
        out = paddle.matmul(flat.astype("float32"), dequantize_weight(qw)).astype(x.dtype)
    return out.reshape(lead + [out.shape[-1]])


def method_bits(method: str) -> int:
    return 8 if method == "wint8" else 4


def quantize_for_method(
    weight: paddle.Tensor, method: str, group_size: int, sharded_input: bool = False
) -> QuantizedWeight:
    """wint8 and w4a8 are per channel; wint4 is group-wise when the input size allows."""
    bits = method_bits(method)
    group = group_size if method == "wint4" else -1
    return quantize_weight(weight, bits, group, sharded_input)


# ---- layer hooks: Linear.forward and GroupedExperts.expert_matmul call these once quantized ----


def linear_weight(layer: nn.Layer) -> QuantizedWeight:
    bits = method_bits(layer.quant_method)
    return QuantizedWeight(
        layer.weight, layer.weight_scale, bits, layer.in_features, layer.quant_device_layout
    )


def quantized_linear(layer: nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
    """Linear.forward for a quantized layer."""
    out = quantized_matmul(x, linear_weight(layer), layer.quant_method, layer.input_sharded)
    return out if layer.bias is None else out + layer.bias


def expert_weight(layer: nn.Layer, name: str, expert: int) -> QuantizedWeight:
    qweight, scale = getattr(layer, name)[expert], getattr(layer, f"{name}_scale")[expert]
    bits = method_bits(layer.quant_method)
    in_features = qweight.shape[0] * (2 if bits == 4 else 1)
    return QuantizedWeight(qweight, scale, bits, in_features)


def quantized_expert_matmul(layer: nn.Layer, name: str, expert: int, x: paddle.Tensor) -> paddle.Tensor:
    sharded = name == "down_proj" and layer.input_sharded
    return quantized_matmul(x, expert_weight(layer, name, expert), layer.quant_method, sharded)
