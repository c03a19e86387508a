"""The engine end to end on a tiny random checkpoint: batching, caching, preemption, sampling, async.

Greedy outputs of a request run alone are the reference: whatever else the engine does (batching with
others, chunking, prefix hits, preemption and recompute) must not change them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from ernie_engine import LLM, AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from ernie_engine.outputs import RequestOutput, merge_outputs
from safetensors.paddle import load_file, save_file

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def model_dir(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random checkpoint with its layer weights scaled up. At the generator's init scale the residual
    stream is the input embedding and greedy decoding repeats the last token; scaled, the next token
    depends on the whole context, so a wrong cache, position or mask changes the output."""
    out = tmp_path_factory.mktemp("engine") / "ckpt"
    shutil.copytree(random_model_dir, out)
    weights = load_file(str(random_model_dir / "model.safetensors"))
    scaled = {k: v.astype("float32") * (1.0 if ("norm" in k or "embed" in k) else 20.0)
              for k, v in weights.items()}
    save_file(scaled, str(out / "model.safetensors"))
    return out


def make_engine(model_dir: Path, **kw) -> LLMEngine:
    args = {"num_gpu_blocks_override": 128, "block_size": BLOCK, "max_model_len": 512, "max_num_seqs": 16}
    return LLMEngine(EngineConfig(model=str(model_dir), **{**args, **kw}))


PROMPTS = [np.random.default_rng(i).integers(10, 2900, size=5 + 5 * i).tolist() for i in range(16)]


def run(engine: LLMEngine, prompts: list, params: SamplingParams = GREEDY) -> list[RequestOutput]:
    """Add all prompts at once, step to the end, merge each request's deltas."""
    ids = [f"req-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
        engine.add_request(rid, sampling_params=params, **{key: prompt})
    deltas: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id].append(out)
    return [merge_outputs(deltas[rid]) for rid in ids]


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_leak(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


@pytest.fixture(scope="module")
def alone(model_dir: Path) -> list[list[int]]:
    engine = make_engine(model_dir, enable_prefix_caching=False)
    return [tokens(run(engine, [p]))[0] for p in PROMPTS]


# Scheduling must not change results -------------------------------------------------------------------


def test_batch_invariance(model_dir, alone):
    engine = make_engine(model_dir)
    outs = run(engine, PROMPTS)
    assert tokens(outs) == alone
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 10 for o in outs)
    assert_no_leak(engine)


def test_prefix_cache_serves_a_repeated_prompt(model_dir, alone):
    engine = make_engine(model_dir)
    first = run(engine, [PROMPTS[15]])[0]  # 80 tokens: 4 full blocks can be reused
    before = engine.get_metrics()["prefix_cache_token_num"]
    second = run(engine, [PROMPTS[15]])[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 64
    assert engine.get_metrics()["prefix_cache_token_num"] - before == 64
    assert tokens([first]) == tokens([second]) == [alone[15]]
    assert_no_leak(engine)


def test_preemption_recomputes_to_the_same_outputs(model_dir, alone):
    # 16 blocks (256 tokens) cannot hold the 16 requests (~760 tokens) at once.
    engine = make_engine(model_dir, num_gpu_blocks_override=16, max_model_len=256)
    outs = run(engine, PROMPTS)
    assert engine.get_metrics()["request_preempted_total"] > 0
    assert tokens(outs) == alone
    assert_no_leak(engine)


@pytest.mark.parametrize("kw", [{"max_num_batched_tokens": 24}, {"max_num_batched_tokens": 64,
                                                                  "enable_max_prefill": True}])
def test_chunked_and_max_prefill_give_the_same_outputs(model_dir, alone, kw):
    engine = make_engine(model_dir, **kw)
    outs = run(engine, PROMPTS)
    assert tokens(outs) == alone
    assert_no_leak(engine)


def test_kv_cache_dtype_follows_the_weights(model_dir):
    """The float cache holds the Linear weights' dtype - bf16 for this bf16-declared checkpoint, so the tests
    above run on bf16 caches; fp32 when dtype asks for it - unless kv_cache_dtype names one. bf16 takes half
    the bytes per token; an fp32 cache keeps batch invariance too."""
    bf16 = make_engine(model_dir, num_gpu_blocks_override=4)
    assert bf16.runner.kv_dtype == "bfloat16" and bf16.runner.kv_caches[0][0].dtype == paddle.bfloat16
    assert make_engine(model_dir, dtype="float32", num_gpu_blocks_override=4).runner.kv_dtype == "float32"
    fp32 = make_engine(model_dir, kv_cache_dtype="float32", enable_prefix_caching=False)
    assert fp32.runner.kv_caches[0][0].dtype == paddle.float32
    assert 2 * bf16.runner.kv_bytes_per_token() == fp32.runner.kv_bytes_per_token()
    prompts = PROMPTS[::3]
    alone_fp32 = [tokens(run(fp32, [p]))[0] for p in prompts]
    assert tokens(run(fp32, prompts)) == alone_fp32
    assert_no_leak(fp32)


def test_abort_mid_generation_frees_every_block(model_dir):
    engine = make_engine(model_dir, enable_prefix_caching=False)
    engine.add_request("a", prompt_token_ids=PROMPTS[10],
                       sampling_params=SamplingParams(max_tokens=100, logprobs=0))
    engine.add_request("b", prompt_token_ids=PROMPTS[3], sampling_params=GREEDY)
    streamed = [o for _ in range(4) for o in engine.step() if o.request_id == "a"]
    used = engine.block_manager.num_used_blocks
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    # The final output carries the running cumulative logprob on (it was None: NaN through Triton).
    assert out.outputs[0].cumulative_logprob == streamed[-1].outputs[0].cumulative_logprob < 0
    assert engine.block_manager.num_used_blocks < used
    while engine.has_unfinished():
        engine.step()
    assert_no_leak(engine)
    assert engine.abort("a") is None


# Sampling parameters through the engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(model_dir) -> LLMEngine:
    return make_engine(model_dir)


def one(engine: LLMEngine, prompt, **params) -> RequestOutput:
    return run(engine, [prompt], SamplingParams(**params))[0]


def test_generation_config_defaults_fill_unset_fields(engine):
    request = engine.make_request("x", prompt="hello", sampling_params=SamplingParams(top_p=0.5))
    assert request.params.temperature == 0.8  # generation_config.json
    assert request.params.top_p == 0.5  # the request's own value wins
    assert request.params.top_k == 0 and request.params.repetition_penalty == 1.0


def test_generation_config_max_new_tokens_is_the_default_max_tokens(model_dir: Path, tmp_path: Path):
    """vLLM: max_new_tokens of generation_config.json is the default max_tokens (not a cap of the request's),
    within max_model_len; min_tokens above the resolved max_tokens is refused."""
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_new_tokens": 3}))
    engine = make_engine(tmp_path)

    def produced(prompt: list[int], **params) -> int:
        out = one(engine, prompt, temperature=0.0, ignore_eos=True, **params).outputs[0]
        assert out.finish_reason == "length"
        return len(out.token_ids)

    assert produced(PROMPTS[0]) == 3
    assert produced(PROMPTS[0], max_tokens=5) == 5
    assert produced([7] * 510) == 2  # what is left of max_model_len (512)
    with pytest.raises(ValueError, match="min_tokens 4 exceeds max_tokens 3"):
        engine.make_request("m", prompt_token_ids=PROMPTS[0], sampling_params=SamplingParams(min_tokens=4))


def test_truncation_params_reduce_to_greedy(engine, alone):
    for params in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        out = one(engine, PROMPTS[4], temperature=1.0, seed=7, max_tokens=10, **params)
        assert out.outputs[0].token_ids == alone[4], params
    sampled = one(engine, PROMPTS[4], temperature=1.0, seed=7, max_tokens=10)
    assert sampled.outputs[0].token_ids != alone[4]


def test_temperature_scales_the_distribution(engine: LLMEngine, model_dir: Path):
    def top_logprob(engine: LLMEngine, temperature: float) -> float:
        out = one(engine, PROMPTS[2], temperature=temperature, seed=0, max_tokens=1, logprobs=1).outputs[0]
        return out.logprobs[0].top_logprobs[0][2]

    # Processed logprobs are the distribution drawn from: a colder one puts more mass on its best token.
    processed = make_engine(model_dir, logprobs_mode="processed_logprobs")
    cold, warm, hot = (top_logprob(processed, t) for t in (0.05, 1.0, 3.0))
    assert cold > warm + 0.5 > hot + 0.5
    # The default (raw) ones are the model's, whatever the temperature.
    assert top_logprob(engine, 0.05) == pytest.approx(top_logprob(engine, 3.0))


def test_seed_reproduces_whatever_the_batch(engine):
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=10)
    alone_out = run(engine, [PROMPTS[5]], params)[0].outputs[0].token_ids
    batched = run(engine, [PROMPTS[1], PROMPTS[5], PROMPTS[14]], params)[1].outputs[0].token_ids
    assert alone_out == batched
    other = one(engine, PROMPTS[5], temperature=1.0, seed=43, max_tokens=10).outputs[0].token_ids
    assert other != alone_out


def test_penalties_change_a_repetitive_greedy_output(engine):
    prompt = [700] * 40  # greedy output of a constant prompt keeps repeating tokens
    plain = one(engine, prompt, temperature=0.0, max_tokens=12).outputs[0].token_ids
    assert len(set(plain)) < len(plain) or 700 in plain
    for params in ({"repetition_penalty": 3.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        out = one(engine, prompt, temperature=0.0, max_tokens=12, **params).outputs[0].token_ids
        assert out != plain, params
    no_repeats = one(engine, prompt, temperature=0.0, max_tokens=12, presence_penalty=2.0,
                     repetition_penalty=10.0).outputs[0].token_ids
    assert len(set(no_repeats)) > len(set(plain))


def test_n_completions_share_the_prompt_and_differ(engine, alone):
    out = one(engine, PROMPTS[8], n=3, temperature=1.0, seed=1, max_tokens=6)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    greedy = one(engine, PROMPTS[8], n=2, temperature=0.0, max_tokens=10)
    assert [c.token_ids for c in greedy.outputs] == [alone[8], alone[8]]


def test_max_tokens_and_logprobs(engine, alone):
    out = one(engine, PROMPTS[6], temperature=0.0, max_tokens=3, logprobs=2).outputs[0]
    assert out.token_ids == alone[6][:3] and out.finish_reason == "length"
    assert len(out.logprobs) == 3
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == tok and lp.top_logprobs[0][0] == tok and len(lp.top_logprobs) == 2
        assert lp.logprob == pytest.approx(lp.top_logprobs[0][2]) and lp.logprob < 0
        assert lp.top_logprobs[0][2] >= lp.top_logprobs[1][2]
    # vLLM's cumulative_logprob: the sampled tokens' logprobs summed, per completion; None when not asked.
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))
    sampled = one(engine, PROMPTS[6], n=2, temperature=1.0, seed=3, max_tokens=4, logprobs=0).outputs
    assert [c.cumulative_logprob for c in sampled] == pytest.approx(
        [sum(lp.logprob for lp in c.logprobs) for c in sampled])
    assert one(engine, PROMPTS[6], max_tokens=2).outputs[0].cumulative_logprob is None


def test_step_and_token_latency_counts(engine):
    """TPOT is observed once per request (its mean; per token it would cost a round trip to tritonserver
    each when exported); a step that found nothing to run is not counted."""
    before = engine.get_metrics()
    steps = 0
    engine.add_request("latency", prompt_token_ids=PROMPTS[2], sampling_params=GREEDY)
    while engine.has_unfinished():
        steps += bool(engine.step())
    assert engine.step() == []
    after = engine.get_metrics()
    assert after["num_steps_total"] - before["num_steps_total"] == steps
    tpot = after["time_per_output_token_seconds"]["count"] - before["time_per_output_token_seconds"]["count"]
    assert tpot == 1


def test_stop_token_ids(engine, alone):
    stop_at = alone[7][3]
    out = one(engine, PROMPTS[7], temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]).outputs[0]
    cut = alone[7].index(stop_at) + 1
    assert out.token_ids == alone[7][:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_strings_trim_or_keep_and_hold_back(engine):
    ids = one(engine, PROMPTS[14], temperature=0.0, max_tokens=10).outputs[0].token_ids
    texts = [engine.tokenizer.decode(ids[: k + 1]) for k in range(10)]  # text after each token
    full = texts[-1]
    # A 2-character stop string ending where token k ends, at its first occurrence in the output.
    k = next(k for k in range(2, 8) if len(texts[k]) >= 2 and "\ufffd" not in texts[k]
             and full.find(texts[k][-2:]) == len(texts[k]) - 2)
    stop, cut = texts[k][-2:], len(texts[k]) - 2
    trimmed = one(engine, PROMPTS[14], temperature=0.0, max_tokens=10, stop=[stop]).outputs[0]
    assert trimmed.text == full[:cut] and trimmed.token_ids == ids[: k + 1]
    assert trimmed.finish_reason == "stop" and trimmed.stop_reason == stop
    kept = one(engine, PROMPTS[14], temperature=0.0, max_tokens=10, stop=[stop],
               include_stop_str_in_output=True)
    assert kept.outputs[0].text == full[:cut] + stop
    # A stop string that starts like the output but never completes: held back, then released at the end.
    engine.add_request("hold", prompt_token_ids=PROMPTS[14],
                       sampling_params=SamplingParams(temperature=0.0, max_tokens=10, stop=[stop + "\x00"]))
    deltas = []
    while engine.has_unfinished():
        deltas += [d.outputs[0].text for d in engine.step()]
    assert "".join(deltas[: k + 1]) == full[:cut]
    assert "".join(deltas) == full


def test_min_tokens_keeps_its_tokens_text_from_stop_strings(engine, alone):
    """vLLM: a stop string must end after the text of the first min_tokens tokens (it may start in it), as
    eos may come only after min_tokens tokens; one ending in the min_tokens-th token's text does not stop."""
    tok = engine.tokenizer

    def first_seen_in_token(ids: list[int], k: int) -> bool:
        """Token k's text is whole characters and first occurs as token k."""
        text = tok.decode([ids[k - 1]])
        return bool(text) and "\ufffd" not in tok.decode(ids[: k + 1]) and tok.decode(ids[:k]).find(
            text) == len(tok.decode(ids[: k - 1]))

    prompt, ids, k = next((PROMPTS[i], alone[i], k) for i in range(16) for k in range(1, 4)
                          if first_seen_in_token(alone[i], k))
    stop = tok.decode([ids[k - 1]])
    before = one(engine, prompt, temperature=0.0, max_tokens=10, stop=[stop], min_tokens=k - 1).outputs[0]
    assert before.token_ids == ids[:k] and before.stop_reason == stop
    held = one(engine, prompt, temperature=0.0, max_tokens=10, stop=[stop], min_tokens=k).outputs[0]
    assert held.token_ids[:k + 1] == ids[: k + 1]
    assert held.text.startswith(tok.decode(ids[:k]))


def test_unseeded_requests_draw_from_the_engine_seed(model_dir):
    """vLLM's engine `seed`: the same unseeded requests, in the same order, sample the same tokens on every
    run of the engine; another engine seed samples others, and the requests of one run differ."""
    def sampled(engine_seed: int) -> list[list[int]]:
        engine = make_engine(model_dir, seed=engine_seed)
        outs = run(engine, PROMPTS[:2] * 2, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
        return [o.outputs[0].token_ids for o in outs]

    first = sampled(7)
    assert sampled(7) == first
    assert sampled(8) != first and first[0] != first[2]  # the same prompt twice: two draws


def test_bad_words_ban_the_greedy_choice(engine, alone):
    tok = engine.tokenizer
    first = alone[11][0]
    word = tok.decode([first])
    assert tok.encode(word) == [first]
    out = one(engine, PROMPTS[11], temperature=0.0, max_tokens=5, bad_words=[word]).outputs[0]
    assert out.token_ids[0] != first and first not in out.token_ids


def test_a_bad_word_is_banned_with_and_without_a_leading_space(engine):
    """vLLM's two spellings of " hello": "hello" and " hello" (whatever spaces the caller put first)."""
    tok = engine.tokenizer
    banned = engine.make_request("bw", prompt="x", sampling_params=SamplingParams(bad_words=["  hello"]))
    assert sorted(banned.bad_words_ids) == sorted([tok.encode("hello"), tok.encode(" hello")])


def test_logit_bias_steers_greedy_decoding(engine, alone):
    first = alone[11][0]
    banned = one(engine, PROMPTS[11], temperature=0.0, max_tokens=5, logit_bias={first: -100}).outputs[0]
    assert first not in banned.token_ids
    forced = one(engine, PROMPTS[11], temperature=0.0, max_tokens=5, logit_bias={"42": 100}).outputs[0]
    assert forced.token_ids == [42] * 5
    allowed = one(engine, PROMPTS[11], temperature=1.0, max_tokens=8, allowed_token_ids=[42, 43]).outputs[0]
    assert set(allowed.token_ids) <= {42, 43}


def test_prompt_logprobs_score_every_prompt_token(model_dir):
    engine = make_engine(model_dir, max_num_batched_tokens=16)  # the 40-token prompt prefills in 3 chunks
    prompt = PROMPTS[7]
    run(engine, [prompt])  # now in the prefix cache, which a scored prompt must not use
    out = one(engine, prompt, temperature=0.0, max_tokens=1, prompt_logprobs=3)
    scores = out.prompt_logprobs
    assert [s.token_id for s in scores] == prompt and out.num_cached_tokens == 0
    assert scores[0].logprob is None and all(len(s.top_logprobs) == 3 for s in scores[1:])
    for score in scores[1:]:  # rank: 1 + the tokens the model found likelier
        top = [t for t, _, _ in score.top_logprobs]
        assert score.rank == top.index(score.token_id) + 1 if score.token_id in top else score.rank > 3
    # Each position's numbers are what the decode path reports for the prompt cut just before it.
    for k in (1, 16, 17, 39):
        alone = one(engine, prompt[:k], temperature=0.0, max_tokens=1, logprobs=3).outputs[0].logprobs[0]
        assert [t for t, _, _ in scores[k].top_logprobs] == [t for t, _, _ in alone.top_logprobs]
        assert [lp for _, _, lp in scores[k].top_logprobs] == pytest.approx(
            [lp for _, _, lp in alone.top_logprobs], abs=1e-3)
        top = dict((t, lp) for t, _, lp in alone.top_logprobs)
        assert scores[k].logprob <= top[alone.token_id] + 1e-3
        if prompt[k] in top:
            assert scores[k].logprob == pytest.approx(top[prompt[k]], abs=1e-3)
    again = one(engine, prompt, temperature=0.0, max_tokens=1)  # others still hit the cache
    assert again.prompt_logprobs is None and again.num_cached_tokens > 0


@pytest.fixture(scope="module")
def eos_engine(model_dir, alone, tmp_path_factory) -> tuple[LLMEngine, int]:
    """The checkpoint with generation_config.json naming a token greedy decoding emits as an extra eos."""
    out = tmp_path_factory.mktemp("eos") / "ckpt"
    shutil.copytree(model_dir, out)
    eos = next(t for i, t in enumerate(alone[12]) if i >= 3 and t not in alone[12][:i])
    path = out / "generation_config.json"
    path.write_text(path.read_text().replace('"eos_token_id": [', f'"eos_token_id": [{eos}, '))
    return make_engine(out), eos


def test_eos_ignore_eos_and_min_tokens(eos_engine, alone):
    engine, eos = eos_engine
    cut = alone[12].index(eos)
    stopped = one(engine, PROMPTS[12], temperature=0.0, max_tokens=10).outputs[0]
    assert stopped.token_ids == alone[12][: cut + 1] and stopped.finish_reason == "stop"
    assert stopped.text == engine.tokenizer.decode(alone[12][:cut])  # the eos text is not output
    ignored = one(engine, PROMPTS[12], temperature=0.0, max_tokens=10, ignore_eos=True).outputs[0]
    assert ignored.token_ids == alone[12] and ignored.finish_reason == "length"
    held = one(engine, PROMPTS[12], temperature=0.0, max_tokens=10, min_tokens=cut + 2).outputs[0]
    assert held.token_ids[: cut] == alone[12][:cut] and held.token_ids[cut] != eos
    assert len(held.token_ids) >= cut + 2


def test_reasoning_budget_forces_the_think_end(model_dir):
    engine = make_engine(model_dir, reasoning_parser="ernie-45-vl")
    think_end = engine.tokenizer.token_to_id("</think>")
    prompt = "User: what is the weather?\nAssistant: <think>\n"
    out = one(engine, prompt, temperature=0.0, max_tokens=8, reasoning_max_tokens=3).outputs[0]
    assert out.token_ids[3] == think_end
    assert out.reasoning_text and "</think>" not in out.text + out.reasoning_text
    free = one(engine, prompt, temperature=0.0, max_tokens=8).outputs[0]
    assert think_end not in free.token_ids[:4]


def test_chat_applies_the_template(engine):
    messages = [{"role": "user", "content": "hello"}]
    request = engine.make_request("c", messages=messages, chat_template_kwargs={"enable_thinking": False})
    text = engine.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False)
    assert "User: hello" in text and text.rstrip().endswith("Assistant:")


def test_chat_template_kwargs_end_the_prompt_where_asked(engine):
    """vLLM's add_generation_prompt / continue_final_message, given in chat_template_kwargs."""
    def prompt(messages: list, **kwargs) -> str:
        request = engine.make_request("c", messages=messages, chat_template_kwargs=kwargs)
        return engine.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False)

    started = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi, I am"}]
    continued = prompt(started, add_generation_prompt=False, continue_final_message=True)
    assert continued.endswith("Assistant: Hi, I am")
    assert prompt(started[:1], add_generation_prompt=False).endswith("User: hello\n")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        engine.make_request("c", messages=started, chat_template_kwargs={"continue_final_message": True})


def test_truncate_prompt_tokens_keeps_the_last_tokens(engine):
    long = list(range(100, 700))  # longer than max_model_len (512)

    def kept(**params) -> list[int]:
        return engine.make_request("t", prompt_token_ids=long,
                                   sampling_params=SamplingParams(**params)).prompt_token_ids

    assert kept(truncate_prompt_tokens=100) == long[-100:]
    assert kept(truncate_prompt_tokens=-1, max_tokens=12) == long[-500:]
    text = engine.make_request("x", prompt="hello world, hello again",
                               sampling_params=SamplingParams(truncate_prompt_tokens=2))
    assert len(text.prompt_token_ids) == 2 and text.prompt is None  # the text no longer matches
    with pytest.raises(ValueError, match="max_model_len"):  # not asked for: never truncated
        engine.make_request("r", prompt_token_ids=long)


def test_prompt_ids_of_padded_embedding_rows_are_refused(model_dir: Path, tmp_path: Path):
    """Real ERNIE-4.5 pads its embeddings past the tokenizer (~100k ids, 103424 rows). Such ids are never
    sampled; in a prompt the repetition penalty and prompt logprobs indexed the sampled logits with them, and
    the IndexError failed every request of the step. They are refused, as vLLM does."""
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    weights = load_file(str(tmp_path / "model.safetensors"))
    key = "ernie.embed_tokens.weight"  # tied: the LM head too
    weights[key] = paddle.concat([weights[key], paddle.zeros([8, weights[key].shape[1]], weights[key].dtype)])
    save_file(weights, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    padded = make_engine(tmp_path)
    assert padded.runner.model_config.vocab_size == padded.vocab_size + 8
    params = SamplingParams(max_tokens=2, repetition_penalty=2.0, prompt_logprobs=1)
    with pytest.raises(ValueError, match=rf"outside the vocabulary \(0..{padded.vocab_size - 1}\)"):
        padded.make_request("padded", prompt_token_ids=[5, padded.vocab_size], sampling_params=params)
    assert one(padded, [5, padded.vocab_size - 1], max_tokens=2, repetition_penalty=2.0).error is None


def test_steps_leave_no_python_objects_behind(engine):
    """A server steps for days: Paddle 3.3.1's to_tensor kept a Python list per host array it copied (five
    per step), so the stub's memory grew without bound (device.device_tensor)."""
    def objects_after(num_tokens: int) -> int:
        one(engine, PROMPTS[3], max_tokens=num_tokens, ignore_eos=True)
        gc.collect()
        return len(gc.get_objects())

    objects_after(8)  # warm-up: caches, lazily built state
    before = objects_after(8)
    assert objects_after(200) - before < 50


def test_invalid_requests_are_rejected_eagerly(engine):
    cases = [
        ({"prompt": ""}, "empty"),
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [1] * 512}, "max_model_len"),
        ({"prompt_token_ids": [5] * 10, "sampling_params": SamplingParams(max_tokens=503)}, "max_tokens"),
        ({"prompt_token_ids": [10**7]}, "vocabulary"),
        ({"prompt": "a", "sampling_params": SamplingParams(logit_bias={10**7: 1.0})}, "logit_bias"),
        ({"prompt": "a", "sampling_params": SamplingParams(allowed_token_ids=[10**7])}, "allowed_token_ids"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "exactly one"),
        ({"prompt_token_ids": [5.7, 6]}, r"integers, got \[5.7\]"),
        ({"prompt_token_ids": ["5"]}, "integers"),
        ({"prompt_token_ids": 5}, "non-empty list of token ids, got 5"),
        ({"prompt": "a", "sampling_params": SamplingParams(truncate_prompt_tokens=512)}, "truncate_prompt"),
        ({"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"messages": []}},
         "cannot set messages"),
        ({"messages": [{"role": "user", "content": "a"}], "tools": {"name": "f"}}, "tools must be a list"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]},
         "takes text only: image_url"),
        ({"prompt": "a", "sampling_params": SamplingParams(allowed_token_ids=engine.tokenizer.encode("a"),
                                                           bad_words=["a"])}, "leaves no token"),
        ({"prompt": "a", "sampling_params": SamplingParams(allowed_token_ids=sorted(engine.eos_token_ids),
                                                           min_tokens=1)}, "leaves no token"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.make_request("bad", **kwargs)
    engine.add_request("dup", prompt="hello", sampling_params=GREEDY)
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request("dup", prompt="hello")
    while engine.has_unfinished():
        engine.step()


def test_constraints_leaving_no_token_fail_only_their_request(engine, alone):
    """A grammar that allowed_token_ids rules out masks every logit: that request fails with a clear error
    (the sampled path used to crash the step, failing the whole batch); its batch mate is unaffected."""
    dead = SamplingParams(temperature=1.0, top_p=0.9, guided_choice=["b"],
                          allowed_token_ids=engine.tokenizer.encode("a"), max_tokens=4)
    engine.add_request("dead", prompt_token_ids=PROMPTS[0], sampling_params=dead)
    engine.add_request("fine", prompt_token_ids=PROMPTS[1], sampling_params=GREEDY)
    deltas: dict[str, list[RequestOutput]] = {"dead": [], "fine": []}
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id].append(out)
    failed, fine = merge_outputs(deltas["dead"]), merge_outputs(deltas["fine"])
    assert "leave no token" in failed.error and failed.outputs[0].finish_reason == "abort"
    assert fine.error is None and fine.outputs[0].token_ids == alone[1]
    assert_no_leak(engine)


def test_llm_refuses_no_messages_and_survives_an_interrupt(model_dir, alone, monkeypatch):
    llm = LLM(model_dir, num_gpu_blocks_override=64, block_size=BLOCK, max_model_len=512)
    with pytest.raises(ValueError, match="non-empty"):
        llm.chat([])
    step = llm.engine.step

    def interrupted() -> list[RequestOutput]:
        monkeypatch.setattr(llm.engine, "step", step)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[0], GREEDY)
    assert not llm.engine.has_unfinished()  # else the next call meets outputs of requests it does not know
    assert tokens(llm.generate([PROMPTS[1], PROMPTS[2]], GREEDY)) == alone[1:3]
    assert tokens(llm.generate(list(np.array(PROMPTS[3])), GREEDY)) == alone[3:4]  # numpy ids: one prompt
    # vLLM's prompt dicts (TokensPrompt / TextPrompt), alone or in a list.
    assert tokens(llm.generate({"prompt_token_ids": PROMPTS[4]}, GREEDY)) == alone[4:5]
    text = llm.engine.tokenizer.decode(PROMPTS[5])
    assert tokens(llm.generate([{"prompt": text}, "x"], GREEDY))[0] == tokens(llm.generate(text, GREEDY))[0]
    with pytest.raises(ValueError, match="prompt keys not supported: multi_modal_data"):
        llm.generate({"prompt": "x", "multi_modal_data": {}})
    assert_no_leak(llm.engine)


# Async engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_engine(model_dir):
    engine = AsyncLLMEngine(EngineConfig(model=str(model_dir), num_gpu_blocks_override=128, block_size=BLOCK,
                                         max_model_len=512, max_num_seqs=16))
    yield engine
    engine.shutdown()
    assert not engine.is_running


def test_async_streams_from_threads_and_asyncio(async_engine, alone):
    results: dict[str, list[int]] = {}

    def consume(i: int) -> None:
        stream = async_engine.add_request(f"t{i}", prompt_token_ids=PROMPTS[i], sampling_params=GREEDY)
        outs = list(stream)
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        results[f"t{i}"] = merge_outputs(outs).outputs[0].token_ids

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    async def consume_async(i: int) -> list[int]:
        stream = async_engine.add_request(f"a{i}", prompt_token_ids=PROMPTS[i], sampling_params=GREEDY)
        return merge_outputs([o async for o in stream]).outputs[0].token_ids

    async def main() -> list[list[int]]:
        ticks = 0

        async def ticker() -> None:  # the loop stays responsive while streams wait
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        outs = await asyncio.gather(*(consume_async(i) for i in range(4, 8)))
        tick_task.cancel()
        assert ticks > 3
        return outs

    async_results = asyncio.run(main())
    for t in threads:
        t.join(timeout=60)
    assert [results[f"t{i}"] for i in range(4)] == alone[:4]
    assert async_results == alone[4:8]
    snap = async_engine.metrics()
    assert snap["num_kv_blocks_free"] == snap["num_kv_blocks_total"]
    assert snap["time_to_first_token_seconds"]["count"] >= 8 and snap["generation_tokens_total"] >= 80


def test_async_abort_and_duplicate_ids(async_engine):
    stream = async_engine.add_request("long", prompt_token_ids=PROMPTS[0],
                                      sampling_params=SamplingParams(temperature=0.0, max_tokens=400))
    with pytest.raises(ValueError, match="duplicate"):
        async_engine.add_request("long", prompt="again")
    outs = []
    for out in stream:
        outs.append(out)
        if len(outs) == 3:
            async_engine.abort("long")
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs) < 400
    snap = async_engine.metrics()
    assert snap["num_kv_blocks_free"] == snap["num_kv_blocks_total"]
    # A consumer that stops iterating early aborts its request.
    before = snap["request_abort_total"]
    for _ in async_engine.add_request("left", prompt_token_ids=PROMPTS[0],
                                      sampling_params=SamplingParams(temperature=0.0, max_tokens=400)):
        break
    deadline = time.monotonic() + 30
    while async_engine.metrics()["request_abort_total"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    snap = async_engine.metrics()
    assert snap["request_abort_total"] == before + 1
    assert snap["num_kv_blocks_free"] == snap["num_kv_blocks_total"]


def test_async_error_in_one_request_spares_the_others(async_engine, alone, monkeypatch):
    processor = async_engine.engine.output_processor
    original = processor.process

    def failing(seqs, sampled):
        if seqs[0].request.request_id == "broken":
            raise RuntimeError("injected failure")
        return original(seqs, sampled)

    monkeypatch.setattr(processor, "process", failing)
    broken = async_engine.add_request("broken", prompt_token_ids=PROMPTS[1], sampling_params=GREEDY)
    healthy = async_engine.add_request("healthy", prompt_token_ids=PROMPTS[2], sampling_params=GREEDY)
    broken_outs, healthy_outs = list(broken), list(healthy)
    assert broken_outs[-1].error and "injected failure" in broken_outs[-1].error
    assert broken_outs[-1].outputs[0].finish_reason == "abort"
    assert healthy_outs[-1].error is None
    assert merge_outputs(healthy_outs).outputs[0].token_ids == alone[2]

    runner = async_engine.engine.runner
    original_execute = runner.execute
    calls = {"n": 0}

    def execute_once_failing(out):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return original_execute(out)

    monkeypatch.setattr(runner, "execute", execute_once_failing)
    failed = list(async_engine.add_request("victim", prompt_token_ids=PROMPTS[3], sampling_params=GREEDY))
    assert "device lost" in failed[-1].error
    after = list(async_engine.add_request("after", prompt_token_ids=PROMPTS[3], sampling_params=GREEDY))
    assert merge_outputs(after).outputs[0].token_ids == alone[3]
    snap = async_engine.metrics()
    assert snap["num_kv_blocks_free"] == snap["num_kv_blocks_total"] and snap["request_failure_total"] >= 2
