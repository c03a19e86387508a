"""POST /v1/completions: one Triton request per prompt; prompt p's choices are indexed p * n + i."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from openai_frontend.outputs import (
    GenerateOutput,
    RequestState,
    choice_logprobs,
    completion_response,
    usage,
)
from openai_frontend.routers.models import resolve_model
from openai_frontend.schemas.openai import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
)
from openai_frontend.streaming import (
    ResponseMeta,
    collect,
    event_stream,
    merged,
    open_streams,
    sse,
    until_disconnected,
)
from openai_frontend.translate import completion_payloads, detokenize_payload
from openai_frontend.triton_client import TritonClient, TritonStream

ENDPOINT = "/v1/completions"
router = APIRouter()


@router.post(ENDPOINT, response_model=None)
async def create_completion(body: CompletionRequest,
                            request: Request) -> CompletionResponse | StreamingResponse:
    triton = request.app.state.triton
    model = await resolve_model(triton, body.model)
    meta = ResponseMeta(ENDPOINT, request.app.state.metrics, new_id("cmpl"), model)
    prefixes = await _echoed(triton, model, body)
    streams = await open_streams(triton, model, completion_payloads(body))
    if body.stream:
        return event_stream(_chunks(body, streams, meta, prefixes), streams, meta)
    # One state per completion, made once Triton has accepted n (an absurd n must not exhaust our memory).
    states = [RequestState(n=body.n, offset=p * body.n) for p in range(len(streams))]
    await until_disconnected(request, collect(streams, states, _converter(body)))
    response = completion_response(states, body, prefixes, id=meta.id, created=meta.created, model=model)
    meta.count_usage(response.usage)
    return response


async def _echoed(triton: TritonClient, model: str, req: CompletionRequest) -> list[str]:
    """Per prompt, the echoed text its choices start with. With echo_only token-id prompts are decoded here:
    the backend's echo would carry the dropped token's text too."""
    if not (req.echo_only and req.prompts_are_token_ids):
        return req.echo_prefixes()
    prompts = req.prompt_list()
    answers = await asyncio.gather(*(triton.generate(model, detokenize_payload(ids)) for ids in prompts))
    return [answer["text_output"] for answer in answers]


def _converter(req: CompletionRequest) -> Callable[[GenerateOutput, RequestState], None] | None:
    """echo_only drops the sampled token's text and logprobs (its count stays in usage, as in vLLM)."""
    return _drop_generated if req.echo_only else None


def _drop_generated(out: GenerateOutput, state: RequestState) -> None:
    out.text, out.reasoning, out.logprobs = "", "", []


def _choice(out: GenerateOutput, index: int, text_offset: int, req: CompletionRequest) -> CompletionChoice:
    return CompletionChoice(
        index=index,
        text=out.text,
        logprobs=choice_logprobs(req, out.prompt_logprobs or [], out.logprobs, text_offset),
        finish_reason=out.finish_reason,
        reasoning_content=out.reasoning or None,
        prompt_token_ids=out.prompt_token_ids if req.return_token_ids else None,
        completion_token_ids=out.token_ids if req.return_token_ids else None,
    )


async def _chunks(req: CompletionRequest, streams: list[TritonStream], meta: ResponseMeta,
                  prefix: list[str]) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], totals: Usage | None = None) -> str:
        return sse(CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=choices,
                                      usage=totals))

    states = [RequestState(n=req.n, offset=p * req.n) for p in range(len(streams))]
    convert = _converter(req)
    echoed: set[int] = set()
    async for p, out in merged(streams):
        meta.saw_output(out)
        if convert is not None:
            convert(out, states[p])
        choice = states[p].add(out)
        # As vLLM streams: a chunk for every step that generated tokens, also when their text is still held
        # back (an unfinished UTF-8 character, a possible stop string), so that each token is seen.
        if out.has_delta or choice.new_tokens:
            offset = len(prefix[p]) + len(choice.text) - len(out.text)
            so_far = usage(states) if req.continuous_usage else None
            streamed = _choice(out, choice.index, offset, req)
            if choice.index not in echoed:  # the echoed prompt comes with the first chunk, as its logprobs
                echoed.add(choice.index)
                streamed.text = prefix[p] + streamed.text
            yield chunk([streamed], so_far)
    totals = usage(states)
    meta.count_usage(totals)
    if req.include_usage:
        yield chunk([], totals)
