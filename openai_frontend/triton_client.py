"""Tritonserver over HTTP: health, the repository index and the generate extension.

One pooled httpx.AsyncClient serves every request. Closing a `TritonStream` before it ends drops the
connection, which makes Triton cancel the request (the backend sees `response_sender.is_cancelled()`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

logger = logging.getLogger(__name__)

# Triton 2.51 answers 400 once a model's stub process died (it stays READY and is never restarted): that is
# the server's failure, not the request's.
_STUB_DIED = re.compile(r"Stub process .* is not healthy")
# How long a stream may stay silent before the model is asked whether its stub still lives: Triton leaves the
# requests of a dead stub open forever.
IDLE_PROBE_S = 5.0


class TritonError(Exception):
    """Triton answered with an error, could not be reached or lost the model's stub process (status 503), or
    was not sent a body holding text with no UTF-8 encoding (status 400)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _error_message(body: bytes) -> str:
    """Triton errors are `{"error": "..."}`, as JSON or as an SSE data line."""
    text = body.decode("utf-8", "replace").strip()
    for line in text.splitlines():
        line = line.strip()
        payload = line[len("data:"):].strip() if line.startswith("data:") else line
        try:
            parsed = json.loads(payload)
        except ValueError:
            continue
        if isinstance(parsed, dict) and "error" in parsed:
            return str(parsed["error"])
    return text or "tritonserver returned an error"


class TritonStream:
    """An open `generate_stream` response: iterate `events()`, always `aclose()`. `probe` raises when the
    model can no longer answer (checked while the stream is silent)."""

    def __init__(self, response: httpx.Response, probe: Callable[[], Awaitable[None]]) -> None:
        self._response = response
        self._probe = probe

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        lines = self._response.aiter_lines()
        try:
            while (line := await self._next_line(lines)) is not None:
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    # The status line went out with the first response: later errors arrive as events.
                    raise TritonError(500, str(event["error"]))
                yield event
        except httpx.TransportError as exc:
            raise TritonError(503, f"connection to tritonserver lost: {exc!r}") from exc

    async def _next_line(self, lines: AsyncIterator[str]) -> str | None:
        """The next line (None at the end). While none comes the model is probed every IDLE_PROBE_S, alongside
        the read: a probe waiting for a pooled connection must not hold the stream up. The read is a task of
        its own, as cancelling a read midway would break the stream."""
        pending = asyncio.ensure_future(anext(lines, None))
        probe: asyncio.Future | None = None
        try:
            while True:
                waiting = {pending} if probe is None else {pending, probe}
                done, _ = await asyncio.wait(waiting, timeout=IDLE_PROBE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if pending in done:
                    return pending.result()
                if probe in done:
                    probe.result()  # raises when the model cannot answer
                    probe = None
                elif probe is None:
                    probe = asyncio.ensure_future(self._probe())
        finally:
            for task in (pending, probe):
                if task is not None and not task.done():
                    task.cancel()

    async def aclose(self) -> None:
        await self._response.aclose()


class TritonClient:
    def __init__(self, url: str, max_connections: int | None = None) -> None:
        # Generation has no natural deadline: only connecting is bounded.
        timeout = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=32)
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, limits=limits)
        self._ready: list[str] = []
        self._ready_at = float("-inf")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        try:
            request = self._http.build_request(method, path, **kwargs)
        except UnicodeEncodeError as exc:  # JSON's "\ud800" escape parses to a lone surrogate: no UTF-8 text
            raise TritonError(400, f"request text is not valid Unicode: {exc.reason}") from exc
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            logger.warning("tritonserver unreachable: %r", exc)
            raise TritonError(503, f"tritonserver is unavailable: {exc!r}") from exc
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            message = _error_message(body)
            raise TritonError(503 if _STUB_DIED.search(message) else response.status_code, message)
        return response

    async def is_ready(self) -> bool:
        try:
            await self._send("GET", "/v2/health/ready")
        except TritonError:
            return False
        return True

    async def ready_models(self, max_age: float = 0.0) -> list[str]:
        """Triton's ready models; with `max_age` > 0 a list fetched that many seconds ago or less will do."""
        if max_age and time.monotonic() - self._ready_at <= max_age:
            return self._ready
        response = await self._send("POST", "/v2/repository/index", json={"ready": True})
        self._ready = sorted({m["name"] for m in response.json() if m.get("state") == "READY"})
        self._ready_at = time.monotonic()
        return self._ready

    async def generate(self, model: str, payload: dict[str, Any]) -> dict[str, Any]:
        """`/generate`: for requests answered by exactly one response."""
        response = await self._send("POST", f"/v2/models/{model}/generate", json=payload)
        body = response.json()
        if "error" in body:  # e.g. "generate expects model to produce exactly 1 response", with status 200
            raise TritonError(500, str(body["error"]))
        return body

    async def tokenizer_info(self, model: str) -> dict[str, Any]:
        """The backend's tokenizer_info task: special tokens, chat template, model_max_length."""
        body = await self.generate(model, {"task": "tokenizer_info"})
        return json.loads(body["tokenizer_info"])

    async def generate_stream(self, model: str, payload: dict[str, Any]) -> TritonStream:
        """Open `/generate_stream`; an error before the first response raises here."""
        response = await self._send("POST", f"/v2/models/{model}/generate_stream", json=payload, stream=True)
        return TritonStream(response, lambda: self.check_alive(model))

    async def check_alive(self, model: str) -> None:
        """Raises TritonError(503) when `model` cannot answer any more (its stub died, Triton is gone)."""
        try:
            await self.generate(model, {"task": "tokenizer_info"})
        except TritonError as exc:
            if exc.status_code == 503:
                logger.warning("%s cannot answer: %s", model, exc.message)
                raise
