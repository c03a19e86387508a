"""Multimodal models under tensor parallelism on CPU with gloo: TP=2 against TP=1 through the engine.

Tiny random checkpoints from scripts/: ERNIE-4.5-VL (-Paddle layout: dense first layer, then modality-isolated
MoE whose text and vision experts have different widths, a shared expert, two routers) and PaddleOCR-VL
(shipped layout: separate q/k/v split per rank, then q/k interleaved per local head). A request with two
images is chunked around them (each image in its own step, so each step carries only its image's patches to
the ranks) and batched with a text request. Both engines sample through their Sampler with logprobs on, so
every sampled row is a full logits row on both sides: they must agree within 1e-4 and the greedy tokens must
be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ernie_engine.config import EngineConfig, ModelConfig
from ernie_engine.distributed.executor import TensorParallelExecutor
from ernie_engine.distributed.sharding import ShardPlan, check_supported
from ernie_engine.llm_engine import LLMEngine
from ernie_engine.loader import ParamSpec, Piece
from ernie_engine.sampling_params import SamplingParams

from tests.media_utils import data_url, draw
from tests.multimodal_utils import make_checkpoint, run_engine
from tests.process_utils import pid_alive

TOL = 1e-4
NUM_TOKENS = 16
BUDGET = 24  # max_num_batched_tokens: smaller than an image (32 placeholders), so chunks end at images
IMAGES = [draw("ERNIE 4.5 VL", size=(224, 112)), draw("tensor parallel", size=(224, 112))]
CHECKPOINTS = {"ernie-4.5-vl": "make_random_vl_model.py", "paddleocr-vl": "make_random_ocr_model.py"}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(CHECKPOINTS[request.param], tmp_path_factory.mktemp("tp-mm") / request.param)


def engine_config(model_dir: Path, tp: int) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir),
        tensor_parallel_size=tp,
        max_model_len=512,
        max_num_batched_tokens=BUDGET,
        block_size=16,
        num_gpu_blocks_override=64,
        dtype="float32",
        limit_mm_per_prompt={"image": len(IMAGES)},
    )


def requests() -> dict[str, dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in IMAGES]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare the two images"}]}]
    return {
        "images": {"messages": messages, "chat_template_kwargs": {"enable_thinking": False}},
        "text": {"messages": [{"role": "user", "content": "The weather today is sunny"}]},
    }


def serve(engine: LLMEngine) -> tuple[dict[str, list[int]], dict[str, list[np.ndarray]], list[dict]]:
    """Greedy tokens, the logits row each token was sampled from, and the schedule of every request."""
    sampler = engine.runner.sampler
    logits: dict[str, list[np.ndarray]] = {}

    def recording_sampler(rows: np.ndarray, seqs: list) -> list:
        for seq, row in zip(seqs, rows, strict=True):
            logits.setdefault(seq.request.request_id, []).append(np.array(row))
        return sampler(rows, seqs)

    engine.runner.sampler = recording_sampler
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    try:
        tokens, steps = run_engine(engine, requests(), params)
    finally:
        engine.runner.sampler = sampler
    return tokens, logits, steps


def test_tp2_matches_tp1_on_an_image_request(checkpoint: Path) -> None:
    expected_tokens, expected_logits, expected_steps = serve(LLMEngine(engine_config(checkpoint, 1)))
    engine = LLMEngine(engine_config(checkpoint, 2))
    try:
        assert isinstance(engine.runner, TensorParallelExecutor)
        tokens, logits, steps = serve(engine)
        engine.check_health()
    finally:
        engine.shutdown()
    assert not any(pid_alive(pid) for pid in engine.runner.worker_pids)
    assert steps == expected_steps  # same chunks, so the same vision passes and batches
    # Two images, each prefilled in a step of its own: the step media carried one image at a time.
    image_steps = [step["images"] for step in steps if step.get("images", (0, 0))[1] >= 32]
    assert len(image_steps) >= 2, steps
    assert tokens == expected_tokens
    assert all(len(t) == NUM_TOKENS for t in tokens.values())
    assert len(set(tokens["images"])) > 3  # not a repeater
    for rid, rows in expected_logits.items():
        assert len(logits[rid]) == len(rows) == NUM_TOKENS
        np.testing.assert_allclose(np.stack(logits[rid]), np.stack(rows), atol=TOL, rtol=0, err_msg=rid)


def test_shard_plan_replicates_vision_and_splits_both_expert_widths() -> None:
    config = ModelConfig(architecture="Ernie4_5_VLMoeForConditionalGeneration", num_attention_heads=8,
                         num_key_value_heads=8, head_dim=16, hidden_size=128, intermediate_size=256,
                         vocab_size=1000, moe_num_experts=[4, 4], moe_intermediate_size=[32, 20])
    plan = ShardPlan(config, 1, 2)
    assert plan.local_config().moe_intermediate_size == [16, 10]  # text, vision experts
    fc1 = "vision_model.blocks.0.mlp.fc1.weight"
    vision = ParamSpec(fc1, (48, 192), (Piece(fc1, (48, 192)),))
    assert plan.shard(vision) == vision
    down = ParamSpec("language_model.layers.1.mlp.vision_moe.experts.down_proj", (20, 128),
                     (Piece("ernie.layers.1.mlp.experts.5.down_proj.weight", (20, 128)),), index=1)
    assert plan.shard(down).pieces[0].start == 10 and plan.shard(down).shape == (10, 128)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \[32, 20\] is not a multiple"):
        check_supported(config, 8)  # 20 vision columns over 8 ranks
