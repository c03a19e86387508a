"""Triton generate responses -> OpenAI response pieces.

A streaming Triton response is one step's delta for one of the request's n completions (`index`); the single
non-streaming response holds one element per completion (`output_token_ids` concatenated, split by
`num_output_tokens`). Both become `GenerateOutput`s, which `RequestState` accumulates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from openai_frontend.schemas.openai import (
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FunctionCall,
    ResponseMessage,
    ToolCall,
    Usage,
)

# Outputs with one element per completion; Triton's generate JSON renders a one-element tensor as a scalar.
_PER_COMPLETION = ("text_output", "reasoning_output", "tool_calls", "finish_reason", "num_input_tokens",
                   "num_output_tokens", "num_cached_tokens", "logprobs")


def _elements(value: Any, count: int) -> list[Any]:
    if value is None:
        return [None] * count
    return value if isinstance(value, list) and count > 1 else [value]


def ints(value: Any) -> list[int]:
    """An INT tensor of a generate response as a list (a one-element tensor arrives as a scalar)."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _json_list(value: Any) -> list[dict[str, Any]]:
    if not value:
        return []
    parsed = json.loads(value) if isinstance(value, str) else value
    return parsed if isinstance(parsed, list) else [parsed]


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass
class GenerateOutput:
    """One completion's part of a Triton generate response."""

    index: int = 0
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    num_cached_tokens: int | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, Any]] | None = None  # completions' echo with logprobs: per prompt token

    @classmethod
    def from_row(cls, index: int, row: dict[str, Any], prompt_ids: Any,
                 prompt_logprobs: Any) -> GenerateOutput:
        return cls(
            index=index,
            text=row["text_output"] or "",
            reasoning=row["reasoning_output"] or "",
            tool_calls=_json_list(row["tool_calls"]),
            finish_reason=row["finish_reason"] or None,
            num_input_tokens=_opt_int(row["num_input_tokens"]),
            num_output_tokens=_opt_int(row["num_output_tokens"]),
            num_cached_tokens=_opt_int(row["num_cached_tokens"]),
            logprobs=_json_list(row["logprobs"]),
            prompt_token_ids=None if prompt_ids is None else ints(prompt_ids),
            prompt_logprobs=None if prompt_logprobs is None else _json_list(prompt_logprobs),
        )

    @property
    def has_delta(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls or self.finish_reason or self.logprobs
                    or self.token_ids)


def parse_response(body: dict[str, Any]) -> list[GenerateOutput]:
    """One Triton generate response -> one output per completion it covers."""
    indexes = ints(body.get("index", 0))
    columns = {name: _elements(body.get(name), len(indexes)) for name in _PER_COMPLETION}
    token_ids = ints(body.get("output_token_ids"))
    prompt_ids = body.get("prompt_token_ids")
    outputs = []
    for k, index in enumerate(indexes):
        row = {name: values[k] for name, values in columns.items()}
        out = GenerateOutput.from_row(index, row, prompt_ids, body.get("prompt_logprobs"))
        # Concatenated in index order: each completion's share is its num_output_tokens.
        share = len(token_ids) if len(indexes) == 1 else out.num_output_tokens or 0
        out.token_ids, token_ids = token_ids[:share], token_ids[share:]
        outputs.append(out)
    return outputs


def merge_tool_call(calls: list[dict[str, Any]], delta: dict[str, Any]) -> None:
    """Fold an OpenAI streaming tool-call delta into full calls (arguments arrive in pieces)."""
    index = delta.get("index", len(calls))
    while len(calls) <= index:
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    call["id"] = delta.get("id") or call["id"]
    function = delta.get("function") or {}
    call["function"]["name"] = function.get("name") or call["function"]["name"]
    arguments = function.get("arguments")
    if arguments is not None:
        call["function"]["arguments"] += arguments if isinstance(arguments, str) else json.dumps(arguments)


@dataclass
class ChoiceState:
    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    new_tokens: int = 0  # how many tokens the last output added
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def add(self, out: GenerateOutput) -> None:
        self.text += out.text
        self.reasoning += out.reasoning
        for delta in out.tool_calls:
            merge_tool_call(self.tool_calls, delta)
        self.finish_reason = out.finish_reason or self.finish_reason
        self.new_tokens = 0
        if out.num_output_tokens is not None:
            self.new_tokens = out.num_output_tokens - self.num_output_tokens
            self.num_output_tokens = out.num_output_tokens
        self.logprobs.extend(out.logprobs)
        self.token_ids.extend(out.token_ids)


@dataclass
class RequestState:
    """Everything received for one Triton request, whose choices are numbered from `offset`."""

    n: int
    offset: int = 0
    num_input_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)
    choices: dict[int, ChoiceState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.choices = {i: ChoiceState(self.offset + i) for i in range(self.n)}

    def add(self, out: GenerateOutput) -> ChoiceState:
        if out.num_input_tokens is not None:
            self.num_input_tokens = out.num_input_tokens
        if out.num_cached_tokens is not None:
            self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_token_ids is not None:
            self.prompt_token_ids = out.prompt_token_ids
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        choice = self.choices.setdefault(out.index, ChoiceState(self.offset + out.index))
        choice.add(out)
        return choice


def usage(states: list[RequestState]) -> Usage:
    prompt = sum(s.num_input_tokens for s in states)
    completion = sum(c.num_output_tokens for s in states for c in s.choices.values())
    cached = sum(s.num_cached_tokens for s in states)
    details = {"cached_tokens": cached} if cached else None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=details)


# ---- logprobs in OpenAI's two shapes ------------------------------------------------------------


def _chat_entry(entry: dict[str, Any]) -> dict[str, Any]:
    token = entry.get("token", "")
    return {"token": token, "logprob": entry["logprob"], "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not entries:
        return None
    content = [
        {**_chat_entry(e), "top_logprobs": [_chat_entry(t) for t in e.get("top_logprobs") or []]}
        for e in entries
    ]
    return {"content": content}


def completion_logprobs(entries: list[dict[str, Any]], text_offset: int,
                        top: int | None = None) -> dict[str, Any] | None:
    """Legacy completions shape: offsets from `text_offset` on, at most `top` alternatives."""
    if not entries:
        return None
    tokens, offsets = [], []
    for e in entries:
        offsets.append(text_offset)
        tokens.append(e.get("token", ""))
        text_offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        # A prompt's first token (echo) has no logprob: null, as OpenAI's.
        "top_logprobs": [None if e["logprob"] is None else _top_logprobs(e, top) for e in entries],
        "text_offset": offsets,
    }


def _top_logprobs(entry: dict[str, Any], top: int | None) -> dict[str, float]:
    """The `top` likeliest tokens and the token itself, as OpenAI and vLLM give them (top + 1 at most)."""
    alternatives = (entry.get("top_logprobs") or [])[:top]
    shaped = {t.get("token", ""): t["logprob"] for t in alternatives}
    shaped.setdefault(entry.get("token", ""), entry["logprob"])
    return shaped


def choice_logprobs(req: CompletionRequest, prompt_entries: list[dict[str, Any]],
                    entries: list[dict[str, Any]], text_offset: int) -> dict[str, Any] | None:
    """A completions choice's (or chunk's) logprobs. With echo and logprobs the prompt's tokens come first,
    offsets from the prompt's start; alternatives at most `logprobs`."""
    echoed = prompt_entries if req.echo and req.logprobs is not None else []
    return completion_logprobs(echoed + entries, 0 if echoed else text_offset, req.logprobs)


def vllm_prompt_logprobs(entries: list[dict[str, Any]], top: int) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or, keyed by token id, the token itself and
    the `top` likeliest, each as {logprob, rank, decoded_token}."""
    shaped: list[dict[str, Any] | None] = []
    for e in entries:
        if e["logprob"] is None:
            shaped.append(None)
            continue
        row = {str(t["token_id"]): {"logprob": t["logprob"], "rank": rank, "decoded_token": t["token"]}
               for rank, t in enumerate(e.get("top_logprobs", [])[:top], start=1)}
        itself = {"logprob": e["logprob"], "rank": e.get("rank"), "decoded_token": e["token"]}
        row[str(e["token_id"])] = itself
        shaped.append(row)
    return shaped


# ---- non-streaming responses --------------------------------------------------------------------


def _full_tool_calls(calls: list[dict[str, Any]]) -> list[ToolCall] | None:
    if not calls:
        return None
    return [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in calls]


def chat_response(state: RequestState, *, id: str, created: int, model: str, return_token_ids: bool,
                  prompt_logprobs: int | None = None) -> ChatCompletionResponse:
    choices = []
    for choice in sorted(state.choices.values(), key=lambda c: c.index):
        message = ResponseMessage(
            content=choice.text if choice.text or not choice.tool_calls else None,
            reasoning_content=choice.reasoning or None,
            tool_calls=_full_tool_calls(choice.tool_calls),
            prompt_token_ids=state.prompt_token_ids if return_token_ids else None,
            completion_token_ids=choice.token_ids if return_token_ids else None,
        )
        logprobs = chat_logprobs(choice.logprobs)
        choices.append(ChatChoice(index=choice.index, message=message, logprobs=logprobs,
                                  finish_reason=choice.finish_reason))
    scored = None if prompt_logprobs is None else vllm_prompt_logprobs(state.prompt_logprobs, prompt_logprobs)
    return ChatCompletionResponse(id=id, created=created, model=model, choices=choices, usage=usage([state]),
                                  prompt_logprobs=scored)


def completion_response(states: list[RequestState], req: CompletionRequest, prefixes: list[str], *, id: str,
                        created: int, model: str) -> CompletionResponse:
    """`prefixes`: per prompt, the echoed text its choices start with."""
    choices = []
    for state, prefix in zip(states, prefixes, strict=True):
        for choice in sorted(state.choices.values(), key=lambda c: c.index):
            choices.append(CompletionChoice(
                index=choice.index,
                text=prefix + choice.text,
                logprobs=choice_logprobs(req, state.prompt_logprobs, choice.logprobs, len(prefix)),
                finish_reason=choice.finish_reason,
                reasoning_content=choice.reasoning or None,
                prompt_token_ids=state.prompt_token_ids if req.return_token_ids else None,
                completion_token_ids=choice.token_ids if req.return_token_ids else None,
                prompt_logprobs=None if req.prompt_logprobs is None else
                vllm_prompt_logprobs(state.prompt_logprobs, req.prompt_logprobs),
            ))
    return CompletionResponse(id=id, created=created, model=model, choices=choices, usage=usage(states))
