"""Requests and their sequences: the token state the scheduler, block manager and sampler share.

A request with `n` completions owns `n` sequences over the same prompt. Sequence 0 (the leader) is
scheduled first; the others follow once the leader's prompt is in the prefix cache, so they share its
blocks instead of recomputing them.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .multimodal.engine_inputs import MultimodalInputs
    from .sampler import SampledToken
    from .structured_output import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved: generation_config defaults already filled in
    max_tokens: int  # params.max_tokens, else max_new_tokens of generation_config.json or what is left of
    # max_model_len, whichever is less
    stop_token_ids: frozenset[int]  # stop_token_ids plus eos unless ignore_eos
    eos_token_ids: frozenset[int]  # masked until min_tokens (also when ignore_eos)
    bad_words_ids: list[list[int]] = field(default_factory=list)
    seed: int | None = None  # its sequences' sampling seed: params.seed, else one from the engine's seed
    prompt: str | None = None
    thinking: bool = False  # the prompt leaves the model thinking (its output starts with reasoning)
    has_tools: bool = False  # the request offered tools (else tool-call markup stays content)
    mm: MultimodalInputs | None = None  # images / videos of a multimodal model's prompt
    # prompt_logprobs: entry p scores prompt token p + 1 (None when not asked for)
    prompt_logprobs: list[SampledToken] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt then output
    rng: np.random.Generator  # per sequence, so a seeded draw does not depend on the batch
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first admission (-1: not yet)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks known so far
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    forced_token_id: int | None = None  # the sampler must pick this token next (reasoning budget)
    grammar: GrammarMatcher | None = None  # structured output: this sequence's matcher
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @classmethod
    def create(cls, request: Request, index: int) -> Sequence:
        seed = request.seed
        # numpy seeds are non-negative; vLLM's (torch's) may be any int64, so take its two's complement.
        rng = np.random.default_rng(None if seed is None else [int(seed) % 2**64, index])
        return cls(request=request, index=index, token_ids=list(request.prompt_token_ids), rng=rng)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def scores_prompt(self) -> bool:
        """The leader of a request asking for prompt logprobs, while some are still to be computed: its
        prompt must run through the model (no prefix-cache hits), since cached tokens have no logits."""
        scores = self.request.prompt_logprobs
        return self.index == 0 and scores is not None and len(scores) < self.num_prompt_tokens - 1

    @property
    def leader(self) -> Sequence:
        return self.request.sequences[0]

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
