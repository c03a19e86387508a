"""Checkpoint loading: strict checks with named tensors and shapes, sharding, corrupt files, config styles."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
from ernie_engine.config import ModelConfig
from ernie_engine.loader import (
    PADDLE,
    TRANSFORMERS,
    Checkpoint,
    Piece,
    load_model,
    paddle_spec,
    plan_parameters,
    transformers_spec,
)
from ernie_engine.models.registry import get_model_class
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.reference_utils import edit_checkpoint, make_tiny_checkpoint, run_flat, torch_logits

# GQA (4 heads, 2 KV heads of 16) on hidden 48: q 64, k/v 32 wide; intermediate 96.
CONFIG = {
    "vocab_size": 200,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
PROMPT = list(range(3, 40, 2))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    torch.set_num_threads(1)
    made = {}
    for layout in (PADDLE, TRANSFORMERS):
        path = tmp_path_factory.mktemp(layout)
        made[layout] = (path, make_tiny_checkpoint(path, CONFIG, layout=layout, seed=7))
    return made


@pytest.fixture
def checkpoint(pristine, tmp_path, request) -> Path:
    """A private copy of the pristine checkpoint of layout `request.param` (tests break it)."""
    target = tmp_path / "ckpt"
    shutil.copytree(pristine[request.param][0], target)
    return target


def assert_loads_and_matches(path: Path, reference: torch.nn.Module) -> None:
    model, _ = load_model(path, device="cpu")
    assert np.abs(run_flat(model, [PROMPT])[0] - torch_logits(reference, PROMPT)).max() < 1e-4


@pytest.mark.parametrize(
    ("checkpoint", "tensor", "shape"),
    [
        (PADDLE, "ernie.layers.1.mlp.down_proj.weight", "[96, 48]"),
        (PADDLE, "ernie.layers.0.self_attn.qkv_proj.weight", "[48, 128]"),
        (TRANSFORMERS, "model.layers.0.self_attn.k_proj.weight", "[32, 48]"),
        (TRANSFORMERS, "model.norm.weight", "[48]"),
    ],
    indirect=["checkpoint"],
)
def test_missing_tensor_is_named_with_its_shape(checkpoint: Path, tensor: str, shape: str):
    edit_checkpoint(checkpoint, lambda tensors: tensors.pop(tensor))
    with pytest.raises(
        ValueError, match=rf"missing tensor {re.escape(tensor)} \(expected shape {re.escape(shape)}"
    ):
        load_model(checkpoint, device="cpu")


@pytest.mark.parametrize(
    ("checkpoint", "tensor", "found", "expected"),
    [
        (PADDLE, "ernie.layers.0.self_attn.qkv_proj.weight", [48, 96], "[48, 128]"),
        (PADDLE, "ernie.embed_tokens.weight", [199, 48], "[200, 48]"),
        (TRANSFORMERS, "model.layers.1.self_attn.v_proj.weight", [16, 48], "[32, 48]"),
        (TRANSFORMERS, "model.layers.0.mlp.up_proj.weight", [48, 96], "[96, 48]"),  # transposed by mistake
    ],
    indirect=["checkpoint"],
)
def test_wrong_shape_names_tensor_found_and_expected(
    checkpoint: Path, tensor: str, found: list, expected: str
):
    edit_checkpoint(checkpoint, lambda tensors: tensors.update({tensor: torch.zeros(found)}))
    message = rf"tensor {re.escape(tensor)} has shape {re.escape(str(found))}, expected {re.escape(expected)}"
    with pytest.raises(ValueError, match=message):
        load_model(checkpoint, device="cpu")


@pytest.mark.parametrize("checkpoint", [PADDLE], indirect=True)
def test_unexpected_tensor_is_named(checkpoint: Path):
    edit_checkpoint(
        checkpoint, lambda tensors: tensors.update({"ernie.layers.0.extra.weight": torch.zeros(3, 5)})
    )
    with pytest.raises(
        ValueError, match=r"unexpected tensor ernie\.layers\.0\.extra\.weight \(shape \[3, 5\]\)"
    ):
        load_model(checkpoint, device="cpu")


@pytest.mark.parametrize("checkpoint", [PADDLE], indirect=True)
def test_all_problems_reported_together(checkpoint: Path):
    def edit(tensors):
        tensors.pop("ernie.norm.weight")
        tensors["ernie.layers.1.input_layernorm.weight"] = torch.zeros(47)
        tensors["ernie.bogus"] = torch.zeros(2)

    edit_checkpoint(checkpoint, edit)
    with pytest.raises(ValueError, match=r"3 problem") as err:
        load_model(checkpoint, device="cpu")
    for part in (
        "missing tensor ernie.norm.weight",
        "ernie.layers.1.input_layernorm.weight has shape [47]",
        "ernie.bogus",
    ):
        assert part in str(err.value)


@pytest.mark.parametrize("checkpoint", [PADDLE, TRANSFORMERS], indirect=True)
def test_mtp_and_tied_lm_head_are_skipped_knowingly(checkpoint: Path, pristine, request, caplog):
    layout = request.node.callspec.params["checkpoint"]
    prefix = "ernie." if layout == PADDLE else "model."

    def edit(tensors):
        tensors[f"{prefix}mtp_emb_norm.0.weight"] = torch.ones(48)
        tensors[f"{prefix}mtp_block.0.self_attn.o_proj.weight"] = torch.zeros(48, 64)
        tensors["lm_head.weight"] = tensors[f"{prefix}embed_tokens.weight"].clone()  # tied: redundant copy

    edit_checkpoint(checkpoint, edit)
    with caplog.at_level(logging.INFO, logger="ernie_engine.loader"):
        assert_loads_and_matches(checkpoint, pristine[layout][1])
    assert "skipping 3 checkpoint tensors" in caplog.text


@pytest.mark.parametrize("checkpoint", [PADDLE, TRANSFORMERS], indirect=True)
def test_tied_config_with_a_distinct_lm_head_uses_it_as_transformers(
    checkpoint: Path, pristine, request, tmp_path: Path
):
    """config.json says tie_word_embeddings, but the checkpoint holds an LM head that is not the embedding
    table: transformers then does not tie (the config is wrong) and its logits come from the stored head."""
    head = torch.randn(200, 48, generator=torch.Generator().manual_seed(1)) * 48**-0.5
    hf_dir = tmp_path / "hf"
    shutil.copytree(pristine[TRANSFORMERS][0], hf_dir)
    edit_checkpoint(hf_dir, lambda tensors: tensors.update({"lm_head.weight": head}))
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert reference.config.tie_word_embeddings and not np.allclose(
        torch_logits(reference, PROMPT), torch_logits(pristine[TRANSFORMERS][1], PROMPT), atol=1e-2
    )
    layout = request.node.callspec.params["checkpoint"]
    stored = head.t().contiguous() if layout == PADDLE else head  # -Paddle Linear: [in, out]
    edit_checkpoint(checkpoint, lambda tensors: tensors.update({"lm_head.weight": stored}))
    assert_loads_and_matches(checkpoint, reference)


@pytest.mark.parametrize("checkpoint", [PADDLE], indirect=True)
def test_garbage_file_is_named(checkpoint: Path):
    (checkpoint / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match=r"corrupt or unreadable safetensors file .*model\.safetensors"):
        load_model(checkpoint, device="cpu")


@pytest.mark.parametrize("checkpoint", [TRANSFORMERS], indirect=True)
def test_truncated_file_is_named(checkpoint: Path):
    file = checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"corrupt or unreadable safetensors file .*model\.safetensors"):
        load_model(checkpoint, device="cpu")


@pytest.mark.parametrize("layout", [PADDLE, TRANSFORMERS])
def test_sharded_checkpoint_with_index(tmp_path: Path, layout: str, caplog):
    reference = make_tiny_checkpoint(tmp_path, CONFIG, layout=layout, seed=7, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (tmp_path / "model.safetensors").exists()
    with caplog.at_level(logging.DEBUG, logger="ernie_engine.loader"):
        assert_loads_and_matches(tmp_path, reference)
    assert f"(file {len(files)}/{len(files)})" in caplog.text and "100% of the weights" in caplog.text


def test_index_naming_a_missing_shard(tmp_path: Path):
    make_tiny_checkpoint(tmp_path, CONFIG, layout=PADDLE, max_shard_bytes=40_000)
    lost = sorted(tmp_path.glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(lost.name)):
        load_model(tmp_path, device="cpu")


def test_index_disagreeing_with_shards(tmp_path: Path):
    make_tiny_checkpoint(tmp_path, CONFIG, layout=PADDLE, max_shard_bytes=40_000)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"places tensor {re.escape(name)} in {re.escape(files[1])}"):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("checkpoint", [TRANSFORMERS], indirect=True)
def test_rope_theta_inside_rope_parameters(checkpoint: Path, pristine):
    raw = json.loads((checkpoint / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == 10000.0
    model, config = load_model(checkpoint, device="cpu")
    assert config.rope_theta == 10000.0 and model.rotary_emb.theta == 10000.0
    assert_loads_and_matches(checkpoint, pristine[TRANSFORMERS][1])  # ERNIE's default 500000 would not match


@pytest.mark.parametrize("checkpoint", [PADDLE], indirect=True)
def test_paddle_config_style_with_top_level_rope_theta(checkpoint: Path):
    raw = json.loads((checkpoint / "config.json").read_text())
    assert raw["rope_theta"] == 10000.0 and "rope_parameters" not in raw
    assert raw["architectures"] == ["Ernie4_5_ForCausalLM"]
    assert ModelConfig.from_dir(checkpoint).rope_theta == 10000.0


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128},
    ],
    ids=lambda rope: rope["rope_type"],
)
def test_rope_scaling_is_refused_not_ignored(tmp_path: Path, rope: dict):
    """transformers scales these positions (its logits differ grossly from plain rotary); serving the
    checkpoint with plain rotary would be silently wrong, so the load fails naming the scaling."""
    make_tiny_checkpoint(tmp_path, CONFIG | {"rope_parameters": rope}, layout=TRANSFORMERS, seed=7)
    with pytest.raises(ValueError, match=re.escape(f"rope_type '{rope['rope_type']}' (rope scaling)")):
        load_model(tmp_path, device="cpu")
    legacy = {"hidden_size": 48, "num_attention_heads": 4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        ModelConfig.from_dict(legacy)


def test_an_activation_other_than_silu_is_refused():
    raw = {"hidden_size": 48, "num_attention_heads": 4}
    assert ModelConfig.from_dict(raw | {"hidden_act": "silu"}).hidden_act == "silu"
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        ModelConfig.from_dict(raw | {"hidden_act": "gelu"})


@pytest.mark.parametrize("checkpoint", [PADDLE], indirect=True)
def test_unknown_layout_is_refused(checkpoint: Path):
    edit_checkpoint(checkpoint, lambda t: t.update({k.removeprefix("ernie."): t.pop(k) for k in list(t)}))
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        load_model(checkpoint, device="cpu")


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unsupported architecture 'LlamaForCausalLM'"):
        get_model_class("LlamaForCausalLM")


def test_fused_parameters_are_planned_as_parts_in_both_layouts():
    """What a tensor-parallel shard hook builds on: q/k/v and gate/up are separate pieces in both layouts."""
    config = ModelConfig.from_dict({**CONFIG, "architectures": ["Ernie4_5ForCausalLM"]})
    qkv, up_gate = (48, 128), (48, 192)
    paddle_qkv = paddle_spec("layers.0.self_attn.qkv_proj.weight", qkv, config)
    assert [(p.tensor, p.start, p.stop) for p in paddle_qkv.pieces] == [
        ("ernie.layers.0.self_attn.qkv_proj.weight", 0, 64),
        ("ernie.layers.0.self_attn.qkv_proj.weight", 64, 96),
        ("ernie.layers.0.self_attn.qkv_proj.weight", 96, 128),
    ]
    hf_up_gate = transformers_spec("layers.0.mlp.up_gate_proj.weight", up_gate, config)
    assert [(p.tensor, p.shape, p.transpose) for p in hf_up_gate.pieces] == [
        ("model.layers.0.mlp.gate_proj.weight", (96, 48), True),
        ("model.layers.0.mlp.up_proj.weight", (96, 48), True),
    ]
    specs = plan_parameters({"embed_tokens.weight": (200, 48)}, config, TRANSFORMERS)
    assert specs[0].pieces[0].transpose is False


@pytest.mark.parametrize("checkpoint", [PADDLE, TRANSFORMERS], indirect=True)
def test_pieces_read_ranges_in_parameter_orientation(checkpoint: Path, request):
    """Ranges count in our [in, out] orientation, also for transposed transformers tensors (TP slices)."""
    stored = load_file(checkpoint / "model.safetensors")
    if request.node.callspec.params["checkpoint"] == PADDLE:
        name = "ernie.layers.0.self_attn.qkv_proj.weight"
        piece, expected = Piece(name, (48, 128), axis=1, start=64, stop=96), stored[name][:, 64:96]
    else:
        name = "model.layers.0.self_attn.q_proj.weight"
        piece = Piece(name, (64, 48), transpose=True, axis=1, start=16, stop=32)
        expected = stored[name].t()[:, 16:32]
    with Checkpoint(checkpoint) as ckpt:
        value = ckpt.read(piece, paddle.float32)
    assert value.dtype == paddle.float32 and np.array_equal(value.numpy(), expected.numpy())


MOE = {
    **{k: v for k, v in CONFIG.items() if k != "rope_parameters"},
    "model_type": "ernie4_5_moe",
    "moe_num_experts": 6,
    "moe_k": 2,
    "moe_intermediate_size": 32,
    "moe_layer_start_index": 1,
}


@pytest.mark.parametrize("layout", [PADDLE, TRANSFORMERS])
def test_moe_without_correction_bias_when_not_aux_free(tmp_path: Path, layout: str):
    """A MoE trained with an auxiliary loss (`moe_use_aux_free: false`) ships no router correction bias:
    transformers fills it with zeros (vLLM builds none), so the router is plain top-k, not a load error."""
    reference = make_tiny_checkpoint(tmp_path, MOE, layout=layout, seed=3)
    biased = torch_logits(reference, PROMPT)
    edit_checkpoint(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.endswith("e_score_correction_bias")])
    with pytest.raises(ValueError, match=r"missing tensor .*layers\.1\.mlp\.moe_statics"):
        load_model(tmp_path, device="cpu")  # no moe_use_aux_free key: released MoEs ship the bias
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"moe_use_aux_free": False}))
    with torch.no_grad():
        reference.model.layers[1].mlp.gate.moe_statics.e_score_correction_bias.zero_()
    assert np.abs(torch_logits(reference, PROMPT) - biased).max() > 1e-3  # the bias did change routing
    assert_loads_and_matches(tmp_path, reference)
