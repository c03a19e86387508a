"""OpenAI request -> Triton generate JSON for the `ernie` backend (see the tensor table in ARCHITECTURE.md).

Only what the client set is forwarded, so the backend's defaults (max_model_len, generation_config) apply.
"""

from __future__ import annotations

import json
from typing import Any

from openai_frontend.errors import OpenAIError
from openai_frontend.schemas.openai import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTemplateInputs,
    CompletionRequest,
    GenerationRequest,
    NamedToolChoice,
    TokenizeRequest,
    Tool,
)

# Request fields that map one to one onto `sampling_parameters` keys.
_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "min_tokens", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "bad_words", "logit_bias", "allowed_token_ids", "truncate_prompt_tokens", "skip_special_tokens",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
)

# Outputs every OpenAI response needs; logprobs and token ids only when asked.
_RETURN_FLAGS = {
    "return_finish_reason": True, "return_num_input_tokens": True, "return_num_output_tokens": True,
}


def sampling_parameters(req: GenerationRequest, max_tokens: int | None,
                        logprobs: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in _SAMPLING_FIELDS:
        value = getattr(req, name)
        if value is not None and not (name == "n" and value == 1):
            params[name] = value
    if req.top_p == 0:
        # FastDeploy users send top_p=0 for greedy decoding; the nucleus then holds only the top token.
        del params["top_p"]
        params["top_k"] = 1
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if logprobs is not None:
        params["logprobs"] = logprobs
    if req.prompt_logprobs is not None:
        params["prompt_logprobs"] = req.prompt_logprobs
    params.update(_response_format(req))
    return params


def _response_format(req: GenerationRequest) -> dict[str, Any]:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"guided_json_object": True}
    return {"guided_json": fmt.json_schema.json_schema}


def named_tool(req: ChatCompletionRequest) -> str | None:
    """The function a named tool_choice forces, or None."""
    return req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None


def _required_tools_schema(req: ChatCompletionRequest) -> dict[str, Any]:
    """tool_choice "required" (as vLLM): the content is a non-empty JSON array of calls of the given tools."""
    if not req.tools:
        raise OpenAIError(400, 'tool_choice "required" needs tools', param="tool_choice")
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                             "parameters": tool.function.parameters or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False}
             for tool in req.tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if req.parallel_tool_calls is False:  # OpenAI's: one call at most
        schema["maxItems"] = 1
    return schema


def _named_tool_schema(req: ChatCompletionRequest, name: str) -> dict[str, Any]:
    """A forced call's arguments are constrained to the function's parameters schema."""
    for tool in req.tools or []:
        if tool.function.name == name:
            return tool.function.parameters or {"type": "object"}
    raise OpenAIError(400, f"tool_choice names the function {name!r}, which is not in tools",
                      param="tool_choice")


def _flags(req: GenerationRequest, logprobs: int | None) -> dict[str, Any]:
    flags = dict(_RETURN_FLAGS)
    if logprobs is not None:
        flags["return_logprobs"] = True
    if req.return_token_ids:
        flags["return_token_ids"] = True
    return flags


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


def _drop_response_format(params: dict[str, Any]) -> None:
    params.pop("guided_json_object", None)
    params.pop("structured_outputs", None)


def chat_payload(req: ChatCompletionRequest) -> dict[str, Any]:
    logprobs = chat_logprobs(req)
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling_parameters(req, max_tokens, logprobs)
    if req.reasoning_max_tokens is not None:
        params["reasoning_max_tokens"] = req.reasoning_max_tokens
    # A forced tool call's schema replaces a response format, as in vLLM.
    if (name := named_tool(req)) is not None:
        _drop_response_format(params)
        params["guided_json"] = _named_tool_schema(req, name)
    elif req.tool_choice == "required":
        _drop_response_format(params)
        params["guided_json"] = _required_tools_schema(req)
    payload: dict[str, Any] = {
        "stream": True,  # also for non-streaming requests (see streaming.py)
        "sampling_parameters": json.dumps(params, ensure_ascii=False),
        **_flags(req, logprobs),
    }
    # tool_choice "none" means the model must not call tools, so it is not shown any.
    tools = req.tools if req.tool_choice != "none" else None
    return {**payload, **_chat_inputs(req, tools)}


def _chat_inputs(req: ChatTemplateInputs, tools: list[Tool] | None) -> dict[str, str]:
    """The `messages`, `tools` and `chat_template_kwargs` inputs (JSON strings). Where the prompt ends rides
    in chat_template_kwargs, where the backend reads it (keys the client put there win, as in vLLM)."""
    dumped = [_template_message(m) for m in req.messages]
    inputs = {"messages": json.dumps(dumped, ensure_ascii=False)}
    if tools:
        inputs["tools"] = json.dumps([t.model_dump(exclude_unset=True) for t in tools], ensure_ascii=False)
    kwargs = {name: value for name, value in (("add_generation_prompt", req.add_generation_prompt),
                                              ("continue_final_message", req.continue_final_message))
              if name in req.model_fields_set}
    kwargs.update(req.chat_template_kwargs or {})
    if kwargs:
        inputs["chat_template_kwargs"] = json.dumps(kwargs, ensure_ascii=False)
    return inputs


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as the chat template takes it: OpenAI's "developer" role is its newer name for "system"."""
    dumped = message.model_dump(exclude_unset=True)
    return {**dumped, "role": "system"} if message.role == "developer" else dumped


def tokenize_payload(req: TokenizeRequest) -> dict[str, Any]:
    """The backend's tokenize task: the ids a generation request for the same prompt or messages runs on."""
    payload: dict[str, Any] = {"task": "tokenize", "add_special_tokens": req.add_special_tokens}
    if req.prompt is not None:
        return {**payload, "text_input": req.prompt}
    return {**payload, **_chat_inputs(req, req.tools)}


def detokenize_payload(tokens: list[int]) -> dict[str, Any]:
    return {"task": "detokenize", "prompt_token_ids": tokens}


def completion_payloads(req: CompletionRequest) -> list[dict[str, Any]]:
    """One generate request per prompt; the choices of prompt p are indexed p * n + i."""
    params = sampling_parameters(req, 1 if req.echo_only else req.max_tokens, req.logprobs)
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too
        params["prompt_logprobs"] = max(req.logprobs, req.prompt_logprobs or 0)
    common = {"stream": True, "sampling_parameters": json.dumps(params, ensure_ascii=False),
              **_flags(req, req.logprobs)}
    key = "prompt_token_ids" if req.prompts_are_token_ids else "text_input"
    if req.echo and req.prompts_are_token_ids and not req.echo_only:  # the backend echoes them as text
        common["exclude_input_in_output"] = False
    return [{key: prompt, **common} for prompt in req.prompt_list()]
