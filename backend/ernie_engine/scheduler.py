"""Continuous batching: which sequences advance this step, and by how many tokens.

One step mixes decodes and prefill chunks under two budgets: `max_num_seqs` running sequences and
`max_num_batched_tokens` new tokens. Running sequences go first (oldest first); waiting ones are admitted
FCFS from the head of the queue until one does not fit, so a step's cost never depends on how many
requests wait. When KV blocks run out, the most recently arrived running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed (mostly from the prefix
cache) later. With `enable_max_prefill`, whole prefills are admitted first and decodes take what is left
of the token budget; KV blocks stay the running sequences' first claim.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    scheduled: dict[Sequence, int] = field(default_factory=dict)  # sequence -> new tokens this step
    preempted: list[Sequence] = field(default_factory=list)
    sampling: list[Sequence] = field(default_factory=list)  # scheduled ones reaching their end, in order

    @property
    def num_tokens(self) -> int:
        return sum(self.scheduled.values())

    def samples(self, seq: Sequence) -> bool:
        """Whether this step samples a token for the sequence (a prefill chunk short of the end does not)."""
        return seq in self.sampling


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        enable_max_prefill: bool = False,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.enable_max_prefill = enable_max_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if self.enable_max_prefill:
            # Blocks held back for the running sequences' next tokens: else a decode finding none would
            # preempt a prefill admitted in this very step (counted as preempted and cached, never run).
            reserved = self._running_need(budget)
            budget = self._admit_waiting(out, budget, whole_prefills=True, reserved=reserved)
            self._schedule_running(out, budget)
        else:
            budget = self._schedule_running(out, budget)
            if not out.preempted:  # under memory pressure, admitting more would only thrash
                self._admit_waiting(out, budget, whole_prefills=False)
        out.sampling = [s for s, n in out.scheduled.items() if s.num_computed_tokens + n == s.num_tokens]
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq in out.scheduled:  # admitted by this step's max-prefill pass
                i += 1
                continue
            start = seq.num_computed_tokens
            num_new = self._chunk(seq, start, min(seq.num_tokens - start, budget))
            while not self.block_manager.can_append(seq, num_new):
                victim = self.running[-1]
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq, num_new)
                out.scheduled[seq] = num_new
                budget -= num_new
                i += 1
                continue
            break  # the sequence itself was preempted
        return budget

    def _running_need(self, budget: int) -> int:
        """New KV blocks the running sequences take if each gets its next chunk (`budget` tokens at most)."""
        need = 0
        for seq in self.running:
            start = seq.num_computed_tokens
            end = start + self._chunk(seq, start, min(seq.num_tokens - start, budget))
            need += max(0, self.block_manager.blocks_needed(end) - len(seq.block_table))
        return need

    def _admit_waiting(self, out: SchedulerOutput, budget: int, whole_prefills: bool, reserved: int = 0
                       ) -> int:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._must_wait_for_leader(seq):
                break
            match = bm.match_prefix(seq)
            start = match.num_blocks * bm.block_size
            remaining = seq.num_tokens - start
            num_new = self._chunk(seq, start, min(remaining, budget))
            # A prompt too long for one step is chunked; in max-prefill mode only when it is alone.
            chunk_ok = self.enable_chunked_prefill and not (whole_prefills and out.scheduled)
            if num_new < remaining and not chunk_ok:
                break
            if not bm.can_allocate(seq, match, num_new, reserved):
                break
            self.waiting.popleft()
            bm.allocate(seq, match, num_new)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled[seq] = num_new
            budget -= num_new
        return budget

    @staticmethod
    def _chunk(seq: Sequence, start: int, num_new: int) -> int:
        """Tokens to compute from `start`: a prefill chunk never ends inside an image (multimodal prompts)."""
        mm = seq.request.mm
        return num_new if mm is None else mm.chunk_end(start, start + num_new) - start

    def _must_wait_for_leader(self, seq: Sequence) -> bool:
        """Siblings of an n > 1 request wait until the leader's prompt is cached, then share its blocks."""
        if seq.index == 0 or not self.block_manager.enable_prefix_caching:
            return False
        leader = seq.leader
        if leader.num_prompt_tokens <= self.block_manager.block_size:
            return False  # no full prompt block to share
        prompt_pending = leader.num_computed_tokens < leader.num_prompt_tokens
        return leader.status is SequenceStatus.RUNNING and prompt_pending

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Free a running sequence for recompute; returns the tokens it gives back to this step's budget."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)
        logger.debug("preempted sequence %d of request %s", seq.seq_id, seq.request.request_id)
        return out.scheduled.pop(seq, 0)

    def update(self, out: SchedulerOutput) -> None:
        """After the model ran: the scheduled tokens are now in the cache."""
        for seq, num_new in out.scheduled.items():
            seq.num_computed_tokens += num_new
            self.block_manager.register_computed(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence, running or waiting."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
