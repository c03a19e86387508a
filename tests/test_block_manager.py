"""Block manager: allocation, ref counts, prefix-cache hits, LRU eviction, no leaks."""

from __future__ import annotations

from ernie_engine.block_manager import BlockManager, block_hash
from ernie_engine.sampling_params import SamplingParams
from ernie_engine.sequence import Request, Sequence

BS = 4


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    request = Request(request_id, list(tokens), SamplingParams().with_defaults({}), max_tokens=8,
                      stop_token_ids=frozenset(), eos_token_ids=frozenset())
    request.sequences = [Sequence.create(request, 0)]
    return request.sequences[0]


def admit_and_compute(bm: BlockManager, seq: Sequence) -> int:
    """Allocate a fresh sequence's whole remaining prompt and mark it computed; returns cached tokens."""
    match = bm.match_prefix(seq)
    new = seq.num_tokens - match.num_blocks * BS
    assert bm.can_allocate(seq, match, new)
    bm.allocate(seq, match, new)
    cached = seq.num_computed_tokens
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)
    return cached


def test_block_hash_is_stable_and_chained():
    assert block_hash(0, [1, 2, 3, 4]) == block_hash(0, [1, 2, 3, 4])
    assert block_hash(0, [1, 2, 3, 4]) != block_hash(1, [1, 2, 3, 4])
    assert block_hash(0, [1, 2, 3, 4]) != block_hash(0, [1, 2, 3, 5])


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seqs = [make_seq(list(range(i * 10, i * 10 + 6)), f"r{i}") for i in range(3)]
    for seq in seqs:
        admit_and_compute(bm, seq)
        assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 2
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_reuses_full_blocks_but_never_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 112))  # exactly 3 full blocks
    first = make_seq(prompt, "a")
    assert admit_and_compute(bm, first) == 0
    second = make_seq(prompt, "b")
    # The last token must be computed for logits, so only 2 of the 3 blocks can be reused.
    assert admit_and_compute(bm, second) == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert bm.blocks[first.block_table[0]].ref_count == 2
    assert bm.prefix_hit_tokens == 8
    # A different first block breaks the chain even though later blocks have equal content.
    third = make_seq([999] + prompt[1:], "c")
    assert admit_and_compute(bm, third) == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=BS)
    old = make_seq(list(range(9)), "old")  # 2 full blocks + 1 token
    admit_and_compute(bm, old)
    bm.free(old)
    assert bm.num_free_blocks == 4 and len(bm.evictable) == 2
    again = make_seq(list(range(9)), "again")
    assert admit_and_compute(bm, again) == 8  # served from the evictable pool
    bm.free(again)
    # A 16-token unrelated sequence needs all 4 blocks: cached ones are evicted and unregistered.
    big = make_seq(list(range(500, 516)), "big")
    assert admit_and_compute(bm, big) == 0
    assert bm.num_free_blocks == 0
    assert not any(h in bm.hash_to_block for h in again.block_hashes)
    bm.free(big)
    assert bm.num_free_blocks == 4


def test_can_allocate_counts_matched_evictable_blocks_as_taken():
    bm = BlockManager(num_blocks=3, block_size=BS)
    first = make_seq(list(range(9)), "a")
    admit_and_compute(bm, first)  # 3 blocks
    bm.free(first)  # 2 evictable (hashed) + 1 free
    seq = make_seq(list(range(8)) + [50, 51, 52, 53, 54], "b")  # hits 2 blocks, needs 2 more for 5 tokens
    match = bm.match_prefix(seq)
    assert match.num_blocks == 2 and match.num_evictable == 2
    assert not bm.can_allocate(seq, match, 5)
    assert bm.can_allocate(seq, match, 4)


def test_prefix_caching_off_never_matches():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    first = make_seq(list(range(12)), "a")
    admit_and_compute(bm, first)
    assert admit_and_compute(bm, make_seq(list(range(12)), "b")) == 0
    assert not bm.hash_to_block
