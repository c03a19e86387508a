"""What crosses the engine <-> worker pipes each step: a small batch description out, sampled tokens back.

The engine keeps the sequences (sampling parameters, generators, grammars) and the sampler; workers see
only flat arrays. A sampling row that is plain greedy comes back as its argmax from rank 0; any other row
(temperature, penalties, masks, logprobs, grammars) comes back as its logits row, which the engine samples
exactly as the single-device runner would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..scheduler import SchedulerOutput
from ..sequence import Sequence


@dataclass
class StepBatch:
    input_ids: np.ndarray  # [T] int64, the new tokens of all sequences, one sequence after another
    positions: np.ndarray  # [T] int64
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: np.ndarray  # [N] int64: flat token rows whose logits are sampled (last token of a sequence)
    greedy: np.ndarray  # [N] bool: rank 0 returns the argmax of the row instead of the row


@dataclass
class StepResult:
    token_ids: np.ndarray  # [number of greedy rows] int64, argmax over the sampleable vocabulary
    logits: np.ndarray  # [number of other rows, vocab_limit] float32


def plain_greedy(seq: Sequence) -> bool:
    """True when the sampler would take the raw argmax: greedy and nothing of `sampler._constrain` applies."""
    params, request = seq.params, seq.request
    return (
        params.greedy
        and params.logprobs is None
        and seq.forced_token_id is None
        and seq.grammar is None
        and not request.bad_words_ids
        and seq.num_output_tokens >= params.min_tokens
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
    )


def describe_step(out: SchedulerOutput) -> StepBatch:
    """The scheduled tokens as flat arrays (the single-device ModelRunner._prepare, without tensors)."""
    seqs = list(out.scheduled)
    query_lens = [out.scheduled[seq] for seq in seqs]
    starts = [seq.num_computed_tokens for seq in seqs]
    context_lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
    input_ids = np.fromiter(
        (t for seq, s, e in zip(seqs, starts, context_lens, strict=True) for t in seq.token_ids[s:e]),
        dtype=np.int64,
        count=sum(query_lens),
    )
    positions = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in zip(starts, context_lens,
                                                                                  strict=True)])
    ends = dict(zip(seqs, np.cumsum(query_lens) - 1, strict=True))
    return StepBatch(
        input_ids=input_ids,
        positions=positions,
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=[list(seq.block_table) for seq in seqs],
        sample_rows=np.array([ends[seq] for seq in out.sampling], dtype=np.int64),
        greedy=np.array([plain_greedy(seq) for seq in out.sampling], dtype=bool),
    )
