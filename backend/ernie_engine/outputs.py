"""What the engine streams back for a request: one `RequestOutput` per step in which the request advanced.

Outputs are deltas (new text, new token ids since the previous output), which is what both Triton's
streaming responses and OpenAI chunks carry; a non-streaming consumer concatenates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token, logprob)


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str = ""  # new content text
    token_ids: list[int] = field(default_factory=list)  # new token ids
    reasoning_text: str = ""  # new reasoning text (when a reasoning parser is configured)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI streaming tool_call deltas
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked
    finish_reason: str | None = None  # "stop", "length", "abort", "tool_calls" once finished
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_output_tokens: int = 0  # cumulative


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    num_prompt_tokens: int
    prompt_token_ids: list[int] | None = None  # on the first output only
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finished: bool = False  # every completion of the request has finished
    error: str | None = None  # set when the request failed inside the engine
