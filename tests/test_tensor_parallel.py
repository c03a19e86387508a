"""Tensor parallelism on CPU with gloo: TP=2/4 against TP=1 for a dense and an MoE checkpoint, and a worker
killed mid-generation.

Every TP engine spawns real worker processes (one per rank) that load only their shard; TP=1 is the
in-process engine. Logits are compared over a prefill and decode steps through the paged KV cache, greedy
(and seeded sampled) outputs through the engine. Pre-quantized checkpoints (W4A8 with static C8 scales, and an
MoE with group-wise int4 experts) compare greedy tokens and their logprobs through the engine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import paddle
import pytest
import sentencepiece as spm
import torch
from ernie_engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from ernie_engine.config import ModelConfig
from ernie_engine.distributed.executor import TensorParallelExecutor, WorkerFailure
from ernie_engine.distributed.messages import StepBatch
from ernie_engine.distributed.sharding import ShardPlan, check_quantized, check_supported
from ernie_engine.layers.quant.config import QUANTIZED_SUFFIXES, QuantConfig
from ernie_engine.layers.quant.weights import quantize_weight
from ernie_engine.loader import load_model, paddle_spec
from ernie_engine.outputs import merge_outputs
from safetensors.numpy import load_file, save_file

from scripts.make_random_model import tokenizer_files, train_tokenizer
from tests.process_utils import pid_alive, wait_for
from tests.reference_utils import edit_checkpoint, make_tiny_checkpoint, paged_greedy, scattered_block_tables

BLOCK = 16
NUM_BLOCKS = 64
TOL = 1e-4
NEW_TOKENS = 32
# 8 query heads over 2 KV heads: TP=2 splits the KV heads, TP=4 replicates each over two ranks. A vocab
# of 302 does not split evenly in 4 (76, 76, 76, 74 rows). Tied embeddings: the LM head is the table.
# Biases: column-parallel ones are split with their heads, row-parallel ones (o_proj, down_proj) added once.
DENSE = {"vocab_size": 302, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
         "use_bias": True}
# MoE in layers 1 and 3 (dense MLP in 0 and 2), two shared experts, an untied LM head; 4 heads, 2 KV heads.
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
    assert all(not pid_alive(pid) for pid in executor.worker_pids)


def test_dense_tp2_and_tp4_match_tp1(dense_dir: Path):
    logits, outputs = reference(dense_dir)
    check_tp(dense_dir, 2, logits, outputs)
    check_tp(dense_dir, 4, logits, outputs)


def test_moe_tp2_and_tp4_match_tp1(moe_dir: Path):
    logits, outputs = reference(moe_dir)
    check_tp(moe_dir, 2, logits, outputs)
    check_tp(moe_dir, 4, logits, outputs)  # one query head per rank, KV heads replicated


def test_tied_config_with_a_distinct_lm_head_tp2(dense_dir: Path, tmp_path: Path):
    """Each rank unties as one device does (transformers' rule) when the checkpoint's LM head is not the
    embedding table, and holds its vocabulary columns of that head."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(dense_dir, ckpt)
    head = torch.randn(64, 302, generator=torch.Generator().manual_seed(1)) * 0.5  # -Paddle [in, out]
    edit_checkpoint(ckpt, lambda tensors: tensors.update({"lm_head.weight": head}))
    model, config = load_model(ckpt, device="cpu")
    assert model.lm_head is not None
    _, expected = paged_greedy(model, config, PROMPTS, 4, block_size=BLOCK)
    engine = LLMEngine(engine_config(ckpt, 2))
    try:
        for got, want in zip(executor_greedy(engine.runner, PROMPTS, 4), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("model, quantization", [("dense", "wint8"), ("moe", "wint4"), ("moe", "w4a8")])
def test_quantized_at_load_tp2_matches_tp1(dense_dir: Path, moe_dir: Path, model: str, quantization: str):
    """Row-parallel layers (o_proj, down_proj, experts' down_proj) quantized per rank must get the single
    device's scales: per-channel absmax over the whole input row, groups only where whole on a rank."""
    model_dir = dense_dir if model == "dense" else moe_dir
    expected = generate(LLMEngine(engine_config(model_dir, 1, quantization=quantization)))
    engine = LLMEngine(engine_config(model_dir, 2, quantization=quantization))
    try:
        assert generate(engine) == expected
    finally:
        engine.shutdown()


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


@pytest.mark.parametrize("setting, value", [("quantization", "int3"), ("kv_cache_dtype", "fp8")])
def test_bad_quantization_names_fail_before_any_worker_starts(dense_dir: Path, setting: str, value: str,
                                                              monkeypatch: pytest.MonkeyPatch):
    """As on one device: a ValueError naming the value, without spawning (and failing) a worker per rank."""
    spawned: list = []
    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: spawned.append(args))
    with pytest.raises(ValueError, match=f"unknown {setting} '{value}'"):
        LLMEngine(engine_config(dense_dir, 2, **{setting: value}))
    assert spawned == []


def child_pids() -> set[int]:
    return {int(pid) for pid in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()}


def test_an_engine_failing_after_its_workers_started_stops_them(dense_dir: Path):
    before = child_pids()
    with pytest.raises(ValueError, match="max_position_embeddings") as failed:
        LLMEngine(engine_config(dense_dir, 2, max_model_len=10**7))
    # Stopped at once, not left to the garbage collector (the error's traceback holds the engine).
    assert failed.tb is not None and wait_for(lambda: child_pids() <= before, timeout=30)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        LLMEngine(engine_config(dense_dir, 0))  # was served on one device


def test_int4_needs_an_even_row_parallel_share_per_rank():
    """wint4 / w4a8 pack two input rows per byte: 98 / 2 = 49 rows of down_proj per rank cannot be packed."""
    config = ModelConfig(num_attention_heads=4, head_dim=16, intermediate_size=98, moe_num_experts=6, moe_k=2,
                         moe_intermediate_size=34, moe_num_shared_experts=2)
    check_quantized(config, 2, QuantConfig("wint8", "wint8"))
    check_quantized(config, 1, QuantConfig("wint4", "wint4"))
    with pytest.raises(ValueError, match=r"2 with wint4 .*: intermediate_size 98 gives 49 rows per rank; "
                                         r"moe_intermediate_size 34 gives 17 rows"):  # shared: 68 / 2 is even
        check_quantized(config, 2, QuantConfig("wint4", "wint4"))
    with pytest.raises(ValueError, match=r"w4a8 .*: moe_intermediate_size 34 gives 17 rows per rank, an odd"):
        check_quantized(config, 2, QuantConfig("", "w4a8"))


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
        assert not pid_alive(pids[0])  # the survivor was stopped too
        # New requests fail at once instead of waiting for a model that is gone.
        late = list(engine.add_request("late", prompt_token_ids=PROMPTS[0], sampling_params=params))
        assert late[-1].error
    finally:
        engine.shutdown()


def test_an_error_on_one_rank_breaks_the_group_and_fails_the_step(dense_dir: Path):
    """A rank that raises leaves the others blocked in the next collective until gloo gives up, with another
    error: the group is broken, so the step must fail with WorkerFailure (naming the first error) and the
    executor report unhealthy, not go on as after an error every rank shares. Here rank 0 alone scores
    prompt rows, 256 at a time, and a target outside the vocabulary makes it raise after the first gather
    while rank 1 waits in the second one."""
    engine = LLMEngine(engine_config(dense_dir, 2))
    try:
        executor = engine.runner
        ids = np.random.default_rng(0).integers(3, 300, size=300).astype(np.int64)
        targets = ids[1:].copy()
        targets[0] = executor.vocab_limit + 5
        batch = StepBatch(ids, np.arange(300, dtype=np.int64), [300], [300], [list(range(19))],
                          sample_rows=np.array([299]), greedy=np.array([True]),
                          score_rows=np.arange(299, dtype=np.int64), score_targets=targets, score_top=0)
        started = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"rank 0: step failed: IndexError"):
            executor.run(batch)
        assert time.monotonic() - started < 60  # gloo's timeout (30 s), not STEP_TIMEOUT_S
        with pytest.raises(WorkerFailure):
            engine.check_health()
    finally:
        engine.shutdown()
    assert wait_for(lambda: not any(pid_alive(pid) for pid in executor.worker_pids), timeout=10)


def test_a_rank_loading_half_a_minute_late_still_quantizes_with_the_others(
    dense_dir: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
):
    """Quantizing row-parallel weights at load takes collectives, which gloo abandons after 30 s: a rank that
    finishes loading its shard that much later than the others (a cold disk, a busy host; here stopped for
    32 s right after joining the group) must not fail the start-up."""
    caplog.set_level(logging.INFO, logger="ernie_engine")  # the workers log at the engine's level
    made: list = []

    def start() -> None:
        try:
            made.append(LLMEngine(engine_config(dense_dir, 2, quantization="wint8")))
        except Exception as err:  # reported by the assertion below
            made.append(err)

    threading.Thread(target=start, daemon=True).start()
    logged: list[str] = []  # the workers' stderr

    def rank1_joined() -> bool:
        logged.append(capfd.readouterr().err)
        return "rank 1 of 2 joined the process group" in "".join(logged)

    assert wait_for(rank1_joined, 60, interval=0.01)
    rank1 = int(re.search(r"rank 1 is pid (\d+)", caplog.text)[1])
    os.kill(rank1, signal.SIGSTOP)
    time.sleep(32)
    with suppress(ProcessLookupError):  # stopped for good when the start-up failed
        os.kill(rank1, signal.SIGCONT)
    assert wait_for(lambda: bool(made), 60)
    engine = made[0]
    assert isinstance(engine, LLMEngine), engine
    try:
        assert len(generate(engine)["greedy-0"]) == NEW_TOKENS
    finally:
        engine.shutdown()


# Pre-quantized checkpoints ------------------------------------------------------------------------------

W4A8C8 = {"quantization": "w4a8", "is_quantized": True}  # C8 is switched on by the engine's kv_cache_dtype
# FastDeploy's mix: W4A8 dense projections and shared experts, group-wise int4 (wint4) routed experts.
MIX = {"quantization": "mix_quant", "dense_quant_type": "w4a8", "moe_quant_type": "wint4",
       "is_quantized": True}
EXPERT_GROUP = 16  # routed experts' down_proj: 32 input rows, 2 groups, one per rank at TP=2
# Static C8 absmax per KV head, different enough that handing a rank the other head's scale changes outputs.
KV_ABSMAX = {"k": [1.5, 6.0], "v": [6.0, 1.5]}


def prequantize(src: Path, dst: Path, quantization_config: dict, expert_group: int = -1) -> Path:
    """`src` (-Paddle layout) as a pre-quantized checkpoint in the layout of docs/QUANTIZATION.md: packed int4
    weights with per-channel scales [out] (group-wise [G, out] for routed experts when `expert_group` > 0),
    and static C8 scales per KV head."""
    targets = tuple(f".{suffix}.weight" for suffix in QUANTIZED_SUFFIXES)
    tensors = {}
    for name, value in load_file(str(src / "model.safetensors")).items():
        if not name.endswith(targets):
            tensors[name] = value
            continue
        qw = quantize_weight(paddle.to_tensor(value), 4, expert_group if ".experts." in name else -1)
        base = name.removesuffix(".weight")
        tensors[f"{base}.weight"] = qw.qweight.numpy()
        scale = qw.scale.numpy()
        tensors[f"{base}.weight_scale"] = scale.reshape(-1) if scale.shape[0] == 1 else scale
    config = json.loads((src / "config.json").read_text())
    for layer in range(config["num_hidden_layers"]):
        for kv, absmax in KV_ABSMAX.items():
            tensors[f"ernie.layers.{layer}.self_attn.cache{kv}_matmul.activation_scale"] = np.array(
                absmax, np.float32)
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            (dst / path.name).write_bytes(path.read_bytes())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def greedy_logprobs(engine: LLMEngine) -> dict[str, tuple[list[int], np.ndarray]]:
    """Each prompt's greedy tokens, and the logprobs of its prompt tokens (scored on the ranks) then of its
    output tokens (rows that come back from the ranks as logits)."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0,
                            prompt_logprobs=0)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"p{i}", prompt_token_ids=prompt, sampling_params=params)
    deltas: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            deltas.setdefault(out.request_id, []).append(out)
    merged = {rid: merge_outputs(outs) for rid, outs in deltas.items()}
    return {rid: (out.outputs[0].token_ids, np.array([lp.logprob for lp in out.prompt_logprobs[1:]
                                                      + out.outputs[0].logprobs]))
            for rid, out in merged.items()}


def check_prequantized_tp(model_dir: Path, tp: int, expected: dict, atol: float = TOL, **kw) -> None:
    engine = LLMEngine(engine_config(model_dir, tp, **kw))
    try:
        got = greedy_logprobs(engine)
    finally:
        engine.shutdown()
    for rid, (tokens, logprobs) in expected.items():
        assert got[rid][0] == tokens, rid
        np.testing.assert_allclose(got[rid][1], logprobs, atol=atol, rtol=0)


def test_prequantized_w4a8c8_tp2_matches_tp1(dense_dir: Path, tmp_path: Path):
    """The seed's W4A8C8 rows: int4 weights and per-channel scales split per rank, C8 scales per KV head."""
    ckpt = prequantize(dense_dir, tmp_path / "w4a8c8", W4A8C8)
    expected = greedy_logprobs(LLMEngine(engine_config(ckpt, 1, kv_cache_dtype="int8")))
    fp32_cache = greedy_logprobs(LLMEngine(engine_config(ckpt, 1)))
    assert any(fp32_cache[rid][0] != expected[rid][0] for rid in expected)  # the static C8 scales matter
    assert len(set(expected["p0"][0])) > 3
    # W4A8 rounds activations to int8 per token: a last-bit difference of a row-parallel sum can move one
    # activation to the next int8 level (as one to the next bf16 value for wint4 below).
    check_prequantized_tp(ckpt, 2, expected, atol=2e-2, kv_cache_dtype="int8")


def test_prequantized_moe_with_group_scales_tp2_matches_tp1(tmp_path_factory: pytest.TempPathFactory):
    """Routed experts' group scales split by groups (down_proj) and by channels (up_gate_proj)."""
    float_dir = make_checkpoint(tmp_path_factory.mktemp("tp-moe-paddle"), MOE, "paddle", seed=5)
    ckpt = prequantize(float_dir, tmp_path_factory.mktemp("tp-moe-quant") / "ckpt", MIX, EXPERT_GROUP)
    expected = greedy_logprobs(LLMEngine(engine_config(ckpt, 1)))
    assert len(set(expected["p0"][0])) > 3
    # wint4 experts take bf16-rounded activations (csrc/linear.cc): a last-bit difference of a row-parallel
    # sum can move one element to the next bf16 value (2^-9 relative), so logprobs agree to ~1e-2, not 1e-4.
    check_prequantized_tp(ckpt, 2, expected, atol=2e-2)


def test_shard_plan_splits_quantized_rows_on_byte_and_group_boundaries():
    # TP=4: o_proj has 64 input rows (16 per rank), down_proj 12 (3 per rank: not whole int4 bytes).
    config = ModelConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=8, hidden_size=64,
                         intermediate_size=12, vocab_size=302)
    plan = ShardPlan(config, 1, 4)

    def shard(param: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return plan.shard(paddle_spec(param, shape, config)).shape

    # Row-parallel: 32 int4 bytes -> 8 per rank; 4 groups of 16 rows -> 1; per-channel scales replicated.
    assert shard("layers.0.self_attn.o_proj.weight", (32, 64)) == (8, 64)
    assert shard("layers.0.self_attn.o_proj.weight_scale", (4, 64)) == (1, 64)
    assert shard("layers.0.self_attn.o_proj.weight_scale", (64,)) == (64,)
    # Column-parallel: output channels (and their scales) per part, as for float weights.
    assert shard("layers.0.mlp.up_gate_proj.weight", (32, 24)) == (32, 6)
    assert shard("layers.0.self_attn.qkv_proj.weight_scale", (2, 96)) == (2, 32)  # 2 q heads + 1 kv head
    with pytest.raises(ValueError, match=r"ernie.layers.0.mlp.down_proj.weight has 6 input rows .*int4 byte"):
        shard("layers.0.mlp.down_proj.weight", (6, 64))
    with pytest.raises(ValueError, match=r"down_proj.weight_scale has 2 scale groups, not a multiple of 4"):
        shard("layers.0.mlp.down_proj.weight_scale", (2, 64))
