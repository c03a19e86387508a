"""Rotary position embedding, interleaved (GPT-J) style as ERNIE-4.5 uses it.

Dimension pairs are adjacent: (x[2i], x[2i+1]) is rotated by position * theta^(-2i/d). The half-split
(NeoX) style would produce very different logits, which the reference tests catch.
"""

from __future__ import annotations

import paddle
from paddle import nn

from . import cpu_kernels


class RotaryEmbedding(nn.Layer):
    """cos/sin for a flat batch of positions; computed per call in float32 so any position is exact."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        exponents = paddle.arange(0, head_dim, 2, dtype="float32") / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistable=False)

    def forward(self, positions: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """positions [T] int -> (cos, sin), each [T, 1, head_dim / 2] float32 (broadcast over heads)."""
        angles = positions.astype("float32").unsqueeze(-1) * self.inv_freq
        angles = angles.unsqueeze(1)
        return paddle.cos(angles), paddle.sin(angles)


def apply_rotary(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """x [T, heads, head_dim] rotated pairwise; math in float32, result in x's dtype."""
    if cpu_kernels.fp32_supported(x, cos, sin):
        return cpu_kernels.rotary(x, cos, sin)
    pairs = x.astype("float32").reshape([*x.shape[:-1], -1, 2])
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = paddle.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal 3D rotary (Qwen2-VL's M-RoPE, as PaddleOCR-VL uses it): positions come per axis (t, h, w).

    The head_dim/2 frequencies are cut into `mrope_section` = [n_t, n_h, n_w] consecutive bands; band i takes
    its position from axis i. Text tokens carry the same position on all three axes, which makes this the
    plain 1D rotary for them. Returns the same (cos, sin) shapes as `RotaryEmbedding`, so `apply_rotary`
    and the attention layers are unchanged.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]) -> None:
        super().__init__(head_dim, theta)
        if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section}: need 3 bands summing to {head_dim // 2}")
        self.mrope_section = list(mrope_section)

    def forward(self, positions: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """positions [3, T] (t, h, w) or [T] (text only) int -> (cos, sin), each [T, 1, head_dim / 2]."""
        if positions.ndim == 1:
            return super().forward(positions)
        angles = positions.astype("float32").unsqueeze(-1) * self.inv_freq  # [3, T, head_dim/2]
        bands = paddle.split(angles, self.mrope_section, axis=-1)
        angles = paddle.concat([band[axis] for axis, band in enumerate(bands)], axis=-1).unsqueeze(1)
        return paddle.cos(angles), paddle.sin(angles)
