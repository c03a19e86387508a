"""Shared pieces of NaViT-style vision encoders: images of any size, packed into one flat sequence.

A batch of images arrives as one array of patches `[N, C, p, p]` (N = sum of t * h * w over images) plus each
image's patch grid `grid_thw`. Nothing is padded: attention is block-diagonal over the pack (one block per
frame, delimited by `cu_seqlens`), positions are 2D (row, column) per patch, and a learned square table of
position embeddings is resampled bilinearly to each image's grid.

Used by PaddleOCR-VL's SigLIP encoder and ERNIE-4.5-VL's DFN-RoPE encoder (which stores q/k/v as one
projection, `FusedQKVVisionAttention`, and uses quick-GELU MLPs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..device import device_type
from .linear import ZEROS, Linear


def frame_seqlens(grid_thw: np.ndarray) -> list[int]:
    """Patches per attention block: each frame (t) of each image attends within itself."""
    return [int(h * w) for t, h, w in np.asarray(grid_thw).tolist() for _ in range(int(t))]


# Patches one vision pass (encoder and projector) takes. The encoder's activations hold ~20 floats of hidden
# width per patch at once: a 30-frame video at the seed's limits (143k patches, hidden 1280) took ~14 GB on
# CPU in one pass.
MAX_VISION_PATCHES = 8192


def frame_groups(grid_thw: np.ndarray, unit: int = 1) -> list[np.ndarray]:
    """The pack as consecutive groups of at most MAX_VISION_PATCHES patches (a larger piece alone): each item
    split into pieces of `unit` frames (grid (unit, h, w)), a still image (t = 1) whole."""
    groups: list[list[tuple[int, int, int]]] = [[]]
    size = 0
    for t, h, w in np.asarray(grid_thw).tolist():
        frames = 1 if t == 1 else unit
        for _ in range(int(t) // frames):
            if groups[-1] and size + frames * h * w > MAX_VISION_PATCHES:
                groups.append([])
                size = 0
            groups[-1].append((frames, h, w))
            size += frames * h * w
    return [np.asarray(group, dtype=np.int64).reshape(-1, 3) for group in groups]


def encode_frame_groups(
    encode: Callable[[paddle.Tensor, np.ndarray], paddle.Tensor],
    pixels: paddle.Tensor,
    grid_thw: np.ndarray,
    unit: int = 1,
) -> paddle.Tensor:
    """`encode(patches, grids)` over the pack one `frame_groups` group at a time, outputs in pack order. The
    encoders attend within a frame and place positions per frame, and the projectors merge within `unit`
    frames, so this equals one pass, in less memory."""
    outputs, start = [], 0
    for grids in frame_groups(grid_thw, unit):
        count = int(grids.prod(axis=1).sum())
        outputs.append(encode(pixels[start : start + count], grids))
        start += count
    return outputs[0] if len(outputs) == 1 else paddle.concat(outputs)


def cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """Cumulative block boundaries `[num_frames + 1]` int32, as varlen attention kernels take them."""
    return np.concatenate([[0], np.cumsum(frame_seqlens(grid_thw))]).astype(np.int32)


def vision_position_ids(grid_thw: np.ndarray, merge_size: int = 1) -> np.ndarray:
    """(row, column) of every patch, `[N, 2]` int64, repeated per frame.

    `merge_size` 1 is raster order; a larger value orders patches block by block (merge_size x merge_size
    blocks in raster order), for encoders whose patch sequence is already grouped for the spatial merge.
    """
    positions = []
    for t, h, w in np.asarray(grid_thw).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        positions.append(np.tile(np.stack([rows, cols], axis=-1), (int(t), 1)))
    return np.concatenate(positions, axis=0).astype(np.int64)


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps and weights per target index: half-pixel centres (align_corners=False), edges clamped."""
    src = (index.astype(np.float32) + 0.5) * side / size.astype(np.float32) - 0.5
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
    return taps, weights.astype(np.float32)


def bilinear_position_taps(grid_thw: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices `[N, 4]` into a flattened `side x side` table and their weights `[N, 4]`, such that the
    weighted sum equals `F.interpolate(table, (h, w), mode="bilinear", align_corners=False)` at each patch."""
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in np.asarray(grid_thw).tolist():
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        rows.append(np.tile(r.reshape(-1), int(t)))
        cols.append(np.tile(c.reshape(-1), int(t)))
        heights.append(np.full(int(t * h * w), h))
        widths.append(np.full(int(t * h * w), w))
    h_taps, h_weights = _bilinear_taps(np.concatenate(rows), np.concatenate(heights), side)
    w_taps, w_weights = _bilinear_taps(np.concatenate(cols), np.concatenate(widths), side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


class PatchEmbedding(nn.Layer):
    """Conv2d with kernel = stride = patch over pre-cut patches, i.e. one matmul per patch.

    The weight keeps the conv layout `[embed_dim, channels, p, p]` in which checkpoints store it.
    """

    def __init__(self, in_channels: int, patch_size: int, embed_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        shape = [embed_dim, in_channels, patch_size, patch_size]
        self.weight = self.create_parameter(shape, default_initializer=ZEROS)
        self.bias = (
            self.create_parameter([embed_dim], is_bias=True, default_initializer=ZEROS) if bias else None
        )

    def forward(self, patches: paddle.Tensor) -> paddle.Tensor:
        """[N, C, p, p] -> [N, embed_dim]."""
        flat = patches.reshape([patches.shape[0], -1]).astype(self.weight.dtype)
        out = paddle.matmul(flat, self.weight.reshape([self.embed_dim, -1]), transpose_y=True)
        return out + self.bias if self.bias is not None else out


class VisionRotaryEmbedding(nn.Layer):
    """Axial 2D rotary: the same head_dim/4 frequencies for rows and for columns.

    The half-split (NeoX) layout: the first head_dim/2 angles are [rows' | columns'], repeated for the
    second half, so every dimension of the head is rotated.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D rotary needs head_dim divisible by 4, got {head_dim}")
        spatial_dim = head_dim // 2
        exponents = paddle.arange(0, spatial_dim, 2, dtype="float32") / spatial_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistable=False)

    def forward(self, position_ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """position_ids [N, 2] (row, column) -> (cos, sin), each [N, 1, head_dim] float32."""
        angles = position_ids.astype("float32").unsqueeze(-1) * self.inv_freq  # [N, 2, head_dim/4]
        angles = angles.reshape([angles.shape[0], -1])  # [rows' | columns']
        angles = paddle.concat([angles, angles], axis=-1).unsqueeze(1)
        return paddle.cos(angles), paddle.sin(angles)


def rotate_half(x: paddle.Tensor) -> paddle.Tensor:
    first, second = paddle.chunk(x, 2, axis=-1)
    return paddle.concat([-second, first], axis=-1)


def apply_rotary_half(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Half-split (NeoX) rotary with full-width cos/sin [..., head_dim]; math in float32."""
    x32 = x.astype("float32")
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


# Attention scores (queries x keys x heads) one call may hold on CPU, whose kernel materialises them, twice:
# a 1536 x 1536 px image (12k patches, 16 heads) in one call would need ~18 GB. 64 MB of fp32 per call.
MAX_SCORE_ELEMENTS = 1 << 24


def packed_attention(
    q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, seqlens: list[int], scale: float
) -> paddle.Tensor:
    """Bidirectional attention within each block of a packed sequence: q/k/v [N, H, D] -> [N, H, D].

    Block by block; on CPU each block's queries in chunks of at most MAX_SCORE_ELEMENTS scores (a query's
    softmax spans all keys of its block, so chunking changes nothing). XPU's attention kernel needs no chunks
    (a varlen flash kernel taking `cu_seqlens` would do all blocks in one call).
    """
    on_cpu = device_type(paddle.get_device()) == "cpu"
    blocks = zip(paddle.split(q, seqlens), paddle.split(k, seqlens), paddle.split(v, seqlens), strict=True)
    outputs = []
    for q_i, k_i, v_i in blocks:
        step = max(1, MAX_SCORE_ELEMENTS // (k_i.shape[0] * k_i.shape[1])) if on_cpu else q_i.shape[0]
        for start in range(0, q_i.shape[0], step):
            queries = q_i[start : start + step][None]
            outputs.append(F.scaled_dot_product_attention(queries, k_i[None], v_i[None], scale=scale)[0])
    return outputs[0] if len(outputs) == 1 else paddle.concat(outputs, axis=0)


class VisionAttention(nn.Layer):
    """Multi-head self-attention over a packed image sequence, 2D rotary on queries and keys."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)

    def forward(
        self, x: paddle.Tensor, seqlens: list[int], rotary: tuple[paddle.Tensor, paddle.Tensor]
    ) -> paddle.Tensor:
        shape = [x.shape[0], self.num_heads, self.head_dim]
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        cos, sin = rotary
        q, k = apply_rotary_half(q, cos, sin), apply_rotary_half(k, cos, sin)
        out = packed_attention(q, k, v, seqlens, self.scale)
        return self.out_proj(out.reshape([x.shape[0], -1]))


class FusedQKVVisionAttention(VisionAttention):
    """`VisionAttention` with q, k, v in one projection `qkv` ([q | k | v] along the output) and the output
    projection named `proj`, as ERNIE-4.5-VL's checkpoints store them."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True) -> None:
        nn.Layer.__init__(self)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.proj = Linear(embed_dim, embed_dim, bias=bias)

    def forward(
        self, x: paddle.Tensor, seqlens: list[int], rotary: tuple[paddle.Tensor, paddle.Tensor]
    ) -> paddle.Tensor:
        q, k, v = paddle.split(self.qkv(x).reshape([x.shape[0], 3, self.num_heads, self.head_dim]), 3, axis=1)
        cos, sin = rotary
        q, k = apply_rotary_half(q.squeeze(1), cos, sin), apply_rotary_half(k.squeeze(1), cos, sin)
        out = packed_attention(q, k, v.squeeze(1), seqlens, self.scale)
        return self.proj(out.reshape([x.shape[0], -1]))


def quick_gelu(x: paddle.Tensor) -> paddle.Tensor:
    """x * sigmoid(1.702 x): CLIP's GELU approximation (ERNIE-4.5-VL's vision MLPs)."""
    return x * F.sigmoid(1.702 * x)


class VisionMLP(nn.Layer):
    """fc1 -> GELU (tanh approximation, as SigLIP; or quick-GELU, as ERNIE-4.5-VL) -> fc2."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        approximate_gelu: bool = True,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"vision activation {activation!r} is not supported (gelu, quick_gelu)")
        self.approximate_gelu = approximate_gelu
        self.activation = activation
        self.fc1 = Linear(hidden_size, intermediate_size, bias=True)
        self.fc2 = Linear(intermediate_size, hidden_size, bias=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.fc1(x)
        h = quick_gelu(h) if self.activation == "quick_gelu" else F.gelu(h, approximate=self.approximate_gelu)
        return self.fc2(h)
