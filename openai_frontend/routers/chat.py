"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from openai_frontend.outputs import (
    GenerateOutput,
    RequestState,
    chat_logprobs,
    chat_response,
    usage,
)
from openai_frontend.routers.models import resolve_model
from openai_frontend.schemas.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    Usage,
    new_id,
)
from openai_frontend.streaming import ResponseMeta, collect, event_stream, merged, sse, until_disconnected
from openai_frontend.translate import chat_payload, named_tool
from openai_frontend.triton_client import TritonStream

ENDPOINT = "/v1/chat/completions"
router = APIRouter()


@router.post(ENDPOINT, response_model=None)
async def create_chat_completion(body: ChatCompletionRequest,
                                 request: Request) -> ChatCompletionResponse | StreamingResponse:
    triton = request.app.state.triton
    model = await resolve_model(triton, body.model)
    meta = ResponseMeta(ENDPOINT, request.app.state.metrics, new_id("chatcmpl"), model)
    stream = await triton.generate_stream(model, chat_payload(body))
    if body.stream:
        return event_stream(_chunks(body, stream, meta), [stream], meta)
    state = RequestState(n=body.n)
    await until_disconnected(request, collect([stream], [state], _tool_call_converter(body)))
    response = chat_response(state, id=meta.id, created=meta.created, model=model,
                             return_token_ids=bool(body.return_token_ids),
                             prompt_logprobs=body.prompt_logprobs)
    meta.count_usage(response.usage)
    return response


def _tool_call_converter(req: ChatCompletionRequest) -> Callable[[GenerateOutput, RequestState], None]:
    """How a forcing tool_choice's schema-constrained content becomes tool calls (else nothing to do)."""
    if (name := named_tool(req)) is not None:
        return lambda out, state: _as_tool_call(out, name, state)
    if req.tool_choice == "required":
        return _RequiredToolCalls()
    return lambda out, state: None


def _tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _as_tool_call(out: GenerateOutput, name: str, state: RequestState) -> None:
    """Named tool_choice: the (schema-constrained) content is the call's arguments. As the tool-call parser's
    calls: a first delta with id, type, name and arguments "", then the arguments as they arrive."""
    if not out.text:
        return
    deltas: list[dict] = [{"index": 0, "function": {"arguments": out.text}}]
    choice = state.choices.get(out.index)
    if choice is None or not choice.tool_calls:
        header = {"index": 0, "id": _tool_call_id(), "type": "function",
                  "function": {"name": name, "arguments": ""}}
        deltas.insert(0, header)
    out.tool_calls, out.text = deltas, ""


class _RequiredToolCalls:
    """tool_choice "required" (as vLLM): the content is a JSON array of {name, parameters}, constrained by its
    schema. It is held back until its completion finishes, then given as that many whole tool calls with
    finish_reason "tool_calls"; content cut short (max_tokens) stays content."""

    def __init__(self) -> None:
        self.held: dict[int, str] = {}

    def __call__(self, out: GenerateOutput, state: RequestState) -> None:
        text = self.held.pop(out.index, "") + out.text
        if out.finish_reason is None:
            self.held[out.index], out.text = text, ""
            return
        try:
            calls = [(call["name"], call["parameters"]) for call in json.loads(text)]
        except (json.JSONDecodeError, TypeError, KeyError):  # cut short: not the whole array
            out.text = text
            return
        out.text = ""
        out.tool_calls = [
            {"index": i, "id": _tool_call_id(), "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
            for i, (name, arguments) in enumerate(calls)
        ]
        out.finish_reason = "tool_calls" if out.finish_reason == "stop" else out.finish_reason


def delta_choices(out: GenerateOutput, index: int, return_token_ids: bool) -> list[ChatChunkChoice]:
    """One chunk per tool-call delta, as OpenAI streams a call's header and each arguments fragment apart;
    text, reasoning, logprobs and token ids ride on the first, the finish reason on the last."""
    calls = out.tool_calls
    deltas = [DeltaMessage(
        # An empty string rather than null, so clients printing `delta.content` print nothing.
        content=out.text if out.text or not calls else None,
        reasoning_content=out.reasoning or None,
        tool_calls=calls[:1] or None,
        prompt_token_ids=out.prompt_token_ids if return_token_ids else None,
        completion_token_ids=out.token_ids if return_token_ids else None,
    )] + [DeltaMessage(tool_calls=[call]) for call in calls[1:]]
    choices = [ChatChunkChoice(index=index, delta=delta) for delta in deltas]
    choices[0].logprobs = chat_logprobs(out.logprobs)
    choices[-1].finish_reason = out.finish_reason
    return choices


async def _chunks(req: ChatCompletionRequest, stream: TritonStream, meta: ResponseMeta) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], totals: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=choices,
                                       usage=totals))

    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                 for i in range(req.n)])
    state = RequestState(n=req.n)
    as_tool_calls = _tool_call_converter(req)
    async for _, out in merged([stream]):
        meta.saw_output(out)
        as_tool_calls(out, state)
        choice = state.add(out)
        if out.has_delta or choice.new_tokens:  # a chunk per step that generated tokens, as in completions
            so_far = usage([state]) if req.continuous_usage else None
            for delta_choice in delta_choices(out, choice.index, bool(req.return_token_ids)):
                yield chunk([delta_choice], so_far)
    totals = usage([state])
    meta.count_usage(totals)
    if req.include_usage:
        yield chunk([], totals)
