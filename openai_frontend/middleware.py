"""Pure ASGI middleware: they wrap the whole response, streamed bodies included (BaseHTTPMiddleware would
buffer streams and hide client disconnects)."""

from __future__ import annotations

import asyncio
import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openai_frontend.errors import OpenAIError
from openai_frontend.metrics import FrontendMetrics

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})
_KNOWN_PATHS = GENERATION_PATHS | TOKENIZER_PATHS | {"/v1/models", "/health", "/metrics", "/version"}
RETRY_AFTER_S = "1"
CLIENT_CLOSED = 499  # nginx's status for a client that left before its response ended (as non-streaming 499s)


def _endpoint(scope: Scope) -> str:
    """A bounded label set: unknown paths (scanners, typos) must not grow the metrics."""
    path = scope.get("path", "")
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in _KNOWN_PATHS else "other"


class MetricsMiddleware:
    """Counts every request by endpoint and status and times it to its last byte. A response the client left
    midway (a stream Starlette stopped on disconnect) counts as 499, not as the 200 its status line said."""

    def __init__(self, app: ASGIApp, metrics: FrontendMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint, start, status, complete = _endpoint(scope), time.perf_counter(), 500, False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
            if not complete and status < 400:
                status = CLIENT_CLOSED
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status)).inc()


class ApiKeyMiddleware:
    """With --api-key, /v1/* and the tokenizer endpoints need `Authorization: Bearer <key>` (health and
    metrics stay open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path in TOKENIZER_PATHS):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = OpenAIError(401, "Invalid or missing API key", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the body up front, refusing it with 413 once it exceeds the limit, then replays it. A body not
    received within `timeout_s` gets 408: a client trickling it (slowloris) must not hold a connection and
    its buffer forever (uvicorn bounds no body read)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            error = OpenAIError(408, f"Request body not received within {self.timeout_s:g} s",
                                code="request_timeout")
            await error.response()(scope, receive, send)
            return
        if body is None:  # the client left
            return
        if len(body) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The body, stopping once past the limit (then longer than max_bytes); None if the client left."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = OpenAIError(413, f"Request body exceeds {self.max_bytes} bytes", code="request_too_large")
        await error.response()(scope, receive, send)


class ConcurrencyMiddleware:
    """Answers 429 when --max-concurrency generation requests (streams until their end) are in flight."""

    def __init__(self, app: ASGIApp, metrics: FrontendMetrics, max_concurrency: int | None) -> None:
        self.app = app
        self.metrics = metrics
        self.limit = max_concurrency
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if self.limit is not None and self.in_flight >= self.limit:
            error = OpenAIError(429, f"Too many requests in flight (limit {self.limit}); retry later",
                                code="rate_limit_exceeded")
            response = error.response()
            response.headers["Retry-After"] = RETRY_AFTER_S  # the openai client waits that long to retry
            await response(scope, receive, send)
            return
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
