"""/health, GET or HEAD as probes send it (200 only when Triton and its models' stub processes live),
GET /metrics (the frontend's Prometheus metrics) and GET /version (vLLM's shape)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from openai_frontend import __version__
from openai_frontend.errors import OpenAIError

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> Response:
    triton = request.app.state.triton
    if not await triton.is_ready():
        raise OpenAIError(503, "tritonserver is not ready")
    # Triton keeps a model whose stub died READY and never restarts it: as vLLM's dead engine, that is a 503.
    await asyncio.gather(*(triton.check_alive(model) for model in await triton.ready_models()))
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}
