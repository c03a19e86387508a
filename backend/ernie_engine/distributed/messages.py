"""What crosses the engine <-> worker pipes each step: a small batch description out, sampled tokens back.

The engine keeps the sequences (sampling parameters, generators, grammars) and the sampler; workers see
only flat arrays. A sampling row that is plain greedy comes back as its argmax from rank 0; any other row
(temperature, penalties, masks, logprobs, grammars) comes back as its logits row, which the engine samples
exactly as the single-device runner would.

Multimodal models: positions are [3, T] while a multimodal prompt is prefilled, ERNIE-4.5-VL's steps carry
the MoE vision mask, and a step whose prefill chunks hold image / video placeholders carries those media's
patches (`StepMedia`), only in that step: every rank runs its replicated vision encoder on them. Nothing
multimodal is kept on the ranks between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..multimodal.engine_inputs import step_positions, step_vision_mask
from ..sampler import PromptScoring, SampledToken, argmax_only
from ..scheduler import SchedulerOutput
from ..sequence import Sequence


@dataclass
class StepMedia:
    """The images / videos a step's prefill chunks need, and where their embedding rows go."""

    pixel_values: np.ndarray  # the items' patches, packed in item order
    grid_thw: np.ndarray  # [items, 3]
    num_rows: int  # embedding rows the items give (their placeholder tokens)
    embed_rows: np.ndarray  # [P] int64: rows of the items' embeddings the step's placeholders take, in order
    token_rows: np.ndarray  # [P] int64: the flat token rows (of input_ids) those placeholders are


@dataclass
class StepBatch:
    input_ids: np.ndarray  # [T] int64, the new tokens of all sequences, one sequence after another
    positions: np.ndarray  # [T] int64, or [3, T] (t, h, w) while a multimodal prompt is prefilled
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: np.ndarray  # [N] int64: flat token rows whose logits are sampled (last token of a sequence)
    greedy: np.ndarray  # [N] bool: rank 0 returns the argmax of the row instead of the row
    vision_mask: np.ndarray | None = None  # [T] bool: ERNIE-4.5-VL's tokens for the vision experts
    media: StepMedia | None = None
    # prompt_logprobs (`PromptScoring`): flat token rows to score, the prompt tokens they predict, top k
    score_rows: np.ndarray | None = None
    score_targets: np.ndarray | None = None
    score_top: int = 0


@dataclass
class StepResult:
    token_ids: np.ndarray  # [number of greedy rows] int64, argmax over the sampleable vocabulary
    logits: np.ndarray  # [number of other rows, vocab_limit] float32
    prompt_logprobs: list[SampledToken] = field(default_factory=list)  # one per score row


def describe_step(out: SchedulerOutput, vision_token_ids: list[int] | None = None,
                  scoring: PromptScoring | None = None) -> StepBatch:
    """The scheduled tokens as flat arrays (the single-device ModelRunner._prepare, without tensors).

    `vision_token_ids`: the model's (ERNIE-4.5-VL), when it takes a vision mask.
    """
    seqs = list(out.scheduled)
    query_lens = [out.scheduled[seq] for seq in seqs]
    starts = [seq.num_computed_tokens for seq in seqs]
    context_lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
    input_ids = np.fromiter(
        (t for seq, s, e in zip(seqs, starts, context_lens, strict=True) for t in seq.token_ids[s:e]),
        dtype=np.int64,
        count=sum(query_lens),
    )
    ends = dict(zip(seqs, np.cumsum(query_lens) - 1, strict=True))
    return StepBatch(
        input_ids=input_ids,
        positions=step_positions(seqs, starts, context_lens),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=[list(seq.block_table) for seq in seqs],
        sample_rows=np.array([ends[seq] for seq in out.sampling], dtype=np.int64),
        greedy=np.array([argmax_only(seq) for seq in out.sampling], dtype=bool),
        vision_mask=None if vision_token_ids is None else step_vision_mask(seqs, starts, context_lens,
                                                                             vision_token_ids),
        media=step_media(seqs, starts, context_lens),
        score_rows=None if scoring is None else scoring.rows,
        score_targets=None if scoring is None else scoring.targets,
        score_top=0 if scoring is None else scoring.top,
    )


def step_media(seqs: list[Sequence], starts: list[int], ends: list[int]) -> StepMedia | None:
    """The images / videos overlapping the sequences' chunks [start, end), each once (siblings of an n > 1
    request share them), and the row mapping of their placeholders; None when no chunk holds any."""
    first_row: dict[tuple[int, int], int] = {}  # (request's inputs, item) -> its first row in the pass
    pixels, grids, embed_rows, token_rows = [], [], [], []
    num_rows, offset = 0, 0  # offset: the flat token row of the sequence's first new token
    for seq, start, end in zip(seqs, starts, ends, strict=True):
        mm = seq.request.mm
        for item, (s, e) in enumerate(mm.spans if mm is not None else []):
            lo, hi = max(s, start), min(e, end)
            if lo >= hi:
                continue
            key = (id(mm), item)
            if key not in first_row:
                first_row[key] = num_rows
                item_pixels, grid = mm.media_item(item)
                pixels.append(item_pixels)
                grids.append(grid)
                num_rows += e - s  # one row per placeholder token of the item
            embed_rows.append(np.arange(lo - s, hi - s) + first_row[key])
            token_rows.append(np.arange(lo - start, hi - start) + offset)
        offset += end - start
    if not pixels:
        return None
    return StepMedia(
        pixel_values=np.concatenate(pixels),
        grid_thw=np.stack(grids).astype(np.int64),
        num_rows=num_rows,
        embed_rows=np.concatenate(embed_rows).astype(np.int64),
        token_rows=np.concatenate(token_rows).astype(np.int64),
    )
