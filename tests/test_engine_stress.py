"""A bounded, seeded random stress of the engine's scheduling and paged KV cache.

Requests of many lengths share prefixes (prefix-cache hits on full blocks, partial last blocks), arrive a
few per step and are aborted at random moments (queued, mid-prefill, decoding, right after a preemption),
under a KV cache small enough to preempt over and over, with chunked prefill, max-prefill, or neither.
Every finished request must equal its run alone (greedy and seeded sampling alike, n > 1 included); after
each step the block tables, reference counts and prefix-cache table must agree; at the end every block is
free and the metrics count what the scheduler did.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from ernie_engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from ernie_engine.outputs import RequestOutput, merge_outputs
from ernie_engine.scheduler import SchedulerOutput
from ernie_engine.sequence import Sequence

from tests.test_engine import model_dir  # noqa: F401 (the fixture: a random checkpoint with real context use)

MAX_LEN = 48
Spec = tuple[str, list[int], SamplingParams]


def make_engine(path, **kw) -> LLMEngine:
    args = {"block_size": 4, "max_model_len": MAX_LEN, "max_num_seqs": 6, "num_gpu_blocks_override": 64}
    return LLMEngine(EngineConfig(model=str(path), **{**args, **kw}))


def make_specs(rng: np.random.Generator, count: int) -> list[Spec]:
    prefixes = [rng.integers(10, 2900, size=n).tolist() for n in (8, 13, 20)]
    specs = []
    for i in range(count):
        kind = int(rng.integers(0, 5))
        if kind < 3:  # a cut of a shared prefix, then a few tokens of its own
            prefix = prefixes[kind][: rng.integers(1, len(prefixes[kind]) + 1)]
            prompt = prefix + rng.integers(10, 2900, size=rng.integers(0, 10)).tolist()
        elif kind == 3:
            prompt = rng.integers(10, 2900, size=MAX_LEN - 1).tolist()  # room for one token only
        else:
            prompt = prefixes[2] + prefixes[0]
        room = MAX_LEN - len(prompt)
        max_tokens = None if rng.random() < 0.2 else int(rng.integers(1, min(room, 12) + 1))  # None: all room
        n = 2 if rng.random() < 0.25 else 1
        seed = int(rng.integers(0, 1000)) if rng.random() < 0.5 else None
        temperature = 0.0 if seed is None else 1.0  # seeded requests sample
        params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, n=n)
        specs.append((f"r{i}", prompt, params))
    return specs


def run_alone(engine: LLMEngine, spec: Spec) -> list[list[int]]:
    rid, prompt, params = spec
    engine.add_request(rid, prompt_token_ids=prompt, sampling_params=params)
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    return [o.token_ids for o in merge_outputs(deltas).outputs]


class Observed:
    """Wraps the engine's real scheduler to tally what each step did: prefix-cache hits of the sequences it
    admitted (their computed tokens once allocated), and preemptions of sequences that were running."""

    def __init__(self, engine: LLMEngine):
        self.scheduler = engine.scheduler
        self.schedule = self.scheduler.schedule
        self.scheduler.schedule = self
        self.hits = 0
        self.preemptions = 0
        self.first_hits: dict[Sequence, int] = {}

    def __call__(self) -> SchedulerOutput:
        running = set(self.scheduler.running)
        out = self.schedule()
        for seq in out.scheduled.keys() - running:
            self.hits += seq.num_computed_tokens
            self.first_hits.setdefault(seq, seq.num_computed_tokens)
        self.preemptions += sum(seq in running for seq in out.preempted)
        return out


def check_blocks(engine: LLMEngine) -> None:
    bm, sched = engine.block_manager, engine.scheduler
    held = Counter(b for seq in sched.running for b in seq.block_table)
    assert all(not seq.block_table for seq in sched.waiting)
    assert [b.ref_count for b in bm.blocks] == [held[b.block_id] for b in bm.blocks]
    free, evictable = list(bm.free_ids), list(bm.evictable)
    assert len(set(free + evictable)) == len(free) + len(evictable) == bm.num_blocks - len(held)
    assert all(bm.blocks[b].hash is None for b in free)
    assert all(bm.blocks[b].hash is not None for b in evictable)
    assert {b.hash: b.block_id for b in bm.blocks if b.hash is not None} == bm.hash_to_block
    metrics = engine.get_metrics()
    assert metrics["num_kv_blocks_used"] == len(held)
    running = len({seq.request.request_id for seq in sched.running})
    assert metrics["num_requests_running"] == running
    assert metrics["num_requests_waiting"] == len(engine.requests) - running


def abort_target(engine: LLMEngine, rng: np.random.Generator) -> str | None:
    """A live request, preferring one just preempted or mid-prefill (the moments most likely to go wrong)."""
    sched = engine.scheduler
    preempted = [s.request.request_id for s in sched.waiting if s.num_output_tokens > 0]
    prefilling = [s.request.request_id for s in sched.running if s.num_computed_tokens < s.num_prompt_tokens]
    for pool in (preempted, prefilling, sorted(engine.requests)):
        if pool and (pool is not preempted and pool is not prefilling or rng.random() < 0.3):
            return pool[rng.integers(0, len(pool))]
    return None


def stress(engine: LLMEngine, specs: list[Spec], rng: np.random.Generator) -> tuple[dict, set[str], Observed]:
    observed = Observed(engine)
    pending = list(specs)
    deltas: dict[str, list[RequestOutput]] = {rid: [] for rid, _, _ in specs}
    aborted = set()
    for _ in range(600):
        if not (pending or engine.has_unfinished()):
            break
        for _ in range(rng.integers(0, 3)):
            if pending:
                rid, prompt, params = pending.pop(0)
                engine.add_request(rid, prompt_token_ids=prompt, sampling_params=params)
        if rng.random() < 0.06 and (rid := abort_target(engine, rng)):
            aborted.add(rid)
            deltas[rid].append(engine.abort(rid))
        for out in engine.step():
            deltas[out.request_id].append(out)
        check_blocks(engine)
    assert not (pending or engine.has_unfinished()), "the engine did not finish in 600 steps"
    return {rid: merge_outputs(d) for rid, d in deltas.items()}, aborted, observed


@pytest.fixture(scope="module")
def specs_and_alone(model_dir) -> tuple[list[Spec], dict[str, list[list[int]]]]:  # noqa: F811
    specs = make_specs(np.random.default_rng(0), 30)
    engine = make_engine(model_dir, enable_prefix_caching=False)
    return specs, {spec[0]: run_alone(engine, spec) for spec in specs}


@pytest.mark.parametrize("kw", [
    {"num_gpu_blocks_override": 13, "max_num_batched_tokens": 3, "max_num_seqs": 3},
    {"num_gpu_blocks_override": 25, "block_size": 2, "max_num_batched_tokens": 5, "enable_max_prefill": True},
    {"num_gpu_blocks_override": 16, "max_num_batched_tokens": 20, "enable_max_prefill": True},
    {"num_gpu_blocks_override": 12, "max_num_batched_tokens": 64, "enable_chunked_prefill": False},
    {"num_gpu_blocks_override": 17, "block_size": 3, "max_num_batched_tokens": 9,
     "enable_prefix_caching": False},
], ids=["chunked", "max-prefill-bs2", "max-prefill", "whole-prefills", "no-prefix-cache"])
def test_random_schedules_match_the_alone_runs(model_dir, specs_and_alone, kw):  # noqa: F811
    specs, alone = specs_and_alone
    engine = make_engine(model_dir, **kw)
    outs, aborted, observed = stress(engine, specs, np.random.default_rng(1))
    for rid, prompt, params in specs:
        got = [o.token_ids for o in outs[rid].outputs]
        if rid in aborted:  # what it streamed before the abort is a prefix of its whole output
            assert all(ref[: len(tokens)] == tokens for tokens, ref in zip(got, alone[rid], strict=True)), rid
            continue
        assert got == alone[rid], rid
        if params.max_tokens is None:  # ran to max_model_len exactly
            assert all(len(prompt) + len(tokens) == MAX_LEN for tokens in got)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(b.ref_count for b in bm.blocks)
    metrics = engine.get_metrics()
    assert metrics["request_preempted_total"] == observed.preemptions > 0
    assert metrics["prefix_cache_token_num"] == bm.prefix_hit_tokens == observed.hits
    assert (observed.hits > 0) == engine.config.enable_prefix_caching
    leaders = {seq.request.request_id: hits for seq, hits in observed.first_hits.items() if seq.index == 0}
    assert all(outs[rid].num_cached_tokens == hits for rid, hits in leaders.items())
    assert metrics["num_requests_running"] == metrics["num_requests_waiting"] == 0
    assert len(aborted) > 3


def test_length_limits_are_exact(model_dir):  # noqa: F811
    engine = make_engine(model_dir)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("full", prompt_token_ids=[7] * MAX_LEN)
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        engine.add_request("over", prompt_token_ids=[7] * 40, sampling_params=SamplingParams(max_tokens=9))


def test_async_abort_of_a_finished_request_spares_its_id_reused(model_dir, monkeypatch):  # noqa: F811
    """An abort that arrives as its request finishes (queued while the stream was still open) must not end
    a new request given the same id before the step loop gets to it."""
    engine = AsyncLLMEngine(EngineConfig(model=str(model_dir), block_size=4, max_model_len=MAX_LEN,
                                         num_gpu_blocks_override=32))
    params = SamplingParams(temperature=0.0, max_tokens=3)
    reused: list = []
    step = engine.engine.step

    def step_then_abort() -> list[RequestOutput]:  # a consumer cancels just as "x" finishes
        outs = step()
        if any(o.request_id == "x" and o.finished for o in outs) and not reused:
            engine.abort("x")
        return outs

    monkeypatch.setattr(engine.engine, "step", step_then_abort)

    def put_then_reuse(out: RequestOutput) -> None:  # the client reuses the id once the first one is done
        if out.finished:
            reused.append(engine.add_request("x", prompt_token_ids=[5, 6, 7], sampling_params=params))
        put(out)

    with engine._cond:  # the step loop takes no request before the hook is in place
        first = engine.add_request("x", prompt_token_ids=[5, 6, 7], sampling_params=params)
        put, first.put = first.put, put_then_reuse
    try:
        assert merge_outputs(list(first)).outputs[0].finish_reason == "length"
        second = merge_outputs(list(reused[0]))
        assert second.outputs[0].finish_reason == "length" and len(second.outputs[0].token_ids) == 3
    finally:
        engine.shutdown()
