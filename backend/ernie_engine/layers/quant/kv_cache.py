"""C8: the int8 KV cache with per-head scales (static from the checkpoint, or dynamic per token)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import paddle
from safetensors import safe_open

from .weights import MIN_SCALE, QMAX, check_finite, round_half_away, tensor_nbytes


@dataclass
class Int8KVCache:
    """One layer's int8 KV cache with fp32 dequantization steps (per slot and head, or per head if static)."""

    keys: paddle.Tensor  # int8 [num_slots, kvh, D]
    values: paddle.Tensor
    key_scale: paddle.Tensor  # fp32 [num_slots, kvh, 1] dynamic, or [1, kvh, 1] static
    value_scale: paddle.Tensor
    static: bool

    @classmethod
    def allocate(
        cls,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        static_scales: tuple[paddle.Tensor, paddle.Tensor] | None = None,
    ) -> Int8KVCache:
        shape = [num_slots, num_kv_heads, head_dim]
        keys, values = paddle.zeros(shape, dtype="int8"), paddle.zeros(shape, dtype="int8")
        if static_scales is None:
            return cls(
                keys,
                values,
                paddle.ones([num_slots, num_kv_heads, 1]),
                paddle.ones([num_slots, num_kv_heads, 1]),
                static=False,
            )
        k_scale, v_scale = (static_step(s, num_kv_heads) for s in static_scales)
        return cls(keys, values, k_scale, v_scale, static=True)

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in (self.keys, self.values, self.key_scale, self.value_scale))

    def write(self, slot_mapping: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> None:
        """Quantize the new tokens' k/v [T, kvh, D] into their slots."""
        for cache, scales, x in ((self.keys, self.key_scale, k), (self.values, self.value_scale, v)):
            x = x.astype("float32")
            if self.static:
                step = scales
            else:
                step = paddle.clip(x.abs().max(axis=-1, keepdim=True) / QMAX[8], min=MIN_SCALE)
                scales.index_put_((slot_mapping,), step)
            q = paddle.clip(round_half_away(x / step), -QMAX[8], QMAX[8]).astype("int8")
            cache.index_put_((slot_mapping,), q)

    def gather(self, index: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Dequantized fp32 keys and values at `index` (slots), transient."""
        out = []
        for cache, scales in ((self.keys, self.key_scale), (self.values, self.value_scale)):
            step = scales if self.static else paddle.gather(scales, index)
            out.append(paddle.gather(cache, index).astype("float32") * step)
        return out[0], out[1]


def static_step(absmax: paddle.Tensor, num_kv_heads: int) -> paddle.Tensor:
    """Checkpoint per-head absmax [kvh] (or a scalar) -> dequantization step [1, kvh, 1]."""
    absmax = absmax.astype("float32").reshape([-1])
    check_finite(absmax, "C8 scale")  # an inf step dequantizes to NaN (0 * inf)
    if absmax.shape[0] == 1:
        absmax = absmax.expand([num_kv_heads])
    if absmax.shape[0] != num_kv_heads:
        raise ValueError(f"C8 scale has {absmax.shape[0]} entries, expected one per KV head ({num_kv_heads})")
    return paddle.clip(absmax / QMAX[8], min=MIN_SCALE).reshape([1, num_kv_heads, 1])


def kv_cache_bytes_per_token(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str | paddle.dtype = "float32",
    int8: bool = False,
    static_scales: bool = False,
) -> int:
    """Bytes one token occupies across all layers' K and V caches (dynamic C8 includes its fp32 scales)."""
    if int8:
        per_head = head_dim + (0 if static_scales else 4)
    else:
        per_head = head_dim * paddle.zeros([1], dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * per_head


# FastDeploy's names for the per-head absmax of the cached keys/values, and the short alias we accept.
_STATIC_SCALE = re.compile(
    r"^ernie\.layers\.(?P<layer>\d+)\.self_attn\."
    r"(?:cache(?P<a>[kv])_matmul\.activation_scale|cache_(?P<b>[kv])_scale)$"
)


def read_static_kv_scales(
    model_dir: str | Path, num_layers: int
) -> list[tuple[paddle.Tensor, paddle.Tensor]] | None:
    """Per-layer (key absmax, value absmax) [kvh] from a C8 checkpoint; None when it has none."""
    found: dict[tuple[int, str], paddle.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="paddle", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                match = _STATIC_SCALE.match(name)
                if match:
                    key = (int(match["layer"]), match["a"] or match["b"])
                    found[key] = handle.get_tensor(name).astype("float32")
    if not found:
        return None
    missing = [f"layer {i} {kv}" for i in range(num_layers) for kv in "kv" if (i, kv) not in found]
    if missing:
        raise ValueError(f"C8 checkpoint lacks static KV scales for: {', '.join(missing[:8])}")
    return [(found[(i, "k")], found[(i, "v")]) for i in range(num_layers)]
