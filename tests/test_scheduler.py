"""Scheduler: budgets, FCFS admission, chunked prefill, max-prefill, preemption by recompute, n siblings.

The model is left out: a "step" marks the scheduled tokens computed and appends a token to every
sequence that reached its end, which is all the scheduler sees of the model.
"""

from __future__ import annotations

from ernie_engine.block_manager import BlockManager
from ernie_engine.sampling_params import SamplingParams
from ernie_engine.scheduler import Scheduler, SchedulerOutput
from ernie_engine.sequence import Request, Sequence, SequenceStatus

BS = 4


def make_request(prompt_len: int, request_id: str, n: int = 1, base: int = 0) -> Request:
    prompt = [base + i for i in range(prompt_len)]
    request = Request(request_id, prompt, SamplingParams(n=n).with_defaults({}), max_tokens=100,
                      stop_token_ids=frozenset(), eos_token_ids=frozenset())
    request.sequences = [Sequence.create(request, i) for i in range(n)]
    return request


def make_scheduler(num_blocks: int = 64, max_seqs: int = 8, max_tokens: int = 32, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_seqs, max_tokens, **kw)


def add(sched: Scheduler, request: Request) -> Request:
    for seq in request.sequences:
        sched.add(seq)
    return request


def step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sampled = [seq for seq in out.scheduled if out.samples(seq)]
    sched.update(out)
    for seq in sampled:
        seq.token_ids.append(7)
    return out


def test_budgets_and_fcfs_head_of_line():
    sched = make_scheduler(max_seqs=3, max_tokens=20)
    reqs = [add(sched, make_request(8, f"r{i}", base=100 * i)) for i in range(5)]
    out = step(sched)
    # 8 + 8 fit, the third would be chunked to 4 tokens.
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1", "r2"]
    assert list(out.scheduled.values()) == [8, 8, 4]
    assert not out.samples(reqs[2].sequences[0])
    out = step(sched)  # max_num_seqs caps running at 3: decodes + r2's last chunk
    assert {s.request.request_id for s in out.scheduled} == {"r0", "r1", "r2"}
    assert out.scheduled[reqs[2].sequences[0]] == 4 and out.num_tokens == 6


def test_head_that_does_not_fit_blocks_the_queue():
    sched = make_scheduler(num_blocks=4, max_tokens=64, enable_chunked_prefill=False)
    add(sched, make_request(12, "big"))  # 3 blocks
    add(sched, make_request(8, "huge", base=50))  # needs 2 more: only 1 left
    add(sched, make_request(2, "small", base=90))  # would fit, but FCFS keeps it behind "huge"
    out = step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["big"]
    assert [s.request.request_id for s in sched.waiting] == ["huge", "small"]


def test_chunked_prefill_samples_only_on_the_last_chunk():
    sched = make_scheduler(max_tokens=8)
    seq = add(sched, make_request(20, "long")).sequences[0]
    chunks, samples = [], []
    while seq.num_output_tokens == 0:
        out = sched.schedule()
        chunks.append(out.scheduled[seq])
        samples.append(out.samples(seq))
        sched.update(out)
        if samples[-1]:
            seq.token_ids.append(7)
    assert chunks == [8, 8, 4] and samples == [False, False, True]


def test_without_chunking_a_too_long_prompt_waits():
    sched = make_scheduler(max_tokens=8, enable_chunked_prefill=False)
    add(sched, make_request(20, "long"))
    assert not sched.schedule().scheduled


def test_preemption_takes_the_newest_and_recomputes_it():
    sched = make_scheduler(num_blocks=5, max_tokens=64)
    old = add(sched, make_request(7, "old")).sequences[0]  # 2 blocks
    new = add(sched, make_request(7, "new", base=50)).sequences[0]  # 2 blocks
    step(sched)  # both prefilled, 1 block left
    step(sched)  # both decode into their second block
    out = step(sched)  # old takes the last block; new finds none and is preempted
    assert out.preempted == [new] and list(out.scheduled) == [old]
    assert new.status is SequenceStatus.WAITING and sched.waiting[0] is new
    assert new.block_table == [] and new.num_computed_tokens == 0
    assert sched.num_preemptions == 1
    sched.finish(old)
    old.finish("length")
    # Recompute: its own two full blocks (prompt + first output token) come back from the prefix cache.
    out = step(sched)
    assert out.scheduled == {new: 1} and new.num_tokens == 10
    sched.finish(new)
    assert sched.block_manager.num_free_blocks == 5


def test_max_prefill_admits_whole_prefills_before_decodes():
    sched = make_scheduler(max_tokens=16, enable_max_prefill=True)
    first = add(sched, make_request(6, "first")).sequences[0]
    step(sched)  # first is now decoding
    a = add(sched, make_request(10, "a", base=100)).sequences[0]
    b = add(sched, make_request(7, "b", base=200)).sequences[0]
    out = step(sched)
    # a (10 tokens) goes first; b (7) does not fit whole in the 6 left, so it waits; first decodes.
    assert out.scheduled == {a: 10, first: 1}
    assert sched.waiting[0] is b
    c = add(sched, make_request(9, "c", base=300)).sequences[0]
    out = step(sched)  # b and c take the whole budget: the decodes of first and a wait a step
    assert out.scheduled == {b: 7, c: 9}
    sched_default = make_scheduler(max_tokens=16)
    first2 = add(sched_default, make_request(6, "first")).sequences[0]
    step(sched_default)
    a2 = add(sched_default, make_request(10, "a", base=100)).sequences[0]
    b2 = add(sched_default, make_request(7, "b", base=200)).sequences[0]
    out = step(sched_default)  # default: decode first, then chunked prefills fill the budget
    assert out.scheduled == {first2: 1, a2: 10, b2: 5}


def test_max_prefill_leaves_the_running_their_blocks():
    """Admitting a prefill that takes the block a decode needs in the same step would get it preempted
    before it ever ran: a preemption counted, prefix hits counted that never served anything."""
    sched = make_scheduler(num_blocks=4, max_tokens=64, enable_max_prefill=True)
    cached = add(sched, make_request(9, "cached", base=100)).sequences[0]
    step(sched)
    sched.finish(cached)  # 2 full blocks stay cached (evictable), 2 blocks free
    decode = add(sched, make_request(4, "decode")).sequences[0]
    step(sched)  # 1 block; its next token needs a second
    late = add(sched, make_request(9, "late", base=100)).sequences[0]  # 2 cached blocks + the last free one
    out = step(sched)
    assert out.scheduled == {decode: 1} and not out.preempted
    assert sched.waiting[0] is late and late.num_cached_tokens == -1
    assert sched.num_preemptions == 0 and sched.block_manager.prefix_hit_tokens == 0
    sched.finish(decode)
    decode.finish("length")
    out = step(sched)
    assert out.scheduled == {late: 1} and late.num_cached_tokens == sched.block_manager.prefix_hit_tokens == 8


def test_siblings_wait_for_the_leader_then_share_its_prompt_blocks():
    sched = make_scheduler(max_tokens=64)
    request = add(sched, make_request(10, "n3", n=3))
    leader, s1, s2 = request.sequences
    out = step(sched)
    assert list(out.scheduled) == [leader]
    out = step(sched)
    assert out.scheduled[s1] == 2 and out.scheduled[s2] == 2  # 8 of 10 prompt tokens from the cache
    assert s1.num_cached_tokens == 8
    assert s1.block_table[:2] == leader.block_table[:2]
    assert sched.block_manager.blocks[leader.block_table[0]].ref_count == 3
