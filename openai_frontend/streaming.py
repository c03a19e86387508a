"""Triton streams in; OpenAI chunks (server-sent events) or, for non-streaming requests, their sum out.

Every generation streams from Triton. Its streams are closed whenever the response ends: normally, on error,
or when the client goes away (Starlette cancels a streamed body; `until_disconnected` a non-streaming one).
Closing an unfinished stream cancels the Triton request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from openai_frontend.errors import OpenAIError
from openai_frontend.metrics import FrontendMetrics
from openai_frontend.outputs import GenerateOutput, RequestState, parse_response
from openai_frontend.schemas.openai import Usage
from openai_frontend.triton_client import TritonClient, TritonError, TritonStream

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
T = TypeVar("T")


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _error_event(exc: Exception) -> str:
    if isinstance(exc, TritonError):
        exc = OpenAIError.from_triton(exc)
    elif not isinstance(exc, OpenAIError):
        exc = OpenAIError(500, f"stream failed: {exc!r}")
    return f"data: {json.dumps(exc.body())}\n\n"


@dataclass
class ResponseMeta:
    """Per-response bookkeeping: ids shared by every chunk, TTFT and token counts."""

    endpoint: str
    metrics: FrontendMetrics
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    start: float = field(default_factory=time.perf_counter)
    _first_token: bool = False

    def saw_output(self, out: GenerateOutput) -> None:
        if not self._first_token and (out.text or out.reasoning or out.tool_calls or out.token_ids):
            self._first_token = True
            self.metrics.ttft.labels(self.endpoint).observe(time.perf_counter() - self.start)

    def count_usage(self, usage: Usage) -> None:
        self.metrics.prompt_tokens.labels(self.endpoint).inc(usage.prompt_tokens)
        self.metrics.completion_tokens.labels(self.endpoint).inc(usage.completion_tokens)


async def merged(streams: list[TritonStream]) -> AsyncIterator[tuple[int, GenerateOutput]]:
    """Outputs of several Triton streams as they arrive, tagged with the stream's position."""
    if len(streams) == 1:
        async for event in streams[0].events():
            for out in parse_response(event):
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, dict | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: TritonStream) -> None:
        try:
            async for event in stream.events():
                await queue.put((i, event))
            await queue.put((i, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                for out in parse_response(item):
                    yield i, out
    finally:
        for task in tasks:
            task.cancel()


async def collect(streams: list[TritonStream], states: list[RequestState],
                  convert: Callable[[GenerateOutput, RequestState], None] | None = None) -> None:
    """A non-streaming response's outputs: every delta of stream p into states[p] (`convert` first edits it).
    Triton streams them too, so that a client leaving midway cancels the requests (see until_disconnected)."""
    try:
        async for p, out in merged(streams):
            if convert is not None:
                convert(out, states[p])
            states[p].add(out)
    finally:
        await close_all(streams)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first, as vLLM does for non-streaming requests
    (Starlette cancels only streamed bodies): its Triton streams close, and Triton cancels the requests."""
    task = asyncio.ensure_future(work)

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        logger.info("%s: client went away, cancelling its Triton request(s)", request.url.path)
        raise OpenAIError(499, "Client closed the request")
    return task.result()


async def open_streams(triton: TritonClient, model: str, payloads: list[dict]) -> list[TritonStream]:
    """Open one generate_stream per payload; if one is refused, close the others and raise."""
    streams: list[TritonStream] = []
    try:
        for payload in payloads:
            streams.append(await triton.generate_stream(model, payload))
    except BaseException:
        await close_all(streams)
        raise
    return streams


async def close_all(streams: list[TritonStream]) -> None:
    # Shielded: this runs while Starlette cancels the response, and the close must reach Triton.
    with anyio.CancelScope(shield=True):
        for stream in streams:
            await stream.aclose()


def event_stream(chunks: AsyncIterator[str], streams: list[TritonStream],
                 meta: ResponseMeta) -> StreamingResponse:
    """SSE response: the chunks, an in-band error event if the stream fails midway, then [DONE]."""

    async def body() -> AsyncIterator[str]:
        ended = False  # stays False only when the client went away (Starlette cancelled us)
        try:
            async for chunk in chunks:
                yield chunk
            ended = True
        except Exception as exc:  # the status line is gone: report in-band, as OpenAI does
            ended = True
            logger.warning("stream %s failed: %s", meta.id, exc)
            meta.metrics.errors.labels(meta.endpoint, "stream").inc()
            yield _error_event(exc)
        finally:
            if not ended:
                logger.info("stream %s: client went away, cancelling its Triton request(s)", meta.id)
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
            await close_all(streams)
        yield DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
