"""What the engine streams back for a request: one `RequestOutput` per step in which the request advanced.

Outputs are deltas (new text, new token ids since the previous output), which is what both Triton's
streaming responses and OpenAI chunks carry; a non-streaming consumer concatenates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .parsers import merge_tool_call_deltas


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None for a prompt's first token (nothing comes before it)
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token, logprob)
    rank: int | None = None  # prompt tokens: 1 + how many tokens the model found likelier


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str = ""  # new content text
    token_ids: list[int] = field(default_factory=list)  # new token ids
    reasoning_text: str = ""  # new reasoning text (when a reasoning parser is configured)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI streaming tool_call deltas
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked
    cumulative_logprob: float | None = None  # vLLM's: the sampled tokens' logprobs summed so far, when asked
    finish_reason: str | None = None  # "stop", "length", "abort", "tool_calls" once finished
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_output_tokens: int = 0  # cumulative
    parsed: bool = False  # the text went through a reasoning / tool-call parser (which may hold it back)


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    num_prompt_tokens: int
    prompt_token_ids: list[int] | None = None  # on the first output only
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output, when asked: one per prompt token
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finished: bool = False  # every completion of the request has finished
    error: str | None = None  # set when the request failed inside the engine


def merge_outputs(deltas: list[RequestOutput]) -> RequestOutput:
    """Concatenate a request's streamed deltas into one output per completion (non-streaming consumers)."""
    if not deltas:
        raise ValueError("no outputs to merge")
    merged: dict[int, CompletionOutput] = {}
    for delta in deltas:
        for out in delta.outputs:
            acc = merged.setdefault(out.index, CompletionOutput(out.index))
            acc.text += out.text
            acc.token_ids += out.token_ids
            acc.reasoning_text += out.reasoning_text
            acc.tool_calls += out.tool_calls
            if out.logprobs is not None:
                acc.logprobs = (acc.logprobs or []) + out.logprobs
                acc.cumulative_logprob = out.cumulative_logprob
            acc.finish_reason = out.finish_reason or acc.finish_reason
            acc.stop_reason = out.stop_reason if out.stop_reason is not None else acc.stop_reason
            acc.num_output_tokens = max(acc.num_output_tokens, out.num_output_tokens)
    for acc in merged.values():  # one whole call per index, as a non-streaming answer holds
        acc.tool_calls = merge_tool_call_deltas(acc.tool_calls)
    first, last = deltas[0], deltas[-1]
    return RequestOutput(
        request_id=first.request_id,
        outputs=[merged[i] for i in sorted(merged)],
        num_prompt_tokens=first.num_prompt_tokens,
        prompt_token_ids=first.prompt_token_ids,
        prompt_logprobs=first.prompt_logprobs,
        num_cached_tokens=first.num_cached_tokens,
        finished=last.finished,
        error=next((d.error for d in deltas if d.error), None),
    )
