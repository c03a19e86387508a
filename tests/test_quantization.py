"""Quantization (issue 7): round-trip bounds from the math, exact int4 packing, exact W4A8 emulation,
C8 cache bounds, and models under each method (tiny random checkpoint from scripts/make_random_model.py)."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
from ernie_engine.distributed import parallel_state
from ernie_engine.layers.attention import AttentionMetadata, paged_attention
from ernie_engine.layers.linear import Linear
from ernie_engine.layers.quant.apply import quantize_linear, quantize_model, quantized_bytes
from ernie_engine.layers.quant.config import QuantConfig, normalize_method
from ernie_engine.layers.quant.kv_cache import Int8KVCache, kv_cache_bytes_per_token, static_step
from ernie_engine.layers.quant.weights import (
    dequantize_weight,
    load_prequantized,
    pack_int4,
    quantize_activation,
    quantize_for_method,
    quantize_weight,
    quantized_linear,
    unpack_int4,
    unpack_weight_int,
    w4a8_matmul,
)
from ernie_engine.llm import LLM
from ernie_engine.loader import load_model
from ernie_engine.sampling_params import SamplingParams
from safetensors.numpy import save_file
from safetensors.paddle import load_file

from scripts.make_random_model import ModelShape, make_model

RNG = np.random.default_rng(7)
REL = 1e-6  # fp32 rounding slack on top of the quantization bound


def _matrix(rows: int, cols: int) -> np.ndarray:
    """Gaussian with a few outlier rows and a dead column: stresses per-channel and per-group scales."""
    w = RNG.standard_normal((rows, cols)).astype(np.float32)
    w[::17] *= 8.0
    w[:, 3] = 0.0
    return w


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny") / "ckpt", ModelShape(), seed=3)


# ---- method names -------------------------------------------------------------------------------------


def test_method_names_case_insensitive_and_unknown_lists_valid():
    assert normalize_method("W4A8") == "w4a8"
    assert normalize_method("WINT4") == "wint4"
    assert normalize_method("") == ""
    with pytest.raises(ValueError) as err:
        QuantConfig.build("int3")
    for name in ("wint8", "wint4", "w4a8"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        QuantConfig.build("", kv_cache_dtype="fp4")


def test_kv_int8_switches():
    assert QuantConfig.build("wint8", kv_cache_dtype="int8").kv_cache_int8
    assert QuantConfig.build("W4A8C8").kv_cache_int8
    ckpt = {
        "quantization": "mix_quant",
        "dense_quant_type": "wint8",
        "moe_quant_type": "w4a8",
        "kv_cache_quant_type": "int8",
        "is_quantized": True,
    }
    cfg = QuantConfig.build("W4A8", checkpoint=ckpt)
    assert (cfg.dense_method, cfg.moe_method, cfg.kv_cache_int8, cfg.prequantized) == (
        "wint8",
        "w4a8",
        True,
        True,
    )
    assert not QuantConfig.build("wint8").kv_cache_int8


def test_router_lm_head_embeddings_stay_float():
    cfg = QuantConfig.build("wint4")
    assert cfg.method_for("layers.0.self_attn.qkv_proj") == "wint4"
    assert cfg.method_for("layers.3.mlp.shared_experts.down_proj") == "wint4"
    for name in ("layers.3.mlp.gate", "lm_head", "embed_tokens", "vision_model.blocks.0.attn.qkv_proj"):
        assert cfg.method_for(name) == ""


def test_lm_head_quantized_only_when_asked():
    cfg = QuantConfig.build("wint8", lm_head=True)
    assert cfg.method_for("lm_head.weight") == "wint8"
    assert cfg.method_for("embed_tokens") == cfg.method_for("layers.3.mlp.gate") == ""
    with pytest.raises(ValueError, match="quantize_lm_head needs"):
        QuantConfig.build("", lm_head=True)


# ---- weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group", [(8, -1), (4, -1), (4, 64), (4, 128)])
def test_weight_round_trip_within_half_step(bits, group):
    """|w - dq(q(w))| <= scale / 2 per element, scale = absmax(channel or group) / qmax."""
    w = _matrix(256, 48)
    qw = quantize_weight(paddle.to_tensor(w), bits, group)
    assert qw.qweight.dtype == paddle.int8
    assert list(qw.qweight.shape) == [256 if bits == 8 else 128, 48]
    groups = 1 if group < 0 else 256 // group
    grouped = np.abs(w).reshape(groups, -1, 48).max(axis=1)  # [G, out]
    step = grouped / (127.0 if bits == 8 else 7.0)
    bound = np.repeat(step, 256 // groups, axis=0) / 2 * (1 + REL) + 1e-7
    err = np.abs(dequantize_weight(qw).numpy() - w)
    assert (err <= bound).all(), float((err - bound).max())
    assert (dequantize_weight(qw).numpy()[:, 3] == 0).all()  # a dead channel stays exactly zero


@pytest.mark.parametrize(
    "rows, group, groups_per_rank", [(256, -1, 1), (512, 128, 2), (384, 128, 1), (192, 128, 1)]
)
def test_row_parallel_slice_gets_the_single_device_scales(monkeypatch, rows, group, groups_per_rank):
    """Rank 0 of 2 quantizing its half of a row-parallel weight: groups lying whole in the slice keep the
    single device's scales; otherwise (384 rows: a group of 128 straddles the ranks; 192: per channel on one
    device) the per-channel absmax is the whole row's (the all-reduce max, emulated with the full weight)."""
    w = _matrix(rows, 48)
    full_absmax = paddle.to_tensor(np.abs(w).max(axis=0))
    monkeypatch.setattr(parallel_state, "world_size", lambda: 2)
    monkeypatch.setattr(parallel_state, "all_reduce_max",
                        lambda x: paddle.maximum(x, full_absmax.reshape(x.shape)))
    part = quantize_weight(paddle.to_tensor(w[: rows // 2]), 4, group, sharded_input=True)
    assert part.num_groups == groups_per_rank
    whole = quantize_weight(paddle.to_tensor(w), 4, group if groups_per_rank > 1 else -1)
    np.testing.assert_array_equal(part.scale.numpy(), whole.scale.numpy()[:groups_per_rank])
    np.testing.assert_array_equal(part.qweight.numpy(), whole.qweight.numpy()[: rows // 4])


def test_halves_round_away_from_zero_as_paddle_weight_quantize():
    """Paddle's `weight_quantize` (FastDeploy's wint8 / wint4) rounds with C `round`: 2.5 -> 3, -0.5 -> -1
    (`paddle.round` gives 2 and 0). Ties are common with bf16 checkpoints; 0.49999997 still rounds to 0.
    The same rounding quantizes W4A8 activations and C8 keys / values."""
    ties = np.array([2.5, 0.5, -0.5, -2.5, 1.5, 4.5, -6.5, 0.49999997, -3.5], np.float32)
    expected = np.array([3, 1, -1, -3, 2, 5, -7, 0, -4])
    for bits, qmax in ((8, 127.0), (4, 7.0)):  # absmax = qmax: a step of exactly 1
        w = np.append(ties, qmax).astype(np.float32)[:, None]  # [10, 1]
        q = unpack_weight_int(quantize_weight(paddle.to_tensor(w), bits)).numpy()
        np.testing.assert_array_equal(q[:-1, 0], expected)
    x = paddle.to_tensor(np.append(ties, 127.0).astype(np.float32)[None, :])
    np.testing.assert_array_equal(quantize_activation(x)[0].numpy()[0, :-1], expected)
    cache = Int8KVCache.allocate(num_slots=2, num_kv_heads=1, head_dim=10)
    cache.write(paddle.to_tensor([1]), x.reshape([1, 1, 10]), x.reshape([1, 1, 10]))
    np.testing.assert_array_equal(cache.keys.numpy()[1, 0, :-1], expected)


def test_non_finite_weights_and_scales_are_refused():
    """A NaN or inf would turn its whole channel (or C8 head) into NaN or zeros: the load fails, naming it."""
    class Block(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.o_proj = Linear(8, 4)

    for bad in (np.nan, np.inf):
        w = np.ones((8, 4), np.float32)
        w[3, 1] = bad
        block = Block()
        block.o_proj.weight.set_value(paddle.to_tensor(w))
        with pytest.raises(ValueError, match="o_proj: weight holds NaN or inf"):
            quantize_model(block, QuantConfig.build("wint4"))
        with pytest.raises(ValueError, match="weight_scale holds NaN or inf"):
            load_prequantized(paddle.ones([8, 4], dtype="int8"), paddle.to_tensor([1.0, bad, 1.0, 1.0]), 8)
        with pytest.raises(ValueError, match="C8 scale holds NaN or inf"):
            static_step(paddle.to_tensor([2.0, bad]), 2)


@pytest.mark.parametrize("method", ["wint8", "wint4", "w4a8"])
def test_quantized_linear_keeps_the_activation_dtype(method):
    """bf16 activations (the XPU path: W4A8 runs this emulation there) give bf16 outputs for every method."""
    layer = Linear(64, 16)
    layer.weight.set_value(paddle.randn([64, 16]))
    quantize_linear(layer, method, group_size=32)
    x = paddle.randn([3, 64]).astype("bfloat16")
    out = quantized_linear(layer, x)
    assert out.dtype == paddle.bfloat16
    expected = quantized_linear(layer, x.astype("float32")).astype("bfloat16")
    np.testing.assert_array_equal(out.astype("float32").numpy(), expected.astype("float32").numpy())


def test_group_scales_beat_per_channel_on_uneven_rows():
    w = _matrix(256, 48)
    per_channel = np.abs(dequantize_weight(quantize_weight(paddle.to_tensor(w), 4, -1)).numpy() - w).mean()
    grouped = np.abs(dequantize_weight(quantize_weight(paddle.to_tensor(w), 4, 64)).numpy() - w).mean()
    assert grouped < per_channel


def test_int4_pack_unpack_exact_and_nibble_layout():
    lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))
    q = np.stack([lo.ravel(), hi.ravel()]).astype(np.int8)  # every (even row, odd row) pair: [2, 256]
    q = np.tile(q, (3, 1))  # [6, 256]
    packed = pack_int4(paddle.to_tensor(q))
    assert list(packed.shape) == [3, 256] and packed.dtype == paddle.int8
    expected = ((q[0::2] & 0x0F) | (q[1::2].astype(np.int16) << 4)).astype(np.uint8).view(np.int8)
    np.testing.assert_array_equal(packed.numpy(), expected)
    np.testing.assert_array_equal(unpack_int4(packed).numpy(), q)
    stacked = paddle.to_tensor(RNG.integers(-8, 8, (4, 10, 6)).astype(np.int8))  # experts [E, in, out]
    np.testing.assert_array_equal(unpack_int4(pack_int4(stacked)).numpy(), stacked.numpy())


@pytest.mark.parametrize("method", ["wint8", "wint4"])
def test_quantized_linear_close_to_fp32(method):
    """|x @ W - x @ dq(W)| <= sum_i |x_i| * step_j / 2 for output j (the per-element bound, summed)."""
    w = _matrix(256, 64)
    layer = Linear(256, 64)
    layer.weight.set_value(paddle.to_tensor(w))
    x = RNG.standard_normal((5, 256)).astype(np.float32)
    ref = x @ w
    quantize_linear(layer, method, group_size=128)
    assert layer.weight.dtype == paddle.int8 and "weight" not in dict(layer.named_parameters())
    out = layer(paddle.to_tensor(x)).numpy()
    qmax = 127.0 if method == "wint8" else 7.0
    groups = 1 if method == "wint8" else 2
    step = np.repeat(np.abs(w).reshape(groups, -1, 64).max(axis=1) / qmax, 256 // groups, axis=0)  # [in, out]
    bound = np.abs(x) @ (step / 2) * (1 + 1e-4) + 1e-4
    assert (np.abs(out - ref) <= bound).all()


def _round_half_away(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def test_w4a8_equals_numpy_integer_reference():
    in_features = 3072  # |acc| <= 127 * 7 * 3072 < 2**24: exact in fp32
    w = RNG.standard_normal((in_features, 40)).astype(np.float32)
    x = (RNG.standard_normal((9, in_features)) * 3).astype(np.float32)
    qw = quantize_weight(paddle.to_tensor(w), 4, -1)
    out = w4a8_matmul(paddle.to_tensor(x), qw).numpy()

    x_scale = np.maximum(np.abs(x).max(axis=1, keepdims=True) / np.float32(127), np.float32(1e-12))
    xq = np.clip(_round_half_away(x / x_scale), -127, 127).astype(np.int64)
    wq = unpack_int4(qw.qweight).numpy().astype(np.int64)
    assert np.abs(xq).max() <= 127 and np.abs(wq).max() <= 7
    acc = xq @ wq  # exact integer reference
    expected = acc.astype(np.float32) * x_scale * qw.scale.numpy().reshape(1, -1)
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out - x @ w).max() < 0.2 * np.abs(x @ w).max()  # and it still approximates the product


# ---- KV cache (C8) ------------------------------------------------------------------------------------


def test_c8_dynamic_write_read_within_half_step():
    cache = Int8KVCache.allocate(num_slots=32, num_kv_heads=2, head_dim=16)
    k = (RNG.standard_normal((5, 2, 16)) * np.array([1.0, 20.0])[None, :, None]).astype(np.float32)
    v = RNG.standard_normal((5, 2, 16)).astype(np.float32)
    slots = paddle.to_tensor(np.array([3, 17, 4, 30, 0]))
    cache.write(slots, paddle.to_tensor(k), paddle.to_tensor(v))
    assert cache.keys.dtype == paddle.int8
    k_hat, v_hat = (t.numpy() for t in cache.gather(slots))
    for x, x_hat in ((k, k_hat), (v, v_hat)):
        step = np.abs(x).max(axis=-1, keepdims=True) / 127.0  # per token, per head
        assert (np.abs(x_hat - x) <= step / 2 * (1 + REL) + 1e-7).all()


def test_c8_static_scales_within_half_step():
    absmax = paddle.to_tensor([2.0, 5.0])
    cache = Int8KVCache.allocate(8, 2, 4, static_scales=(absmax, absmax))
    k = (RNG.uniform(-1, 1, (3, 2, 4)) * np.array([2.0, 5.0])[None, :, None]).astype(np.float32)
    slots = paddle.to_tensor(np.array([1, 2, 7]))
    cache.write(slots, paddle.to_tensor(k), paddle.to_tensor(k))
    k_hat, _ = cache.gather(slots)
    step = np.array([2.0, 5.0])[None, :, None] / 127.0
    assert (np.abs(k_hat.numpy() - k) <= step / 2 * (1 + REL)).all()


def test_c8_long_chunked_context_stays_close_to_the_float_cache():
    """600 tokens in scattered blocks, with all-zero keys / values over whole blocks and an outlier token:
    no NaN; chunked prefill equals one prefill; the output equals attention over an fp32 cache holding the
    dequantized values (int8 storage is the only error), and stays within 0.05 of the fp32 cache's."""
    heads, kvh, dim, block, length = 8, 2, 64, 16, 600
    table = RNG.permutation(length // block + 2).tolist()
    slots = len(table) * block
    q = paddle.to_tensor(RNG.standard_normal((length, heads, dim)).astype(np.float32))
    k = (RNG.standard_normal((length, kvh, dim)) * 2).astype(np.float32)
    v = RNG.standard_normal((length, kvh, dim)).astype(np.float32)
    k[96:128], v[160:192], k[5, 0] = 0.0, 0.0, 50.0
    k, v = paddle.to_tensor(k), paddle.to_tensor(v)

    def attend(cache, chunks: list[int], keys: paddle.Tensor, values: paddle.Tensor) -> np.ndarray:
        outs, start = [], 0
        for n in chunks:
            meta = AttentionMetadata.build([n], [start + n], [table], block)
            part = slice(start, start + n)
            outs.append(paged_attention(q[part], keys[part], values[part], meta, cache, dim**-0.5).numpy())
            start += n
        return np.concatenate(outs)

    def fp32_cache() -> tuple[paddle.Tensor, paddle.Tensor]:
        return paddle.zeros([slots, kvh, dim]), paddle.zeros([slots, kvh, dim])

    c8 = Int8KVCache.allocate(slots, kvh, dim)
    whole = attend(c8, [length], k, v)
    assert np.isfinite(whole).all()
    chunked = attend(Int8KVCache.allocate(slots, kvh, dim), [250, 1, 49, 300], k, v)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)
    k_hat, v_hat = c8.gather(AttentionMetadata.build([length], [length], [table], block).slot_mapping)
    np.testing.assert_allclose(attend(fp32_cache(), [length], k_hat, v_hat), whole, rtol=0, atol=1e-4)
    assert np.abs(whole - attend(fp32_cache(), [length], k, v)).max() < 0.05


def test_c8_bytes_per_token():
    fp32 = kv_cache_bytes_per_token(18, 2, 128)
    int8 = kv_cache_bytes_per_token(18, 2, 128, int8=True)
    assert fp32 == 2 * 18 * 2 * 128 * 4
    assert int8 / fp32 == pytest.approx((128 + 4) / 512)  # 0.25x + 4 bytes of scale per head
    cache = Int8KVCache.allocate(64, 2, 128)
    assert cache.nbytes == 64 * int8 // 18


# ---- through the model --------------------------------------------------------------------------------


def _greedy(model, prompt: list[int], steps: int, caches, block_size: int = 16) -> list[int]:
    """Prefill + decode with a paged cache (one sequence, blocks 0..n in order)."""
    tokens, table = list(prompt), list(range(8))
    query = list(prompt)
    for _ in range(steps):
        ctx = len(tokens)
        meta = AttentionMetadata.build([len(query)], [ctx], [table], block_size)
        positions = paddle.arange(ctx - len(query), ctx, dtype="int64")
        hidden = model(paddle.to_tensor(query, dtype="int64"), positions, meta, caches)
        nxt = int(model.compute_logits(hidden[-1:]).argmax(-1).item())
        tokens.append(nxt)
        query = [nxt]
    return tokens[len(prompt) :]


def test_c8_cache_gives_same_greedy_tokens_as_fp32(tiny_ckpt):
    model, cfg = load_model(tiny_ckpt)
    slots, kvh, dim = 8 * 16, cfg.num_key_value_heads, cfg.head_dim
    fp32 = [(paddle.zeros([slots, kvh, dim]), paddle.zeros([slots, kvh, dim])) for _ in model.layers]
    int8 = [Int8KVCache.allocate(slots, kvh, dim) for _ in model.layers]
    prompt = [5, 77, 301, 12, 900, 41, 7, 250, 1033, 64, 2]
    ref = _greedy(model, prompt, 12, fp32)
    assert _greedy(model, prompt, 12, int8) == ref
    # The cached path matches cache-free attention over the whole sequence.
    full = prompt + ref[:-1]
    hidden = model(
        paddle.to_tensor(full, dtype="int64"),
        paddle.arange(len(full), dtype="int64"),
        AttentionMetadata.build([len(full)]),
    )
    assert model.compute_logits(hidden).argmax(-1).numpy()[len(prompt) - 1 :].tolist() == ref


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    meta = AttentionMetadata.build([len(tokens)])
    hidden = model(paddle.to_tensor(tokens), paddle.arange(len(tokens), dtype="int64"), meta)
    return model.compute_logits(hidden).numpy()


@pytest.mark.parametrize("method,min_agree", [("wint8", 0.95), ("wint4", 0.6), ("w4a8", 0.6)])
def test_model_under_each_method(tiny_ckpt, method, min_agree):
    tokens = RNG.integers(3, 2000, 64)
    ref_model, _ = load_model(tiny_ckpt)
    ref = _logits(ref_model, tokens)
    model, _ = load_model(tiny_ckpt, quantization=QuantConfig.build(method))
    assert quantized_bytes(model) > 0
    assert all(p.dtype == paddle.float32 for p in model.parameters())  # only embeddings/norms left as floats
    out = _logits(model, tokens)
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= min_agree
    assert np.abs(out - ref).max() < 0.5 * np.abs(ref).max()


def test_quantized_lm_head_of_a_tied_model(tiny_ckpt):
    """The tied head becomes an int8 copy of the table (the float table stays for lookups); top-1 holds."""
    tokens = RNG.integers(3, 2000, 64)
    ref = _logits(load_model(tiny_ckpt)[0], tokens)
    body_only, config = load_model(tiny_ckpt, quantization=QuantConfig.build("wint8"))
    model, _ = load_model(tiny_ckpt, quantization=QuantConfig.build("wint8", lm_head=True))
    assert config.tie_word_embeddings
    head_bytes = quantized_bytes(model) - quantized_bytes(body_only)
    assert head_bytes >= config.vocab_size * config.hidden_size  # one int8 byte per table entry, + scales
    assert model.embed_tokens.weight.dtype == paddle.float32
    out, body_out = _logits(model, tokens), _logits(body_only, tokens)
    assert not np.array_equal(out, body_out)
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_prequantized_checkpoint_loads_as_quantized(tiny_ckpt, tmp_path):
    """Write `<name>.weight` (packed int4 [in/2, out]) + `<name>.weight_scale` ([out]) as documented, from the
    float checkpoint; loading it gives the same logits as quantizing the float checkpoint at load."""
    quant = QuantConfig.build("w4a8")
    tensors = {}
    for name, value in load_file(str(tiny_ckpt / "model.safetensors")).items():
        if quant.method_for(name.removeprefix("ernie.")):
            qw = quantize_for_method(value.astype("float32"), "w4a8", quant.group_size)
            name = name.removesuffix(".weight")
            tensors[f"{name}.weight"] = qw.qweight.numpy()
            tensors[f"{name}.weight_scale"] = qw.scale.numpy().reshape(-1)  # per channel: stored [out]
        else:
            tensors[name] = value.astype("float32").numpy()
    for name in ("config.json", "tokenizer.model"):
        (tmp_path / name).write_bytes((tiny_ckpt / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quantization": "w4a8", "is_quantized": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))

    model, _ = load_model(tiny_ckpt, quantization=quant)
    ckpt_quant = QuantConfig.build("W4A8", checkpoint=config["quantization_config"])
    assert ckpt_quant.prequantized
    loaded, _ = load_model(tmp_path, quantization=ckpt_quant)
    tokens = RNG.integers(3, 2000, 20)
    # Same int weights and scales; the float parts differ only in resident dtype (bf16 file vs fp32 file).
    np.testing.assert_allclose(_logits(loaded, tokens), _logits(model, tokens), rtol=1e-4, atol=1e-5)
    assert quantized_bytes(loaded) == quantized_bytes(model)


# ---- through the engine -------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPT = [5, 77, 301, 12, 900, 41, 7, 250, 1033, 64]


def _engine_tokens(ckpt, **kwargs) -> tuple[list[int], LLM]:
    llm = LLM(ckpt, kv_cache_memory_bytes=1 << 20, max_model_len=256, **kwargs)
    return llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids, llm


def test_engine_c8_same_greedy_tokens_and_more_blocks(tiny_ckpt):
    ref, fp32 = _engine_tokens(tiny_ckpt, kv_cache_dtype="float32")
    out, c8 = _engine_tokens(tiny_ckpt, kv_cache_dtype="int8")
    assert isinstance(c8.engine.runner.kv_caches[0], Int8KVCache)
    assert out == ref and len(set(ref)) > 1
    # Same byte budget: blocks scale with 4 * head_dim / (head_dim + 4) (fp32 vs int8 + fp32 scale per head).
    head_dim = c8.engine.runner.model_config.head_dim
    ratio = c8.engine.num_blocks / fp32.engine.num_blocks
    assert ratio == pytest.approx(4 * head_dim / (head_dim + 4), rel=0.02)


@pytest.mark.parametrize("method", ["wint8", "WINT4", "W4A8"])
def test_engine_generates_under_each_method(tiny_ckpt, method):
    tokens, llm = _engine_tokens(tiny_ckpt, quantization=method)
    assert len(tokens) == GREEDY.max_tokens
    assert quantized_bytes(llm.engine.runner.model) > 0


def test_engine_quantize_lm_head(tiny_ckpt):
    tokens, llm = _engine_tokens(tiny_ckpt, quantization="wint8", quantize_lm_head=True)
    assert len(tokens) == GREEDY.max_tokens
    assert llm.engine.runner.model.lm_head.quant_method == "wint8"


def test_engine_unknown_method_fails_the_load(tiny_ckpt):
    with pytest.raises(ValueError, match="wint8.*wint4.*w4a8"):
        LLM(tiny_ckpt, quantization="fp4", kv_cache_memory_bytes=1 << 20, max_model_len=256)


def test_engine_c8_static_checkpoint_scales(tiny_ckpt, tmp_path):
    """FastDeploy-named per-head absmax tensors are read by the runner (and skipped by the weight loader)."""
    tensors = {name: value.astype("float32").numpy() for name, value in
               load_file(str(tiny_ckpt / "model.safetensors")).items()}
    config = json.loads((tiny_ckpt / "config.json").read_text())
    kvh = config["num_key_value_heads"]
    for i in range(config["num_hidden_layers"]):
        for kv in "kv":
            name = f"ernie.layers.{i}.self_attn.cache{kv}_matmul.activation_scale"
            tensors[name] = np.full(kvh, 6.0, np.float32)
    config["quantization_config"] = {"kv_cache_quant_type": "int8"}
    for path in tiny_ckpt.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    tokens, llm = _engine_tokens(tmp_path)
    runner = llm.engine.runner
    cache = runner.kv_caches[0]
    assert isinstance(cache, Int8KVCache) and cache.static
    np.testing.assert_allclose(cache.key_scale.numpy().reshape(-1), 6.0 / 127)
    assert runner.kv_bytes_per_token() == 2 * config["num_hidden_layers"] * kvh * config["head_dim"]
    assert len(tokens) == GREEDY.max_tokens
