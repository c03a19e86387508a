"""CPU custom operators (csrc/, layers/cpu_kernels.py): each op against a float64 numpy reference or the
Paddle path, on every ISA path (AVX512-BF16, AVX512 without it, scalar), plus the fallback when the kernels
are off."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from ernie_engine.device import cpu_weight_dtype
from ernie_engine.layers import cpu_kernels
from ernie_engine.layers.attention import (
    AttentionMetadata,
    KVCache,
    fused_qkv_attention,
    paged_attention,
    qkv_attention_fused,
)
from ernie_engine.layers.linear import Linear
from ernie_engine.layers.norm import RMSNorm
from ernie_engine.layers.quant.apply import quantize_linear
from ernie_engine.layers.quant.kv_cache import Int8KVCache
from ernie_engine.layers.quant.weights import dequantize_weight, linear_weight, quantized_linear
from ernie_engine.layers.rotary import RotaryEmbedding, apply_rotary
from ernie_engine.loader import load_model

from tests.reference_utils import allocate_kv_caches, flat_positions, make_tiny_checkpoint, run_flat
from tests.test_model_reference import CONFIGS

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="cpu kernels unavailable on this machine")

RNG = np.random.default_rng(13)
SHAPES = [(1, 64, 48), (3, 37, 21), (17, 100, 53), (16, 1024, 96)]  # (M, K, N): odd sizes and a real K
REL_TOL = 2e-6  # fp32 accumulation against a float64 reference on the same weight values
BF16_ROUNDING_TOL = 2e-2  # bf16 kernels (x rounded to bf16) against fp32 activations, end to end


@pytest.fixture(params=["native", "avx512", "scalar"])
def isa(request, monkeypatch) -> str:
    """The best path this CPU has, AVX512 without AVX512-BF16, and the scalar path."""
    monkeypatch.setenv("ERNIE_CPU_KERNELS_ISA", request.param)
    return request.param


@pytest.fixture
def kernels_off():
    cpu_kernels.set_enabled(False)
    yield
    cpu_kernels.set_enabled(True)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> nearest bf16 (ties to even), as fp32: the bf16 kernels' activation rounding."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def bf16_reference(x: np.ndarray, w_bf16: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float64 matmul with the kernels' activations (rounded to bf16) and the bf16 weight values."""
    return round_to_bf16(x).astype(np.float64) @ w_bf16.astype(np.float64).T + bias


def test_a_source_change_rebuilds_the_library_from_scratch(tmp_path, monkeypatch):
    """Paddle's build compares only the .cc files' times with the library's, so after a header-only change it
    would keep the old library: a stamp from other sources clears the previous build before compiling."""
    from paddle.utils import cpp_extension

    monkeypatch.setattr(cpu_kernels, "BUILD_DIR", tmp_path)
    old_library = tmp_path / cpu_kernels.NAME / f"{cpu_kernels.NAME}.so"
    old_library.parent.mkdir()
    old_library.write_bytes(b"built from other sources")
    (tmp_path / "sources.sha256").write_text("other sources")
    compiled_with_old_library: list[bool] = []

    def compile_sources(**kwargs):
        compiled_with_old_library.append(old_library.exists())
        return "the compiled module"

    monkeypatch.setattr(cpp_extension, "load", compile_sources)
    assert cpu_kernels.build() == "the compiled module"
    assert compiled_with_old_library == [False]
    assert (tmp_path / "sources.sha256").read_text() == cpu_kernels._source_hash()


def test_round_to_bf16_matches_paddle():
    x = RNG.standard_normal(4096).astype(np.float32) * 10.0 ** RNG.integers(-20, 20, 4096)
    expected = paddle.to_tensor(x).astype("bfloat16").astype("float32").numpy()
    np.testing.assert_array_equal(round_to_bf16(x), expected)


@pytest.mark.parametrize("m", [1, 7, 20])
def test_activations_are_rounded_to_bf16_bit_for_bit(isa, m):
    """x times an identity weight is x rounded to bf16 exactly - ties to even, magnitudes from 1e-30 to 1e30,
    an odd K - on every ISA and tile shape (the vector and scalar roundings are the same)."""
    k = 37
    x = (RNG.standard_normal((m, k)) * 10.0 ** RNG.integers(-30, 30, (m, k))).astype(np.float32)
    bits = x.view(np.uint32)
    bits[:, ::3] = (bits[:, ::3] & 0xFFFF0000) | 0x8000  # exact ties: both neighbours (even and odd) occur
    identity = cpu_kernels.pack_weight(paddle.eye(k).astype("bfloat16"), 16)
    ours = cpu_kernels.linear_packed(paddle.to_tensor(x), identity, k, 16).numpy()
    np.testing.assert_array_equal(ours, round_to_bf16(x))


@pytest.mark.parametrize(("m", "k", "n"), SHAPES + [(2, 64, 48), (5, 62, 7), (32, 1024, 13), (45, 66, 40)])
def test_linear_bf16_matches_the_bf16_reference(isa, m, k, n):
    """Activations rounded to bf16 (the same on every ISA), then exact products summed in fp32."""
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = paddle.to_tensor(RNG.standard_normal((n, k)).astype(np.float32)).astype("bfloat16")
    bias = RNG.standard_normal(n).astype(np.float32)
    packed = cpu_kernels.pack_weight(w, 16)
    assert packed.shape == [-(-n // 16), -(-k // 2), 32]
    assert np.array_equal(cpu_kernels.unpack_weight(packed, n, k, 16).numpy(), w.numpy())
    ours = cpu_kernels.linear_packed(paddle.to_tensor(x), packed, n, 16, bias=paddle.to_tensor(bias)).numpy()
    w32 = w.astype("float32").numpy()
    assert ours.shape == (m, n)
    assert rel_err(ours, bf16_reference(x, w32, bias)) < REL_TOL
    # Sanity bound against fp32 activations: the only difference is x's rounding (2^-9 relative).
    fp32_ref = x.astype(np.float64) @ w32.astype(np.float64).T + bias
    assert rel_err(ours, fp32_ref) < BF16_ROUNDING_TOL


def quantized_kernel_run(
    method: str, group: int, m: int, k: int, n: int
) -> tuple[Linear, np.ndarray, np.ndarray]:
    """A random Linear quantized by layers/quant and packed for the kernel, run on random x [m, k]; checks the
    result against the dequantized weight's values times bf16-rounded activations. Returns (layer, x, y)."""
    layer = Linear(k, n, bias=True)
    layer.weight.set_value(paddle.randn([k, n]))
    layer.bias.set_value(paddle.randn([n]))
    quantize_linear(layer, method, group)
    dense = dequantize_weight(linear_weight(layer)).numpy().astype(np.float64)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    ref = round_to_bf16(x).astype(np.float64) @ dense + layer.bias.numpy()
    assert cpu_kernels.prepare_linear(layer, bf16_weights=False)
    ours = layer(paddle.to_tensor(x)).numpy()
    assert rel_err(ours, ref) < REL_TOL
    return layer, x, ours


@pytest.mark.parametrize(("method", "group"), [("wint8", -1), ("wint4", -1), ("wint4", 64), ("wint4", 128)])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 256, 48), (3, 128, 21), (17, 384, 53), (200, 384, 53)])
def test_quantized_linear_matches_exact_dequant(isa, method, group, m, k, n):
    """Layers quantized by layers/quant, packed for the kernel: its dequantized weight's values times
    bf16-rounded activations, each row bit-equal to the same row run alone."""
    layer, x, ours = quantized_kernel_run(method, group, m, k, n)
    np.testing.assert_array_equal(ours[-1:], layer(paddle.to_tensor(x[-1:])).numpy())


@pytest.mark.parametrize(("method", "group"), [("wint8", -1), ("wint4", 128)])
@pytest.mark.parametrize(("m", "k"), [(7, 256), (16, 1024), (37, 4224)])
def test_quantized_linear_rows_are_batch_invariant(isa, method, group, m, k):
    """Tall tiles (csrc/linear.cc): 7 or 16 rows against one block at a time, or 16 + 16 + 5 rows reusing it;
    N = 100 leaves a partial block. Every row is bit-equal to the same row run alone and matches the exact
    dequantized reference."""
    layer, x, ours = quantized_kernel_run(method, group, m, k, n=100)
    alone = np.concatenate([layer(paddle.to_tensor(x[i : i + 1])).numpy() for i in range(m)])
    np.testing.assert_array_equal(ours, alone)


@pytest.mark.parametrize("m", [1, 6, 7, 200])
def test_bf16_linear_layer_rows_are_batch_invariant(isa, m):
    """A repacked layer matches the bf16 reference, and each row is bit-equal to the same row run alone
    (every tile shape sums an output's pairs in the same order)."""
    layer = Linear(100, 37, bias=True)
    layer.weight.set_value(paddle.randn([100, 37]))
    layer.bias.set_value(paddle.randn([37]))
    dense = layer.weight.astype("bfloat16").astype("float32").numpy().astype(np.float64)
    assert cpu_kernels.prepare_linear(layer, bf16_weights=True)
    assert layer.kernel_dims == {"weight": (37, 100)}
    x = RNG.standard_normal((m, 100)).astype(np.float32)
    ours = layer(paddle.to_tensor(x)).numpy()
    ref = round_to_bf16(x).astype(np.float64) @ dense + layer.bias.numpy()
    assert rel_err(ours, ref) < REL_TOL
    alone = np.concatenate([layer(paddle.to_tensor(x[i : i + 1])).numpy() for i in range(m)])
    np.testing.assert_array_equal(ours, alone)


def test_w4a8_matches_the_paddle_emulation():
    layer = Linear(256, 40)
    layer.weight.set_value(paddle.randn([256, 40]))
    quantize_linear(layer, "w4a8", -1)
    x = paddle.randn([5, 256])
    expected = quantized_linear(layer, x).numpy()
    assert cpu_kernels.prepare_linear(layer, bf16_weights=False)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_state_dict_keeps_the_checkpoint_layout():
    model = paddle.nn.Sequential(Linear(32, 24), Linear(24, 16))
    model[0].weight.set_value(paddle.randn([32, 24]))
    quantize_linear(model[1], "wint4", 16 * 2)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    cpu_kernels.prepare_model(model, bf16_weights=True)
    assert model[0].cpu_kernel == "bf16" and model[0].weight.dtype == paddle.bfloat16
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    bf16_values = paddle.to_tensor(before["0.weight"]).astype("bfloat16").astype("float32").numpy()
    np.testing.assert_array_equal(after["0.weight"], bf16_values)
    for key in ("1.weight", "1.weight_scale"):
        np.testing.assert_array_equal(after[key], before[key])


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (37, 2 * 100), (3, 5, 2 * 24)])
def test_elementwise_ops_match_paddle(isa, shape):
    """RMSNorm, SwiGLU and rotary against their plain Paddle forms (layers/norm, F.swiglu, layers/rotary)."""
    x = paddle.randn(shape) * 4
    np.testing.assert_allclose(cpu_kernels.swiglu(x).numpy(), F.swiglu(x).numpy(), rtol=2e-6, atol=2e-6)
    weight = paddle.randn(shape[-1:])
    expected = weight * x * paddle.rsqrt(x.pow(2).mean(axis=-1, keepdim=True) + 1e-5)
    ours = cpu_kernels.rms_norm(x, weight, 1e-5).numpy()
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-5)
    heads = x.reshape([-1, 2, shape[-1] // 2])
    cos, sin = RotaryEmbedding(shape[-1] // 2, 500000.0)(paddle.arange(heads.shape[0]) * 37)
    pairs = heads.reshape([*heads.shape[:-1], -1, 2])
    even, odd = pairs[..., 0], pairs[..., 1]
    expected = paddle.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(heads.shape)
    ours = cpu_kernels.rotary(heads, cos, sin).numpy()
    np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1024), (37, 100), (3, 5, 48)])
def test_add_rms_norm_is_the_add_then_the_norm(isa, shape):
    """The fused residual add + RMSNorm: bit-equal to x + residual and the RMSNorm kernel on it; RMSNorm's
    Paddle path (kernels off) computes the same pair."""
    x, residual, weight = paddle.randn(shape) * 4, paddle.randn(shape), paddle.randn(shape[-1:])
    normed, total = cpu_kernels.add_rms_norm(x, residual, weight, 1e-5)
    np.testing.assert_array_equal(total.numpy(), (x + residual).numpy())
    np.testing.assert_array_equal(normed.numpy(), cpu_kernels.rms_norm(x + residual, weight, 1e-5).numpy())
    norm = RMSNorm(shape[-1], 1e-5)
    norm.weight.set_value(weight)
    layer_normed, layer_total = norm(x, residual)
    np.testing.assert_array_equal(layer_normed.numpy(), normed.numpy())
    np.testing.assert_array_equal(layer_total.numpy(), total.numpy())
    cpu_kernels.set_enabled(False)
    try:
        paddle_normed, paddle_total = norm(x, residual)
    finally:
        cpu_kernels.set_enabled(True)
    np.testing.assert_array_equal(paddle_total.numpy(), total.numpy())
    np.testing.assert_allclose(paddle_normed.numpy(), normed.numpy(), rtol=1e-5, atol=1e-5)


def test_fp32_supported_takes_cpu_fp32_tensors_only():
    """dtypes compare by identity: fp32 tensors from any op pass."""
    x = paddle.randn([2, 8])
    made = [cpu_kernels.rms_norm(x, paddle.ones([8]), 1e-5), x.astype("bfloat16").astype("float32"), x[:, :4]]
    assert cpu_kernels.fp32_supported(x, *made)
    assert not cpu_kernels.fp32_supported(x, x.astype("bfloat16"))
    assert not cpu_kernels.fp32_supported(x.astype("float64"))


def _mixed_batch(block_size: int, num_heads: int, num_kv_heads: int, head_dim: int, cache_dtype="float32"):
    """Prefill chunks (some with cached context, some longer than the kernel's blocks of query tokens) and
    decodes, in scattered blocks of one cache (fp32 or bf16)."""
    query_lens, context_lens = [7, 1, 5, 1, 1, 70, 37], [7, 9, 12, 1, 33, 70, 90]
    blocks_needed = [-(-c // block_size) for c in context_lens]
    order = RNG.permutation(sum(blocks_needed) + 3)
    tables, start = [], 0
    for count in blocks_needed:
        tables.append(order[start : start + count].tolist())
        start += count
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size)
    slots = (sum(blocks_needed) + 3) * block_size
    caches = [paddle.randn([slots, num_kv_heads, head_dim]).astype(cache_dtype) for _ in range(2)]
    tokens = sum(query_lens)
    q = paddle.randn([tokens, num_heads, head_dim])
    k, v = paddle.randn([tokens, num_kv_heads, head_dim]), paddle.randn([tokens, num_kv_heads, head_dim])
    return q, k, v, meta, caches


# GQA groups 8, 4, 2, 1, 3 and 16 (a token's heads fill two vectors of rows); head_dim 40 is not a whole
# number of vectors (the scalar path on any ISA).
ATTENTION_HEADS = [(16, 2, 128), (8, 2, 64), (8, 4, 64), (8, 8, 32), (4, 4, 40), (6, 2, 16), (16, 1, 32)]


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), ATTENTION_HEADS)
def test_paged_attention_matches_the_paddle_path(isa, block_size, heads, kv_heads, head_dim, cache_dtype):
    """Against gather + SDPA (kernels off). Paddle has no bf16 scatter on CPU: its side of a bf16 cache is an
    fp32 one given the new keys/values rounded as Paddle's cast rounds them."""
    q, k, v, meta, caches = _mixed_batch(block_size, heads, kv_heads, head_dim, cache_dtype)
    paddle_caches = [c.astype("float32") for c in caches]
    cpu_kernels.set_enabled(False)
    try:
        k_in, v_in = (_rounded(t, cache_dtype) for t in (k, v))
        expected = paged_attention(q, k_in, v_in, meta, tuple(paddle_caches), head_dim**-0.5).numpy()
    finally:
        cpu_kernels.set_enabled(True)
    ours = paged_attention(q, k, v, meta, tuple(caches), head_dim**-0.5).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    for ours_cache, paddle_cache in zip(caches, paddle_caches, strict=True):  # the same cache writes
        np.testing.assert_array_equal(_bits(ours_cache), _bits(paddle_cache))


def _bits(t: paddle.Tensor) -> np.ndarray:
    """A tensor's values as numpy (bf16 as its fp32 widening, which is exact)."""
    return t.astype("float32").numpy()


def _rounded(t: paddle.Tensor, dtype: str) -> paddle.Tensor:
    """fp32 t holding what a cache of `dtype` stores of it."""
    return t.astype(dtype).astype("float32")


def test_paged_attention_reads_bf16_caches_exactly(isa):
    """A bf16 cache is widened exactly: the output equals, bit for bit, that of an fp32 cache holding the
    same (bf16-representable) values."""
    q, _, _, meta, caches = _mixed_batch(16, 16, 2, 128, "bfloat16")
    wide = [c.astype("float32") for c in caches]
    ours = cpu_kernels.paged_attention(q, *caches, meta, 128**-0.5).numpy()
    np.testing.assert_array_equal(ours, cpu_kernels.paged_attention(q, *wide, meta, 128**-0.5).numpy())


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "cache_dtype"),
                         [(*shape, "float32") for shape in ATTENTION_HEADS] + [(16, 2, 128, "bfloat16")])
def test_paged_attention_is_batch_invariant(isa, heads, kv_heads, head_dim, cache_dtype):
    """A token's attention output is the same bit for bit however it is computed: in one prefill of its whole
    prompt, in chunks of odd sizes after a cached prefix, or token by token as decode steps, whatever else is
    in the batch (other prefills, chunks, decodes)."""
    block_size, lens = 4, [45, 70, 23]  # two sequences under test and a companion
    blocks = [-(-n // block_size) for n in lens]
    order = RNG.permutation(sum(blocks)).tolist()
    tables = [order[sum(blocks[:b]) : sum(blocks[: b + 1])] for b in range(len(lens))]
    shape = [sum(blocks) * block_size, kv_heads, head_dim]
    caches = [paddle.randn(shape).astype(cache_dtype) for _ in range(2)]
    qs = [paddle.randn([n, heads, head_dim]) for n in lens]

    def step(parts: list[tuple[int, int, int]]) -> dict[int, np.ndarray]:
        """One call over (sequence, first, end): its query tokens first..end-1, context end -> outputs."""
        meta = AttentionMetadata.build(
            [end - first for _, first, end in parts],
            [end for _, _, end in parts],
            [tables[b] for b, _, _ in parts],
            block_size,
        )
        q = paddle.concat([qs[b][first:end] for b, first, end in parts])
        out = cpu_kernels.paged_attention(q, *caches, meta, head_dim**-0.5).numpy()
        sizes = np.cumsum([end - first for _, first, end in parts])[:-1]
        return {b: o for (b, _, _), o in zip(parts, np.split(out, sizes), strict=True)}

    full = step([(0, 0, 45), (1, 0, 70)])
    chunked: dict[int, list[np.ndarray]] = {0: [], 1: []}
    a_cuts, b_cuts = [0, 13, 14, 31, 45], [0, 7, 40, 41, 70]
    for i in range(4):  # chunks of both, next to a decode or a prefill of the companion
        company = (2, 9 + i, 10 + i) if i % 2 else (2, 0, 5 + i)
        outs = step([(0, a_cuts[i], a_cuts[i + 1]), company, (1, b_cuts[i], b_cuts[i + 1])])
        chunked[0].append(outs[0])
        chunked[1].append(outs[1])
    decoded: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for t in range(70):  # decode steps, with the companion's prefill in every other one
        parts = [(b, t, t + 1) for b in (0, 1) if t < lens[b]] + ([(2, 0, 23)] if t % 2 else [])
        for b, out in step(parts).items():
            if b != 2:
                decoded[b].append(out)
    for b in (0, 1):
        np.testing.assert_array_equal(np.concatenate(chunked[b]), full[b])
        np.testing.assert_array_equal(np.concatenate(decoded[b]), full[b])


def _split_rotary(qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """The attention layer's input without `rotary_kv_write`: split, rotary on q and k -> q, k, v."""
    q, k, v = paddle.split(qkv, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], axis=-1)
    q = apply_rotary(q.reshape([-1, heads, head_dim]), cos, sin)
    k = apply_rotary(k.reshape([-1, kv_heads, head_dim]), cos, sin)
    return q, k, v.reshape([-1, kv_heads, head_dim])


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(16, 2, 128), (4, 4, 40), (6, 2, 16)])
def test_fused_qkv_attention_is_bit_equal_to_the_unfused_path(
    isa, block_size, heads, kv_heads, head_dim, cache_dtype
):
    """Mixed prefill + decode batch in scattered blocks: the fused rotary + cache write gives the same q, the
    same cache contents and the same attention output, bit for bit, as rotary + `paged_attention`; and
    matches the Paddle path (kernels off)."""
    _, _, _, meta, caches = _mixed_batch(block_size, heads, kv_heads, head_dim, cache_dtype)
    tokens = meta.slot_mapping.shape[0]
    qkv = paddle.randn([tokens, (heads + 2 * kv_heads) * head_dim])
    cos, sin = RotaryEmbedding(head_dim, 500000.0)(flat_positions(meta.query_lens, meta.context_lens))
    unfused_caches, paddle_caches = [c.clone() for c in caches], [c.astype("float32") for c in caches]
    assert qkv_attention_fused(qkv, (cos, sin), meta, tuple(caches))
    ours = fused_qkv_attention(qkv, cos, sin, meta, tuple(caches), head_dim**-0.5).numpy()
    q, k, v = _split_rotary(qkv, cos, sin, heads, kv_heads, head_dim)
    expected = paged_attention(q, k, v, meta, tuple(unfused_caches), head_dim**-0.5).numpy()
    np.testing.assert_array_equal(ours, expected)
    for ours_cache, unfused_cache in zip(caches, unfused_caches, strict=True):
        np.testing.assert_array_equal(_bits(ours_cache), _bits(unfused_cache))
    q_fused = cpu_kernels.rotary_kv_write(qkv, cos, sin, *unfused_caches, meta.slot_mapping)
    np.testing.assert_array_equal(q_fused.numpy(), q.numpy())
    cpu_kernels.set_enabled(False)
    try:
        assert not qkv_attention_fused(qkv, (cos, sin), meta, tuple(paddle_caches))
        q, k, v = _split_rotary(qkv, cos, sin, heads, kv_heads, head_dim)
        k, v = _rounded(k, cache_dtype), _rounded(v, cache_dtype)
        reference = paged_attention(q, k, v, meta, tuple(paddle_caches), head_dim**-0.5).numpy()
    finally:
        cpu_kernels.set_enabled(True)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    for ours_cache, paddle_cache in zip(caches, paddle_caches, strict=True):
        np.testing.assert_allclose(_bits(ours_cache), _bits(paddle_cache), rtol=0, atol=1e-5)


def test_fused_qkv_attention_for_fp32_and_bf16_caches():
    """fp32 and bf16 caches take the fused path; no cache, C8's int8 cache, caches of other or mixed dtypes,
    or bf16 activations keep the unfused one."""
    _, _, _, meta, caches = _mixed_batch(4, 4, 2, 16)
    qkv = paddle.randn([meta.slot_mapping.shape[0], 8 * 16])
    rope = RotaryEmbedding(16, 500000.0)(flat_positions(meta.query_lens, meta.context_lens))
    assert qkv_attention_fused(qkv, rope, meta, tuple(caches))
    assert not qkv_attention_fused(qkv, rope, meta, None)
    assert not qkv_attention_fused(qkv, rope, meta, Int8KVCache.allocate(caches[0].shape[0], 2, 16))
    assert qkv_attention_fused(qkv, rope, meta, tuple(c.astype("bfloat16") for c in caches))
    assert not qkv_attention_fused(qkv, rope, meta, tuple(c.astype("float16") for c in caches))
    assert not qkv_attention_fused(qkv, rope, meta, (caches[0], caches[1].astype("bfloat16")))
    assert not qkv_attention_fused(qkv.astype("bfloat16"), rope, meta, tuple(caches))
    no_cache = AttentionMetadata.build(meta.query_lens[:1])
    assert not qkv_attention_fused(qkv[:7], rope, no_cache, tuple(caches))
    with pytest.raises(OSError, match="out of range"):
        bad = paddle.full_like(meta.slot_mapping, caches[0].shape[0])
        cpu_kernels.rotary_kv_write(qkv, *rope, *caches, bad)


def test_paged_attention_without_cache(isa):
    """No cache: causal attention over packed sequences (kv_index points at the new tokens)."""
    meta = AttentionMetadata.build([3, 8, 1])
    q, k, v = paddle.randn([12, 8, 64]), paddle.randn([12, 2, 64]), paddle.randn([12, 2, 64])
    cpu_kernels.set_enabled(False)
    try:
        expected = paged_attention(q, k, v, meta, None, 0.125).numpy()
    finally:
        cpu_kernels.set_enabled(True)
    ours = paged_attention(q, k, v, meta, None, 0.125).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def unfused_forward(model, ids, positions, meta, caches: list[KVCache]) -> paddle.Tensor:
    """The decoder before the fusions: x += attention(norm(x)); x += mlp(norm(x)), attention through split,
    rotary and `paged_attention`; -> logits."""
    x = model.embed_tokens(ids)
    cos, sin = model.rotary_emb(positions)
    for layer, cache in zip(model.layers, caches, strict=True):
        attn = layer.self_attn
        qkv = attn.qkv_proj(layer.input_layernorm(x))
        q, k, v = _split_rotary(qkv, cos, sin, attn.num_heads, attn.num_kv_heads, attn.head_dim)
        out = paged_attention(q, k, v, meta, cache, attn.scale)
        x = x + attn.o_proj(out.reshape([-1, attn.num_heads * attn.head_dim]))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.compute_logits(model.norm(x))


def run_mixed_steps(model, config, forward) -> tuple[list[np.ndarray], list[KVCache]]:
    """Three sequences in scattered blocks of 4: prefills, a chunked prefill beside decodes, then decodes."""
    caches = allocate_kv_caches(config, 24, 4)
    tables = [[int(b) for b in np.random.default_rng(5).permutation(24)[i::3]] for i in range(3)]
    steps = [  # (sequence, new tokens, context after the step)
        [(0, 6, 6), (2, 5, 5)],
        [(0, 1, 7), (1, 4, 4), (2, 3, 8)],
        [(0, 1, 8), (1, 1, 5), (2, 1, 9)],
        [(0, 1, 9), (1, 1, 6), (2, 1, 10)],
    ]
    rng, logits = np.random.default_rng(3), []
    for step in steps:
        q_lens, c_lens = [q for _, q, _ in step], [c for _, _, c in step]
        meta = AttentionMetadata.build(q_lens, c_lens, [tables[s] for s, _, _ in step], 4)
        ids = paddle.to_tensor(rng.integers(3, config.vocab_size, sum(q_lens)).astype(np.int64))
        with paddle.no_grad():
            logits.append(forward(model, ids, flat_positions(q_lens, c_lens), meta, caches).numpy())
    return logits, caches


def model_forward(model, ids, positions, meta, caches) -> paddle.Tensor:
    return model.compute_logits(model(ids, positions, meta, caches))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    make_tiny_checkpoint(path, CONFIGS["tied_gqa"], layout="paddle", dtype="bfloat16", seed=4)
    return path


def test_bf16_checkpoint_keeps_bf16_weights_and_matches_fp32(bf16_checkpoint, kernels_off):
    prompts = [[5, 9, 11, 3], [7] * 9]
    fp32_model, _ = load_model(bf16_checkpoint, device="cpu")
    assert not any(getattr(layer, "cpu_kernel", "") for layer in fp32_model.sublayers())
    expected = run_flat(fp32_model, prompts)
    cpu_kernels.set_enabled(True)
    model, _ = load_model(bf16_checkpoint, device="cpu")  # "auto": bf16 checkpoint -> bf16 weights
    linears = [layer for layer in model.sublayers() if isinstance(layer, Linear)]
    assert linears and all(layer.cpu_kernel == "bf16" for layer in linears)
    assert all(layer.weight.dtype == paddle.bfloat16 for layer in linears)
    assert model.lm_head is not None  # the tied head streams a bf16 copy of the table
    batched = run_flat(model, prompts)
    for ours, ref in zip(batched, expected, strict=True):
        assert rel_err(ours, ref) < BF16_ROUNDING_TOL  # end to end through every layer, activations in bf16
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    for prompt, ours in zip(prompts, batched, strict=True):  # a row's result does not depend on its batch
        np.testing.assert_array_equal(run_flat(model, [prompt])[0], ours)
    fp32_again, _ = load_model(bf16_checkpoint, device="cpu", dtype="float32")
    assert not any(getattr(layer, "cpu_kernel", "") for layer in fp32_again.sublayers())


def test_weight_dtype_choice(kernels_off):
    assert cpu_weight_dtype("bfloat16", "bfloat16") == "float32"  # no kernels: fp32 (with a warning)
    cpu_kernels.set_enabled(True)
    assert cpu_weight_dtype(None, "bfloat16") == "bfloat16"
    assert cpu_weight_dtype("auto", "float32") == "float32"  # never rounds an fp32 checkpoint silently
    assert cpu_weight_dtype("bfloat16", "float32") == "bfloat16"
    assert cpu_weight_dtype("float32", "bfloat16") == "float32"


def test_disabled_kernels_leave_the_paddle_path(kernels_off):
    assert not cpu_kernels.available()
    layer = Linear(16, 8)
    cpu_kernels.prepare_model(layer, bf16_weights=True)
    assert layer.cpu_kernel == "" and layer.weight.dtype == paddle.float32
    meta = AttentionMetadata.build([2])
    q, kv = paddle.randn([2, 2, 16]), paddle.randn([2, 1, 16])
    assert not cpu_kernels.fp32_supported(q, kv)
    assert paged_attention(q, kv, kv, meta, None, 0.25).shape == [2, 2, 16]


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_fused_decoder_is_bit_equal_to_the_unfused_layers(bf16_checkpoint, isa, kernels, monkeypatch):
    """The model (fused residual adds, fused attention input on the kernels) against the layer loop as it
    was, on mixed prefill / decode steps through a paged cache: the same logits and caches, bit for bit, with
    the kernels and on the Paddle path."""
    cpu_kernels.set_enabled(kernels == "on")
    try:
        model, config = load_model(bf16_checkpoint, device="cpu")
        fused_calls, rotary_kv_write = [], cpu_kernels.rotary_kv_write

        def counted(*args: paddle.Tensor) -> paddle.Tensor:
            fused_calls.append(1)
            return rotary_kv_write(*args)

        monkeypatch.setattr(cpu_kernels, "rotary_kv_write", counted)
        ours, our_caches = run_mixed_steps(model, config, model_forward)
        expected, expected_caches = run_mixed_steps(model, config, unfused_forward)
    finally:
        cpu_kernels.set_enabled(True)
    assert len(fused_calls) == (4 * config.num_hidden_layers if kernels == "on" else 0)
    for got, want in zip(ours, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(our_caches, expected_caches, strict=True):
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
        np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
