"""The FastAPI application: routers, OpenAI-shaped errors and the request guards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from openai_frontend.errors import install_handlers
from openai_frontend.metrics import FrontendMetrics
from openai_frontend.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    ConcurrencyMiddleware,
    MetricsMiddleware,
)
from openai_frontend.routers import chat, completions, models, observability, tokenizer
from openai_frontend.triton_client import TritonClient

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # room for base64 images in chat messages
DEFAULT_BODY_TIMEOUT_S = 60.0  # 32 MB at ~4 Mbit/s


@dataclass(frozen=True)
class FrontendConfig:
    triton_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    max_concurrency: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S


def create_app(config: FrontendConfig) -> FastAPI:
    # One connection per in-flight stream, plus a few for health and model lookups.
    max_connections = None if config.max_concurrency is None else config.max_concurrency + 8
    triton = TritonClient(config.triton_url, max_connections=max_connections)
    metrics = FrontendMetrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await triton.aclose()

    app = FastAPI(title="ERNIE OpenAI frontend for Triton", lifespan=lifespan)
    app.state.triton = triton
    app.state.metrics = metrics
    for module in (chat, completions, models, observability, tokenizer):
        app.include_router(module.router)
    install_handlers(app)
    # add_middleware wraps: the last added runs first. Order: metrics, auth, body size, concurrency.
    app.add_middleware(ConcurrencyMiddleware, metrics=metrics, max_concurrency=config.max_concurrency)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
