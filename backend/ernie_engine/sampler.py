"""Batched sampling on the host: logits [B, V] -> one token (and optional logprobs) per sequence.

Order, as vLLM: forced token / allowed tokens / min_tokens / bad words masks, logit_bias, then repetition,
frequency and presence penalties; greedy rows take the argmax there, sampled rows go on through
temperature, min-p, top-k and top-p before an inverse-CDF draw. Each sequence draws from its own generator
(one number per token), so a seeded request gives the same tokens whatever else is in the batch.

What logprobs report is the engine's `logprobs_mode` (vLLM's and FastDeploy's): by default the log-softmax
of the raw model logits (`raw_logprobs`), or of the processed ones the token was chosen from
(`processed_logprobs`: a token the sampling excluded gets -inf), or those logits themselves (`raw_logits`,
`processed_logits`).

Prompt logprobs score the prompt's own tokens with the raw model logits of the positions before them, as
the prefill computes them, a slice of rows at a time (a 2048-token chunk's logits would take 850 MB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .sequence import Request, Sequence
from .structured_output import apply_grammar_masks


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # set when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # prompt tokens: how many tokens score at least as high (vLLM's; 1 = the top)


# The token of a row whose constraints leave nothing to sample; the engine fails that request.
NO_TOKEN = -1

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")

# Prompt positions scored per LM-head call: [256, vocab] float32 logits are ~100 MB for ERNIE's 103k vocab.
SCORE_ROWS = 256


def argmax_only(seq: Sequence) -> bool:
    """Greedy with nothing that edits or reports the logits: the argmax alone is the answer, so the runner
    may take it on the device instead of copying [B, vocab] logits to the host."""
    request, params = seq.request, seq.params
    return (
        params.greedy
        and params.logprobs is None
        and seq.forced_token_id is None
        and seq.grammar is None
        and not request.bad_words_ids
        and not params.logit_bias
        and params.allowed_token_ids is None
        and seq.num_output_tokens >= params.min_tokens
        and params.repetition_penalty == 1.0
        and not params.presence_penalty
        and not params.frequency_penalty
    )


class Sampler:
    def __init__(self, logprobs_mode: str = "raw_logprobs") -> None:
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, "
                             f"got {logprobs_mode!r}")
        self.reports_raw = logprobs_mode.startswith("raw")
        self.normalizes = logprobs_mode.endswith("logprobs")

    def __call__(self, logits: np.ndarray, seqs: list[Sequence]) -> list[SampledToken]:
        """`logits` is modified in place (it becomes the processed logits)."""
        asked = np.array([i for i, seq in enumerate(seqs) if seq.params.logprobs is not None], dtype=np.int64)
        raw = logits[asked] if self.reports_raw else None  # a copy (fancy indexing), before the edits below
        for row, seq in zip(logits, seqs, strict=True):
            _constrain(row, seq)
        apply_grammar_masks(logits, seqs)  # constrained rows only, one bitmask call
        # Constraints that exclude every token (bad_words against allowed_token_ids or a grammar): no token.
        alive = ~np.isneginf(logits).all(axis=1)
        greedy = np.array([seq.params.greedy for seq in seqs]) & alive
        token_ids = np.full(len(seqs), NO_TOKEN, dtype=np.int64)
        if greedy.any():
            token_ids[greedy] = logits[greedy].argmax(axis=1)
        sampled = np.flatnonzero(~greedy & alive)
        if sampled.size:
            token_ids[sampled] = _draw(logits, sampled, seqs)
        results = [SampledToken(int(tok)) for tok in token_ids]
        got = token_ids[asked] != NO_TOKEN
        if got.any():
            rows = (raw if raw is not None else logits[asked])[got]
            asked = asked[got]
            top = max(seqs[i].params.logprobs for i in asked)
            for i, scored in zip(asked, _score(rows, token_ids[asked], top, self.normalizes), strict=True):
                k = seqs[i].params.logprobs
                results[i] = SampledToken(scored.token_id, scored.logprob, scored.top_logprobs[:k])
        return results


def _constrain(row: np.ndarray, seq: Sequence) -> None:
    """Masks and penalties that apply to greedy and sampled rows alike."""
    if seq.forced_token_id is not None:
        row[:] = -np.inf
        row[seq.forced_token_id] = 0.0
        return
    request, params = seq.request, seq.params
    if params.allowed_token_ids is not None:
        allowed = row[params.allowed_token_ids]
        row[:] = -np.inf
        row[params.allowed_token_ids] = allowed
    if seq.num_output_tokens < params.min_tokens:
        row[list(request.stop_token_ids | request.eos_token_ids)] = -np.inf
    if request.bad_words_ids:
        _mask_bad_words(row, seq)
    if params.logit_bias:
        bias = params.logit_bias
        row[np.fromiter(bias, np.int64, len(bias))] += np.fromiter(bias.values(), np.float32, len(bias))
    rep, pres, freq = params.repetition_penalty, params.presence_penalty, params.frequency_penalty
    if rep == 1.0 and pres == 0.0 and freq == 0.0:
        return
    counts = np.bincount(np.asarray(seq.output_token_ids, dtype=np.int64), minlength=row.size)[: row.size]
    if rep != 1.0:
        seen = counts > 0
        seen[request.prompt_token_ids] = True
        # An extreme penalty over- or underflows float32: keep +inf finite and masked (-inf * 0) tokens out.
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            penalized = np.where(row[seen] > 0, row[seen] / rep, row[seen] * rep)
        row[seen] = np.nan_to_num(penalized, nan=-np.inf, posinf=np.finfo(np.float32).max)
    if freq or pres:
        row -= freq * counts + pres * (counts > 0)


def _mask_bad_words(row: np.ndarray, seq: Sequence) -> None:
    """Single-token words are always banned; a longer word's last token when the output ends with the rest."""
    output = seq.output_token_ids
    for word in seq.request.bad_words_ids:
        prefix = word[:-1]
        if not prefix or output[-len(prefix) :] == prefix:
            row[word[-1]] = -np.inf


def _draw(logits: np.ndarray, rows: np.ndarray, seqs: list[Sequence]) -> np.ndarray:
    for r in rows:
        params = seqs[r].params
        with np.errstate(over="ignore"):
            logits[r] /= params.temperature
        # A logit pushed to float32's max (an extreme repetition penalty) must not become inf, then NaN.
        np.minimum(logits[r], np.finfo(np.float32).max, out=logits[r])
        _truncate(logits[r], params.top_k, params.top_p, params.min_p)
    probs = _softmax(logits[rows])
    cdf = np.cumsum(probs, axis=1, dtype=np.float64)
    total = cdf[:, -1]
    u = np.array([seqs[r].rng.random() for r in rows])
    # The first index whose cdf exceeds u * total always has a positive probability.
    x = np.minimum(u * total, np.nextafter(total, 0))
    return (cdf <= x[:, None]).sum(axis=1)


def _truncate(row: np.ndarray, top_k: int, top_p: float, min_p: float) -> None:
    """As vLLM and FastDeploy: min-p, then top-k (ties with the k-th kept), then top-p over what is left (the
    smallest set reaching top_p, at least one token); the excluded tokens become -inf."""
    if min_p > 0.0:
        probs = _softmax(row[None])[0]
        row[probs < min_p * probs.max()] = -np.inf
    if 0 < top_k < row.size:
        kth = np.partition(row, row.size - top_k)[row.size - top_k]
        row[row < kth] = -np.inf
    if top_p < 1.0:
        probs = _softmax(row[None])[0]
        desc = np.sort(probs)[::-1]
        before = np.cumsum(desc) - desc  # mass of strictly more likely tokens
        # At least the likeliest token: a top_p below float32's range compares as 0 against `before`.
        threshold = desc[max(1, np.count_nonzero(before < top_p)) - 1]
        row[probs < threshold] = -np.inf


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class PromptScoring:
    """The prompt tokens a step scores (prompt_logprobs): flat token rows of the step whose logits predict
    them, and whose they are."""

    rows: np.ndarray  # [R] int64 flat token rows
    targets: np.ndarray  # [R] int64: the prompt token each row predicts
    top: int  # top logprobs per row: the most any of the requests asked for
    owners: list[tuple[Request, int]]  # in row order: a request and how many of the rows are its

    @classmethod
    def of_step(cls, seqs: list[Sequence], query_lens: list[int]) -> PromptScoring | None:
        rows, targets, owners = [], [], []
        offset = 0
        for seq, n in zip(seqs, query_lens, strict=True):
            if seq.scores_prompt:
                start, done = seq.num_computed_tokens, len(seq.request.prompt_logprobs)
                # Position p predicts prompt token p + 1; those before `done` were scored before a preemption.
                first, end = max(start, done), min(start + n, seq.num_prompt_tokens - 1)
                if start <= done and first < end:
                    rows.append(np.arange(offset + first - start, offset + end - start, dtype=np.int64))
                    targets.append(np.array(seq.request.prompt_token_ids[first + 1 : end + 1], np.int64))
                    owners.append((seq.request, end - first))
            offset += n
        if not owners:
            return None
        top = max(request.params.prompt_logprobs for request, _ in owners)
        return cls(np.concatenate(rows), np.concatenate(targets), top, owners)

    def deliver(self, scored: list[SampledToken]) -> None:
        i = 0
        for request, count in self.owners:
            k = request.params.prompt_logprobs
            request.prompt_logprobs += [SampledToken(t.token_id, t.logprob, t.top_logprobs[:k], t.rank)
                                        for t in scored[i : i + count]]
            i += count


def score_prompt_rows(rows: np.ndarray, targets: np.ndarray, top: int,
                      logits_of: Callable[[np.ndarray], np.ndarray | None]) -> list[SampledToken]:
    """Each target's logprob (and the top ones) under the logits of its row. `logits_of(rows)` gives
    [len(rows), vocab] float32 logits; under tensor parallelism every rank calls it (a collective) and only
    rank 0 gets logits back (the others None, and an empty result)."""
    scored: list[SampledToken] = []
    for i in range(0, len(rows), SCORE_ROWS):
        logits = logits_of(rows[i : i + SCORE_ROWS])
        if logits is not None:
            scored += _score(logits, targets[i : i + SCORE_ROWS], top)
    return scored


def _score(logits: np.ndarray, targets: np.ndarray, top: int, normalize: bool = True) -> list[SampledToken]:
    """Each row's target and its `top` likeliest tokens, as log-softmax values of the row (or, without
    `normalize`, the logits themselves), with the target's rank (vLLM's: how many tokens score at least as
    high)."""
    norm = np.zeros((len(logits), 1), logits.dtype)
    if normalize:
        peak = logits.max(axis=1, keepdims=True)
        norm = peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))  # log-sum-exp per row
    target_logits = np.take_along_axis(logits, targets[:, None], axis=1)
    chosen = target_logits[:, 0] - norm[:, 0]
    ranks = (logits >= target_logits).sum(axis=1)
    tops: list[list[tuple[int, float]]] = [[] for _ in targets]
    if top:
        ids = np.argpartition(-logits, top - 1, axis=1)[:, :top]
        values = np.take_along_axis(logits, ids, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        ids, values = np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1) - norm
        tops = [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]
    return [SampledToken(int(t), float(lp), row_top, int(r))
            for t, lp, row_top, r in zip(targets, chosen, tops, ranks, strict=True)]
