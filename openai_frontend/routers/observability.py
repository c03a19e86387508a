"""/health, GET or HEAD as probes send it (200 only when Triton is ready), and GET /metrics (the frontend's
Prometheus metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from openai_frontend.errors import OpenAIError

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> Response:
    if not await request.app.state.triton.is_ready():
        raise OpenAIError(503, "tritonserver is not ready")
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
