"""Ernie4_5ForCausalLM against transformers' implementation, from checkpoints in both layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
from ernie_engine.layers.attention import AttentionMetadata
from ernie_engine.loader import load_model
from safetensors import safe_open

from tests.reference_utils import (
    allocate_kv_caches,
    flat_positions,
    make_tiny_checkpoint,
    paged_greedy,
    run_flat,
    torch_greedy,
    torch_logits,
)

TOL = 1e-4
CONFIGS = {
    # MHA, separate lm_head, biases on every projection, rope_theta only inside rope_parameters.
    "untied_bias": {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "tie_word_embeddings": False,
        "use_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    # GQA 4:2, tied embeddings, heads * head_dim (64) != hidden (48), ERNIE's rope_theta and 128K positions.
    "tied_gqa": {
        "max_position_embeddings": 131072,
        "vocab_size": 320,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "use_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
}
CASES = [(name, layout) for name in CONFIGS for layout in ("paddle", "transformers")]


def prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=CASES, ids=[f"{c}-{lay}" for c, lay in CASES])
def case(request, tmp_path_factory):
    torch.set_num_threads(1)
    name, layout = request.param
    path = tmp_path_factory.mktemp(f"{name}-{layout}")
    reference = make_tiny_checkpoint(path, CONFIGS[name], layout=layout, seed=0)
    model, config = load_model(path, device="cpu")
    return reference, model, config


def test_prefill_logits_match_transformers(case):
    reference, model, config = case
    batch = prompts(config.vocab_size, [1, 5, 12, 23])
    for prompt, ours in zip(batch, run_flat(model, batch), strict=True):
        assert np.abs(ours - torch_logits(reference, prompt)).max() < TOL


def test_greedy_with_paged_cache_matches_transformers(case):
    reference, model, config = case
    batch = prompts(config.vocab_size, [3, 9, 17], seed=2)
    tokens, step_logits = paged_greedy(model, config, batch, max_new_tokens=32, block_size=4)
    for prompt, ours, logits in zip(batch, tokens, step_logits, strict=True):
        assert ours == torch_greedy(reference, prompt, 32)
        # The logits of every decode step, against one transformers pass over the whole sequence.
        expected = torch_logits(reference, prompt + ours)[len(prompt) - 1 : -1]
        assert np.abs(logits - expected).max() < TOL


def test_chunked_prefill_next_to_a_new_prompt(case):
    """Sequence 0 prefilled in two chunks through the cache; its second chunk shares a step with a new one."""
    reference, model, config = case
    first, second = prompts(config.vocab_size, [13, 6], seed=3)
    block_size, tables = 4, [[5, 0, 7, 2], [1, 6]]
    caches = allocate_kv_caches(config, num_blocks=8, block_size=block_size)
    steps = [([5], [5], first[:5]), ([8, 6], [13, 6], first[5:] + second)]
    with paddle.no_grad():
        for query_lens, context_lens, ids in steps:
            meta = AttentionMetadata.build(query_lens, context_lens, tables[: len(query_lens)], block_size)
            hidden = model(paddle.to_tensor(ids), flat_positions(query_lens, context_lens), meta, caches)
    logits = model.compute_logits(hidden).numpy()
    assert np.abs(logits[:8] - torch_logits(reference, first)[5:]).max() < TOL
    assert np.abs(logits[8:] - torch_logits(reference, second)).max() < TOL


@pytest.mark.parametrize("offset", [40_000, 131_000])
def test_positions_far_into_a_128k_context_match_transformers(case, offset: int):
    """The 128K rows' positions (rotary angles up to ~1e5 rad, computed in fp32 by both sides): a prompt
    placed at `offset`, prefilled in two chunks through the paged cache, then decoded token by token."""
    reference, model, config = case
    prompt, block_size, table = prompts(config.vocab_size, [11], seed=6)[0], 4, [3, 0, 6, 1, 5, 2, 7, 4]
    caches = allocate_kv_caches(config, num_blocks=len(table), block_size=block_size)
    steps = [(prompt[:6], 6), (prompt[6:], 11)] + [([t], 12 + i) for i, t in enumerate(prompt[:8])]
    rows = []
    with paddle.no_grad():
        for ids, context in steps:
            meta = AttentionMetadata.build([len(ids)], [context], [table], block_size)
            positions = flat_positions([len(ids)], [context]) + offset
            rows.append(model.compute_logits(model(paddle.to_tensor(ids), positions, meta, caches)).numpy())
    with torch.no_grad():
        sequence = torch.tensor([prompt + prompt[:8]])
        expected = reference(sequence, position_ids=torch.arange(offset, offset + 19)[None]).logits[0]
    assert np.abs(np.concatenate(rows) - expected.numpy()).max() < TOL


@pytest.mark.parametrize("layout", ["paddle", "transformers"])
def test_bf16_checkpoint_loads_as_fp32_and_matches(tmp_path: Path, layout: str):
    reference = make_tiny_checkpoint(tmp_path, CONFIGS["tied_gqa"], layout=layout, dtype="bfloat16", seed=4)
    with safe_open(str(tmp_path / "model.safetensors"), framework="paddle") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}  # noqa: SIM118
    # fp32 explicitly: the default keeps bf16 weights for the CPU kernels, which round activations to bf16
    # (tests/test_cpu_kernels.py holds that path to its own reference).
    model, config = load_model(tmp_path, device="cpu", dtype="float32")
    assert {str(p.dtype) for p in model.parameters()} == {"paddle.float32"}
    batch = prompts(config.vocab_size, [4, 11], seed=5)
    for prompt, ours in zip(batch, run_flat(model, batch), strict=True):
        assert np.abs(ours - torch_logits(reference, prompt)).max() < TOL
