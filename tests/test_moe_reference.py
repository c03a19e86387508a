"""Ernie4_5_MoeForCausalLM against transformers: the MoE block alone, then checkpoints in both layouts."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
from ernie_engine.config import ModelConfig
from ernie_engine.distributed.sharding import check_quantized
from ernie_engine.layers import cpu_kernels
from ernie_engine.layers.moe import GroupedExperts, SparseMoeBlock
from ernie_engine.layers.quant.apply import quantize_experts, quantized_bytes
from ernie_engine.layers.quant.config import QuantConfig
from ernie_engine.layers.quant.weights import quantize_for_method
from ernie_engine.loader import load_model
from ernie_engine.models.ernie4_5 import Ernie4_5MLP
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from transformers import Ernie4_5_MoeConfig
from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import (
    Ernie4_5_MoeDecoderLayer,
    Ernie4_5_MoeSparseMoeBlock,
)

from tests.reference_utils import (
    edit_checkpoint,
    make_tiny_checkpoint,
    paged_greedy,
    run_flat,
    torch_greedy,
    torch_logits,
)

HIDDEN, NUM_EXPERTS, TOP_K, EXPERT_WIDTH, NUM_SHARED = 32, 10, 3, 16, 2


def block_config(**overrides) -> Ernie4_5_MoeConfig:
    values = dict(
        vocab_size=160,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_num_experts=NUM_EXPERTS,
        moe_k=TOP_K,
        moe_intermediate_size=EXPERT_WIDTH,
        moe_num_shared_experts=NUM_SHARED,
        # transformers places MoE at (i + 1) % interval == 0 within [start, end]: layers 2 and 5 here,
        # where counting the interval from the start index would give 1 and 4.
        moe_layer_start_index=1,
        moe_layer_interval=3,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return Ernie4_5_MoeConfig(**values)


def t2p(tensor: torch.Tensor) -> paddle.Tensor:
    return paddle.to_tensor(tensor.detach().float().numpy())


def routing_sensitive(block: Ernie4_5_MoeSparseMoeBlock, seed: int) -> None:
    """Spread the router's probabilities and give the correction bias a comparable size, so the bias
    changes which experts win for many tokens (the default init routes almost uniformly)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=gen) * 0.5)
        bias = block.gate.moe_statics.e_score_correction_bias
        bias.copy_(torch.randn(bias.shape, generator=gen) * 0.08)


def paddle_block_from(block: Ernie4_5_MoeSparseMoeBlock) -> SparseMoeBlock:
    """Our block with the transformers block's weights ([out, in] -> [in, out], experts stacked)."""
    shared = block.shared_experts
    ours = SparseMoeBlock(
        HIDDEN, NUM_EXPERTS, TOP_K, EXPERT_WIDTH, 1e-12, Ernie4_5MLP(HIDDEN, EXPERT_WIDTH * NUM_SHARED)
    )
    ours.gate.weight.set_value(t2p(block.gate.weight.T))
    ours.moe_statics.e_score_correction_bias.set_value(t2p(block.gate.moe_statics.e_score_correction_bias))
    ours.experts.up_gate_proj.set_value(t2p(block.experts.gate_up_proj.transpose(1, 2)))
    ours.experts.down_proj.set_value(t2p(block.experts.down_proj.transpose(1, 2)))
    up_gate = torch.cat([shared.gate_proj.weight, shared.up_proj.weight], dim=0)
    ours.shared_experts.up_gate_proj.weight.set_value(t2p(up_gate.T))
    ours.shared_experts.down_proj.weight.set_value(t2p(shared.down_proj.weight.T))
    return ours


@pytest.fixture(scope="module")
def moe_block() -> tuple[Ernie4_5_MoeSparseMoeBlock, SparseMoeBlock, torch.Tensor]:
    torch.manual_seed(0)
    block = Ernie4_5_MoeSparseMoeBlock(block_config()).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.2)
    routing_sensitive(block, seed=1)
    x = torch.randn(1, 64, HIDDEN)
    return block, paddle_block_from(block), x


def test_moe_block_matches_transformers(moe_block) -> None:
    block, ours, x = moe_block
    with torch.no_grad():
        expected = block(x)[0].numpy()
    got = ours(t2p(x[0])).numpy()
    assert np.abs(got - expected).max() < 1e-5


def test_router_selection_and_weights_match_transformers(moe_block) -> None:
    block, ours, x = moe_block
    with torch.no_grad():
        _, want_weights, want_ids = block.gate(x[0])
    weights, ids = ours.gate(t2p(x[0]), ours.moe_statics.e_score_correction_bias)
    # Same experts per token (order within a token's top-k may differ only on exact ties).
    np.testing.assert_array_equal(np.sort(ids.numpy(), -1), np.sort(want_ids.numpy(), -1))
    np.testing.assert_allclose(weights.numpy(), want_weights.numpy(), atol=1e-6)
    np.testing.assert_allclose(weights.numpy().sum(-1), 1.0, atol=1e-6)


def test_correction_bias_changes_selection_only(moe_block) -> None:
    """The bias must move the choice of experts, never their weights. A deliberately wrong variant
    (weights taken from probs + bias) must give a clearly different output than ours."""
    block, ours, x = moe_block
    xp = t2p(x[0])
    bias = ours.moe_statics.e_score_correction_bias
    probs = paddle.nn.functional.softmax(paddle.matmul(xp, ours.gate.weight), axis=-1)
    ids_biased = paddle.topk(probs + bias, TOP_K)[1].numpy()
    ids_plain = paddle.topk(probs, TOP_K)[1].numpy()
    changed = (np.sort(ids_biased, -1) != np.sort(ids_plain, -1)).any(-1).mean()
    assert changed > 0.3, f"the test bias should change the selection of many tokens, changed {changed:.0%}"

    biased = paddle.take_along_axis(probs + bias, paddle.to_tensor(ids_biased), axis=-1)
    wrong_weights = biased / biased.sum(-1, keepdim=True)
    wrong = ours.experts(xp, wrong_weights, paddle.to_tensor(ids_biased)) + ours.shared_experts(xp)
    with torch.no_grad():
        right = block(x)[0].numpy()
    got = ours(xp).numpy()
    assert np.abs(got - right).max() < 1e-5
    assert np.abs(got - wrong.numpy()).max() > 1e-2


def test_grouped_experts_skip_idle_experts_and_handle_uneven_loads() -> None:
    """All tokens on one expert, others idle; zero tokens. Checked against a per-token computation."""
    paddle.seed(3)
    ours = SparseMoeBlock(HIDDEN, NUM_EXPERTS, TOP_K, EXPERT_WIDTH, 1e-12, None)
    ours.experts.up_gate_proj.set_value(paddle.randn(ours.experts.up_gate_proj.shape))
    ours.experts.down_proj.set_value(paddle.randn(ours.experts.down_proj.shape))
    x = paddle.randn([5, HIDDEN])
    ids = paddle.to_tensor([[7, 2, 4]] * 5, dtype="int64")
    weights = paddle.rand([5, TOP_K])
    got = ours.experts(x, weights, ids).numpy()
    per_expert = [ours.experts.expert_forward(e, x).numpy() for e in (7, 2, 4)]
    want = sum(weights[:, j : j + 1].numpy() * out for j, out in enumerate(per_expert))
    assert np.abs(got - want).max() < 1e-4
    empty = ours.experts(x[:0], weights[:0], ids[:0])
    assert empty.shape == [0, HIDDEN]


@pytest.mark.skipif(not cpu_kernels.available(), reason="cpu kernels unavailable on this machine")
@pytest.mark.parametrize("tokens", [5, 130])  # decode- and prefill-sized batches
@pytest.mark.parametrize(
    ("method", "group"), [("", -1), ("wint8", -1), ("wint4", -1), ("wint4", 32), ("w4a8", -1)]
)
def test_grouped_experts_on_cpu_kernels_match_the_paddle_path(method: str, group: int, tokens: int) -> None:
    """Stacked experts repacked by `prepare_model` (float as bf16, else the quant layout) give the Paddle
    path's outputs on the same weight values, and the state dict keeps the checkpoint layout."""
    paddle.seed(4)
    experts = GroupedExperts(NUM_EXPERTS, 64, EXPERT_WIDTH)
    for weight in (experts.up_gate_proj, experts.down_proj):  # bf16 values: the repacking loses nothing
        weight.set_value(paddle.randn(weight.shape).astype("bfloat16").astype("float32"))
    if method:
        quantize_experts(experts, method, group)
    model = paddle.nn.Sequential(experts)
    x, weights = paddle.randn([tokens, 64]), paddle.rand([tokens, TOP_K])
    ids = paddle.to_tensor([[7, 2, 4]] * tokens, dtype="int64")
    want, state = experts(x, weights, ids).numpy(), {k: v.numpy() for k, v in model.state_dict().items()}
    cpu_kernels.prepare_model(model, bf16_weights=True)
    assert experts.cpu_kernel == (method or "bf16")
    got = experts(x, weights, ids).numpy()
    # The kernels round x to bf16 (csrc/linear.cc); W4A8's int8-valued x stays exact.
    tolerance = 1e-5 if method == "w4a8" else 1e-2
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    assert after.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(after[key], value)


def test_xpu_combine_inputs_reproduce_the_cpu_path(moe_block, monkeypatch) -> None:
    """The XPU branch hands the expert rows to paddlepaddle-xpu's `moe_combine`; no XPU here, so the op is
    replaced by its documented semantics (Paddle's GPU kernel: y[t] += w[t, j] * x[index[t, j]]) to check
    the index and weights we build for it."""
    from ernie_engine.layers import moe

    def combine_semantics(x, weights, index):
        x, weights, index = x.numpy(), weights.numpy(), index.numpy()
        assert index.dtype == np.int32 and weights.dtype == x.dtype
        return paddle.to_tensor(np.einsum("tj,tjh->th", weights, x[index]))

    _, ours, x = moe_block
    xp = t2p(x[0])
    weights, ids = ours.gate(xp, ours.moe_statics.e_score_correction_bias)
    cpu = ours.experts(xp, weights, ids).numpy()
    monkeypatch.setattr(moe, "_on_xpu", lambda: True)
    monkeypatch.setattr(paddle.incubate.nn.functional, "moe_combine", combine_semantics)
    assert np.abs(ours.experts(xp, weights, ids).numpy() - cpu).max() < 1e-5


@pytest.mark.parametrize(
    "start,end,interval,layers", [(1, -1, 1, 6), (1, -1, 3, 6), (2, -1, 2, 7), (0, 4, 2, 8), (3, 5, 1, 8)]
)
def test_moe_layer_placement_matches_transformers(start: int, end: int, interval: int, layers: int) -> None:
    hf = block_config(
        num_hidden_layers=layers,
        moe_layer_start_index=start,
        moe_layer_end_index=end,
        moe_layer_interval=interval,
    )
    want = [
        isinstance(Ernie4_5_MoeDecoderLayer(hf, i).mlp, Ernie4_5_MoeSparseMoeBlock) for i in range(layers)
    ]
    ours = ModelConfig.from_dict(hf.to_dict() | {"architectures": ["Ernie4_5_MoeForCausalLM"]})
    assert [ours.is_moe_layer(i) for i in range(layers)] == want


def test_config_reads_both_key_styles() -> None:
    saved = block_config().to_dict()  # what transformers writes to config.json
    hf = ModelConfig.from_dict(saved)
    assert (hf.moe_num_experts, hf.moe_k, hf.moe_intermediate_size, hf.moe_num_shared_experts) == (
        NUM_EXPERTS,
        TOP_K,
        EXPERT_WIDTH,
        NUM_SHARED,
    )
    assert (hf.moe_layer_start_index, hf.moe_layer_end_index, hf.moe_layer_interval) == (1, 5, 3)
    paddle_style = {  # an ERNIE-4.5-21B-A3B-Paddle style config.json
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "hidden_size": 2560,
        "num_attention_heads": 20,
        "num_hidden_layers": 28,
        "moe_num_experts": 64,
        "moe_k": 6,
        "moe_intermediate_size": 1536,
        "moe_num_shared_experts": 2,
        "moe_layer_start_index": 1,
        "moe_layer_interval": 1,
        "moe_use_aux_free": True,
        "moe_gate": "topk",
        "moe_capacity": [64, 64, 64],
    }
    pd_cfg = ModelConfig.from_dict(paddle_style)
    assert (pd_cfg.moe_num_experts, pd_cfg.moe_k, pd_cfg.moe_layer_end_index) == (64, 6, 27)
    assert [pd_cfg.is_moe_layer(i) for i in (0, 1, 27)] == [False, True, True]
    alias_style = {"hidden_size": 64, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2}
    aliased = ModelConfig.from_dict(alias_style)
    assert (aliased.moe_num_experts, aliased.moe_k) == (8, 2)


def test_vl_paddle_config_with_per_modality_lists_is_moe() -> None:
    """ERNIE-4.5-VL-28B-A3B-Paddle's config.json gives [text, vision] expert counts and widths; the
    tensor-parallel start-up check of a 4-bit MoE row reads `is_moe` on it (it raised TypeError)."""
    vl_paddle = {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
        "hidden_size": 2560,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "num_hidden_layers": 28,
        "moe_num_experts": [64, 64],
        "moe_intermediate_size": [1536, 512],
        "moe_k": 6,
        "moe_num_shared_experts": 2,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 29,
    }
    config = ModelConfig.from_dict(vl_paddle)
    assert config.is_moe
    assert not ModelConfig.from_dict(vl_paddle | {"moe_num_experts": [0, 0]}).is_moe
    check_quantized(config, 2, QuantConfig.build("wint4"))


# ---- whole model from checkpoints in both layouts -------------------------------------------------------

MOE_MODEL = {
    "model_type": "ernie4_5_moe",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "moe_num_experts": NUM_EXPERTS,
    "moe_k": TOP_K,
    "moe_intermediate_size": 32,
    "moe_num_shared_experts": NUM_SHARED,
    "moe_layer_start_index": 1,
    "moe_layer_interval": 3,  # MoE in layers 2 and 5, dense MLP in 0, 1, 3, 4
    "tie_word_embeddings": False,
}
MOE_LAYERS = [2, 5]
TOL = 1e-4


def prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["paddle", "transformers"])
def moe_case(request, tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp(f"moe-{request.param}")
    reference = make_tiny_checkpoint(path, MOE_MODEL, layout=request.param, seed=11)
    model, config = load_model(path, device="cpu")
    return reference, model, config, path


def test_checkpoint_layouts_hold_per_expert_tensors(moe_case, request):
    """What we load from: transformers 5.x saves one tensor per expert (not its in-memory stacked
    `experts.gate_up_proj`), and the router bias under `mlp.moe_statics`."""
    _, _, _, path = moe_case
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    if request.node.callspec.params["moe_case"] == "paddle":
        assert shapes["ernie.layers.2.mlp.experts.9.up_gate_proj.weight"] == (64, 64)
        assert shapes["ernie.layers.2.mlp.experts.9.down_proj.weight"] == (32, 64)
        assert shapes["ernie.layers.2.mlp.gate.weight"] == (64, NUM_EXPERTS)
        assert shapes["ernie.layers.5.mlp.moe_statics.e_score_correction_bias"] == (1, NUM_EXPERTS)
        assert shapes["ernie.layers.5.mlp.shared_experts.up_gate_proj.weight"] == (64, 128)
    else:
        assert shapes["model.layers.2.mlp.experts.9.gate_proj.weight"] == (32, 64)
        assert shapes["model.layers.2.mlp.gate.weight"] == (NUM_EXPERTS, 64)
        assert shapes["model.layers.5.mlp.moe_statics.e_score_correction_bias"] == (1, NUM_EXPERTS)
    assert not any("experts.gate_up_proj" in name or "layers.1.mlp.experts" in name for name in shapes)


def test_moe_layers_placed_as_transformers_places_them(moe_case):
    reference, model, config, _ = moe_case
    hf = [isinstance(layer.mlp, Ernie4_5_MoeSparseMoeBlock) for layer in reference.model.layers]
    ours = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.layers]
    assert ours == hf == [i in MOE_LAYERS for i in range(6)]
    bias = model.layers[2].mlp.moe_statics.e_score_correction_bias.numpy()
    assert np.abs(bias).max() > 0.05  # the reference's random correction bias was loaded, not zeros


def test_bias_changes_the_reference_routing(moe_case):
    """Guard on the fixture: with this checkpoint the correction bias really changes expert choices."""
    reference, _, config, _ = moe_case
    captured = []
    router = reference.model.layers[2].mlp.gate
    handle = router.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    try:
        torch_logits(reference, prompts(config.vocab_size, [40], seed=6)[0])
    finally:
        handle.remove()
    with torch.no_grad():
        probs = torch.softmax(captured[0].float() @ router.weight.T, dim=-1)
        plain = probs.topk(TOP_K).indices.sort().values
        biased = (probs + router.moe_statics.e_score_correction_bias).topk(TOP_K).indices.sort().values
    assert (plain != biased).any(-1).float().mean() > 0.2


def test_prefill_logits_match_transformers(moe_case):
    reference, model, config, _ = moe_case
    batch = prompts(config.vocab_size, [1, 6, 19, 33], seed=1)
    worst = max(
        float(np.abs(ours - torch_logits(reference, prompt)).max())
        for prompt, ours in zip(batch, run_flat(model, batch), strict=True)
    )
    print(f"max |logit diff| = {worst:.2e}")
    assert worst < TOL


def test_greedy_with_paged_cache_matches_transformers(moe_case):
    reference, model, config, _ = moe_case
    batch = prompts(config.vocab_size, [3, 10, 17], seed=2)
    tokens, step_logits = paged_greedy(model, config, batch, max_new_tokens=32, block_size=4)
    for prompt, ours, logits in zip(batch, tokens, step_logits, strict=True):
        assert ours == torch_greedy(reference, prompt, 32)
        expected = torch_logits(reference, prompt + ours)[len(prompt) - 1 : -1]
        assert np.abs(logits - expected).max() < TOL


@pytest.mark.parametrize("layout", ["paddle", "transformers"])
def test_mtp_tensors_are_skipped_knowingly(tmp_path: Path, layout: str, caplog):
    reference = make_tiny_checkpoint(tmp_path, MOE_MODEL, layout=layout, seed=11)
    prefix = "ernie." if layout == "paddle" else "model."
    mtp = {
        f"{prefix}mtp_block.0.mlp.experts.0.up_gate_proj.weight": torch.zeros(64, 64),
        f"{prefix}mtp_block.0.mlp.gate.weight": torch.zeros(64, NUM_EXPERTS),
        f"{prefix}mtp_emb_norm.0.weight": torch.ones(64),
        f"{prefix}mtp_linear_proj.0.weight": torch.zeros(128, 64),
    }
    edit_checkpoint(tmp_path, lambda tensors: tensors.update(mtp))
    with caplog.at_level(logging.INFO, logger="ernie_engine.loader"):
        model, config = load_model(tmp_path, device="cpu")
    assert f"skipping {len(mtp)} checkpoint tensors" in caplog.text
    prompt = prompts(config.vocab_size, [12], seed=4)[0]
    assert np.abs(run_flat(model, [prompt])[0] - torch_logits(reference, prompt)).max() < TOL
    # Only the mtp_ rule skips: any other stray tensor next to the experts is still an error.
    stray = f"{prefix}layers.2.mlp.experts.10.x"
    edit_checkpoint(tmp_path, lambda tensors: tensors.update({stray: torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor .*layers\.2\.mlp\.experts\.10\.x"):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("layout", "tensor"),
    [
        ("paddle", "ernie.layers.5.mlp.experts.7.up_gate_proj.weight"),
        ("transformers", "model.layers.2.mlp.experts.3.up_proj.weight"),
        ("transformers", "model.layers.2.mlp.moe_statics.e_score_correction_bias"),
    ],
)
def test_missing_expert_tensor_is_named(tmp_path: Path, layout: str, tensor: str):
    make_tiny_checkpoint(tmp_path, MOE_MODEL, layout=layout, seed=11)
    edit_checkpoint(tmp_path, lambda tensors: tensors.pop(tensor))
    with pytest.raises(ValueError, match=rf"missing tensor {re.escape(tensor)} \(expected shape"):
        load_model(tmp_path, device="cpu")


# ---- pre-quantized routed experts (docs/QUANTIZATION.md layout) -----------------------------------------

_EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.(up_gate_proj|down_proj)\.weight$")


def write_prequantized(src: Path, dst: Path, quant: QuantConfig) -> None:
    """The float -Paddle checkpoint in `src` quantized ahead into `dst`: `<name>.weight` int8 (int4 packed two
    per byte) + `<name>.weight_scale` ([out] per channel, else [in / group, out]) for the dense projections
    and for every routed expert's weights, the rest as stored."""
    tensors = {}
    with safe_open(str(src / "model.safetensors"), framework="np") as f:
        for name in f.keys():  # noqa: SIM118
            value = f.get_tensor(name)
            param = name.removeprefix("ernie.").removesuffix(".weight")
            is_expert = bool(_EXPERT_WEIGHT.search(name))
            method = quant.method_for(param, is_expert=is_expert) if name.endswith(".weight") else ""
            if not method:
                tensors[name] = value
                continue
            qw = quantize_for_method(paddle.to_tensor(value), method, quant.group_size)
            scale = qw.scale.numpy()
            tensors[f"ernie.{param}.weight"] = qw.qweight.numpy()
            tensors[f"ernie.{param}.weight_scale"] = scale.reshape(-1) if scale.shape[0] == 1 else scale
    dst.mkdir(parents=True, exist_ok=True)
    save_numpy(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quantization": "mix_quant",
        "dense_quant_type": quant.dense_method,
        "moe_quant_type": quant.moe_method,
        "is_quantized": True,
    }
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("moe_method,group_size", [("w4a8", 128), ("wint4", 16), ("wint8", 128)])
def test_prequantized_experts_load_as_quantizing_at_load(tmp_path: Path, moe_method: str, group_size: int):
    """Loading the quantized-ahead checkpoint gives the same int experts, scales and logits as loading the
    float checkpoint and quantizing at load; the experts stay int8 (W4A8C8-style mix: dense wint8)."""
    make_tiny_checkpoint(tmp_path / "float", MOE_MODEL, layout="paddle", seed=11)
    at_load = dataclasses.replace(
        QuantConfig.build(checkpoint={"dense_quant_type": "wint8", "moe_quant_type": moe_method}),
        group_size=group_size,
    )
    write_prequantized(tmp_path / "float", tmp_path / "ahead", at_load)
    ahead = QuantConfig.build(
        checkpoint=json.loads((tmp_path / "ahead" / "config.json").read_text())["quantization_config"]
    )
    assert ahead.prequantized and ahead.moe_method == moe_method

    want, config = load_model(tmp_path / "float", device="cpu", quantization=at_load)
    got, _ = load_model(tmp_path / "ahead", device="cpu", quantization=ahead)
    for layer in MOE_LAYERS:
        ours, ref = got.layers[layer].mlp.experts, want.layers[layer].mlp.experts
        assert ours.quant_method == moe_method
        for name in ("up_gate_proj", "down_proj", "up_gate_proj_scale", "down_proj_scale"):
            assert getattr(ours, name).dtype == getattr(ref, name).dtype
            np.testing.assert_array_equal(getattr(ours, name).numpy(), getattr(ref, name).numpy())
    assert ours.up_gate_proj.dtype == paddle.int8
    assert quantized_bytes(got) == quantized_bytes(want)
    batch = prompts(config.vocab_size, [7, 30], seed=5)
    for ours, ref in zip(run_flat(got, batch), run_flat(want, batch), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_prequantized_expert_missing_scale_is_named(tmp_path: Path):
    make_tiny_checkpoint(tmp_path / "float", MOE_MODEL, layout="paddle", seed=11)
    write_prequantized(tmp_path / "float", tmp_path / "ahead", QuantConfig.build("w4a8"))
    tensor = "ernie.layers.5.mlp.experts.7.down_proj.weight_scale"
    edit_checkpoint(tmp_path / "ahead", lambda tensors: tensors.pop(tensor))
    quant = QuantConfig.build(
        checkpoint=json.loads((tmp_path / "ahead" / "config.json").read_text())["quantization_config"]
    )
    shape = MOE_MODEL["hidden_size"]  # down_proj's output, one scale per channel
    with pytest.raises(ValueError, match=rf"missing tensor {re.escape(tensor)} \(expected shape \[{shape}\]"):
        load_model(tmp_path / "ahead", device="cpu", quantization=quant)
