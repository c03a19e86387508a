"""Tritonserver over HTTP: health, the repository index and the generate extension.

One pooled httpx.AsyncClient serves every request. Closing a `TritonStream` before it ends drops the
connection, which makes Triton cancel the request (the backend sees `response_sender.is_cancelled()`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class TritonError(Exception):
    """Triton answered with an error, could not be reached (status 503) or was not sent a body holding text
    with no UTF-8 encoding (status 400)."""

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
    """An open `generate_stream` response: iterate `events()`, always `aclose()`."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    # The status line went out with the first response: later errors arrive as events.
                    raise TritonError(500, str(event["error"]))
                yield event
        except httpx.TransportError as exc:
            raise TritonError(503, f"connection to tritonserver lost: {exc!r}") from exc

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
            raise TritonError(response.status_code, _error_message(body))
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
        return TritonStream(response)
