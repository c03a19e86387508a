"""Tensor parallelism on CPU with gloo: TP=2/4 against TP=1 for a dense and an MoE checkpoint, and a worker
killed mid-generation.

Every TP engine spawns real worker processes (one per rank) that load only their shard; TP=1 is the
in-process engine. Logits are compared over a prefill and decode steps through the paged KV cache, greedy
(and seeded sampled) outputs through the engine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from ernie_engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from ernie_engine.config import ModelConfig
from ernie_engine.distributed.executor import TensorParallelExecutor, WorkerFailure
from ernie_engine.distributed.messages import StepBatch
from ernie_engine.distributed.sharding import ShardPlan, check_supported
from ernie_engine.loader import load_model
from ernie_engine.outputs import merge_outputs

from scripts.make_random_model import tokenizer_files, train_tokenizer
from tests.reference_utils import edit_checkpoint, make_tiny_checkpoint, paged_greedy, scattered_block_tables

BLOCK = 16
NUM_BLOCKS = 64
TOL = 1e-4
NEW_TOKENS = 32
# 8 query heads over 2 KV heads: TP=2 splits the KV heads, TP=4 replicates each over two ranks. A vocab
# of 302 does not split evenly in 4 (76, 76, 76, 74 rows). Tied embeddings: the LM head is the table.
DENSE = {"vocab_size": 302, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8}
# MoE in layers 1 and 3 (dense MLP in 0 and 2), two shared experts, an untied LM head.
MOE = {
    "model_type": "ernie4_5_moe",
    "vocab_size": 300,
    "num_hidden_layers": 4,
    "intermediate_size": 96,
    "moe_num_experts": 6,
    "moe_k": 2,
    "moe_intermediate_size": 32,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_layer_interval": 2,
    "tie_word_embeddings": False,
}
PROMPTS = [np.random.default_rng(i).integers(3, 300, size=n).tolist() for i, n in enumerate((9, 23, 4))]


def make_checkpoint(path: Path, overrides: dict, layout: str, seed: int) -> Path:
    """A tiny random checkpoint with a tokenizer. Layer weights are scaled up so that the next token depends
    on the whole context (at the reference init scale greedy decoding just repeats the last token)."""
    make_tiny_checkpoint(path, overrides, layout=layout, seed=seed)
    edit_checkpoint(path, lambda t: t.update({k: v * 4.0 for k, v in t.items() if _scaled(k)}))
    model_bytes = train_tokenizer(3000, 0)
    (path / "tokenizer.model").write_bytes(model_bytes)
    for name, content in tokenizer_files(spm.SentencePieceProcessor(model_proto=model_bytes), "ernie-4.5",
                                         512).items():
        (path / name).write_text(json.dumps(content))
    return path


def _scaled(name: str) -> bool:
    return "layers." in name and "norm" not in name and "moe_statics" not in name


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_checkpoint(tmp_path_factory.mktemp("tp-dense"), DENSE, "paddle", seed=3)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_checkpoint(tmp_path_factory.mktemp("tp-moe"), MOE, "transformers", seed=5)


def engine_config(model_dir: Path, tp: int, **kw) -> EngineConfig:
    args = dict(num_gpu_blocks_override=NUM_BLOCKS, block_size=BLOCK, max_model_len=512, max_num_seqs=8,
                enable_prefix_caching=False)
    return EngineConfig(model=str(model_dir), tensor_parallel_size=tp, **{**args, **kw})


def generate(engine: LLMEngine) -> dict[str, list[int]]:
    """The prompts greedily plus one seeded sampled request (its rows come back as logits), batched."""
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"greedy-{i}", prompt_token_ids=prompt, sampling_params=greedy)
    engine.add_request("sampled", prompt_token_ids=PROMPTS[0], sampling_params=sampled)
    deltas: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            deltas.setdefault(out.request_id, []).append(out)
    return {rid: merge_outputs(outs).outputs[0].token_ids for rid, outs in deltas.items()}


def executor_greedy(
    executor: TensorParallelExecutor, prompts: list[list[int]], steps: int
) -> list[np.ndarray]:
    """`reference_utils.paged_greedy` through the workers (same block tables); logits [steps, vocab]."""
    blocks_per_seq = -(-(max(map(len, prompts)) + steps) // BLOCK)
    tables = scattered_block_tables(len(prompts), blocks_per_seq)
    context = [len(p) for p in prompts]
    query_lens, ids = list(context), np.concatenate(prompts).astype(np.int64)
    seen: list[list[np.ndarray]] = [[] for _ in prompts]
    for _ in range(steps):
        positions = np.concatenate([np.arange(c - q, c) for q, c in zip(query_lens, context, strict=True)])
        batch = StepBatch(ids, positions.astype(np.int64), query_lens, context, tables,
                          sample_rows=np.cumsum(query_lens) - 1, greedy=np.zeros(len(prompts), dtype=bool))
        logits = executor.run(batch).logits
        for rows, row in zip(seen, logits, strict=True):
            rows.append(row)
        ids = logits.argmax(axis=1).astype(np.int64)
        query_lens, context = [1] * len(prompts), [c + 1 for c in context]
    return [np.stack(rows) for rows in seen]


def reference(model_dir: Path) -> tuple[list[np.ndarray], dict[str, list[int]]]:
    """TP=1: logits through the paged cache (in process) and the engine's outputs."""
    model, config = load_model(model_dir, device="cpu")
    _, logits = paged_greedy(model, config, PROMPTS, 8, block_size=BLOCK)
    return logits, generate(LLMEngine(engine_config(model_dir, 1)))


def check_tp(model_dir: Path, tp: int, expected_logits: list[np.ndarray], expected: dict) -> None:
    engine = LLMEngine(engine_config(model_dir, tp))
    try:
        executor = engine.runner
        assert isinstance(executor, TensorParallelExecutor)
        for got, want in zip(executor_greedy(executor, PROMPTS, 8), expected_logits, strict=True):
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        outputs = generate(engine)
        assert outputs == expected
        assert len(set(outputs["greedy-0"])) > 3  # the model is context-dependent, not a repeater
        engine.check_health()
    finally:
        engine.shutdown()
    assert all(not _alive(pid) for pid in executor.worker_pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dense_tp2_and_tp4_match_tp1(dense_dir: Path):
    logits, outputs = reference(dense_dir)
    check_tp(dense_dir, 2, logits, outputs)
    check_tp(dense_dir, 4, logits, outputs)


def test_moe_tp2_matches_tp1(moe_dir: Path):
    logits, outputs = reference(moe_dir)
    check_tp(moe_dir, 2, logits, outputs)


def test_shard_plan_heads_and_vocab():
    """The slices behind the engine tests: KV heads split or replicated, uneven vocab, bad sizes refused."""
    config = ModelConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=8, hidden_size=64,
                         intermediate_size=128, vocab_size=302)
    plans = [ShardPlan(config, r, 4) for r in range(4)]
    assert [p.q_heads for p in plans] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [p.kv_heads for p in plans] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [p.vocab for p in plans] == [(0, 76), (76, 152), (152, 228), (228, 302)]
    assert [ShardPlan(config, r, 2).kv_heads for r in range(2)] == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="num_attention_heads 8 is not a multiple"):
        check_supported(config, 3)


def test_killed_worker_fails_the_request_and_the_health_check(dense_dir: Path):
    engine = AsyncLLMEngine(engine_config(dense_dir, 2))
    try:
        pids = engine.engine.runner.worker_pids
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        stream = iter(engine.add_request("long", prompt_token_ids=PROMPTS[1], sampling_params=params))
        next(stream)  # generating
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        outputs = list(stream)
        assert time.monotonic() - killed < 10
        assert outputs[-1].finished and outputs[-1].error and "rank 1" in outputs[-1].error
        with pytest.raises(WorkerFailure, match="rank 1 .* killed by signal SIGKILL"):
            engine.check_health()
        assert not _alive(pids[0])  # the survivor was stopped too
        # New requests fail at once instead of waiting for a model that is gone.
        late = list(engine.add_request("late", prompt_token_ids=PROMPTS[0], sampling_params=params))
        assert late[-1].error
    finally:
        engine.shutdown()
