"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching.

A full block is identified by a hash of its tokens chained with the hash of the prefix before it, so
equal hashes mean equal prefixes. Computed full blocks are registered under their hash and shared by
reference count; a block whose count drops to zero stays cached (evictable, least recently freed first)
until a new allocation needs it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from .sequence import Sequence

logger = logging.getLogger(__name__)


def block_hash(prev_hash: int, token_ids: list[int], extra: bytes = b"") -> int:
    """Stable across processes (unlike `hash()`), so cache hits are reproducible. `extra`: the content of
    the images among the tokens (their placeholder ids alone do not tell two images apart)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(prev_hash.to_bytes(16, "little"))
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    digest.update(extra)
    return int.from_bytes(digest.digest(), "little")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is registered in the prefix cache


@dataclass
class PrefixMatch:
    block_ids: list[int]  # cached blocks covering the prompt's first len(block_ids) * block_size tokens
    num_evictable: int  # how many of them sit unreferenced in the evictable pool

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # never hashed, or evicted
        self.evictable: OrderedDict[int, None] = OrderedDict()  # hashed, unreferenced; oldest first
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hit_tokens = 0  # prompt tokens served from the cache (all admissions)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # Prefix cache -----------------------------------------------------------------------------------

    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        bs, mm = self.block_size, seq.request.mm
        for i in range(len(seq.block_hashes), num_full_blocks):
            prev = seq.block_hashes[i - 1] if i else 0
            extra = mm.cache_key(i * bs, (i + 1) * bs) if mm is not None else b""
            seq.block_hashes.append(block_hash(prev, seq.token_ids[i * bs : (i + 1) * bs], extra))

    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """The longest cached prefix of a sequence without blocks; the last token always stays uncached."""
        if not self.enable_prefix_caching or seq.scores_prompt:
            return PrefixMatch([], 0)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        block_ids = []
        for h in seq.block_hashes[:max_blocks]:
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block_ids.append(block_id)
        return PrefixMatch(block_ids, sum(self.blocks[b].ref_count == 0 for b in block_ids))

    def register_computed(self, seq: Sequence) -> None:
        """Offer the sequence's newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._extend_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            h, block = seq.block_hashes[i], self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash = h
                self.hash_to_block[h] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    # Allocation -------------------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, match: PrefixMatch, num_new_tokens: int, reserved: int = 0) -> bool:
        """Room for a waiting sequence: the matched prefix plus `num_new_tokens` computed after it, with
        `reserved` free blocks left untouched."""
        num_tokens = match.num_blocks * self.block_size + num_new_tokens
        needed = self.blocks_needed(num_tokens) - match.num_blocks
        return needed <= self.num_free_blocks - match.num_evictable - reserved

    def allocate(self, seq: Sequence, match: PrefixMatch, num_new_tokens: int) -> None:
        assert not seq.block_table, "sequence already holds blocks"
        for block_id in match.block_ids:
            self._take(block_id)
        seq.block_table = list(match.block_ids)
        seq.num_computed_tokens = match.num_blocks * self.block_size
        seq.num_registered_blocks = match.num_blocks
        self.prefix_hit_tokens += seq.num_computed_tokens
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the evictable pool gives up a prefix's tail before its head.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable[block_id] = None
                else:
                    self.free_ids.append(block_id)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._new_block())

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def _new_block(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.blocks[block_id].hash]
            self.blocks[block_id].hash = None
        self.blocks[block_id].ref_count = 1
        return block_id
