"""Server-sent events: Triton streams in, OpenAI chunks out.

The Triton streams are closed whenever the SSE response ends: normally, on error, or when the client goes
away (Starlette then cancels the body iterator). Closing an unfinished stream cancels the Triton request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from openai_frontend.errors import OpenAIError
from openai_frontend.metrics import FrontendMetrics
from openai_frontend.outputs import GenerateOutput, parse_response
from openai_frontend.schemas.openai import Usage
from openai_frontend.triton_client import TritonClient, TritonError, TritonStream

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


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
