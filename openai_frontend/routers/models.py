"""GET /v1/models[/{id}] (Triton's ready models) and the mapping of a request's `model` to one of them."""

from __future__ import annotations

from fastapi import APIRouter, Request

from openai_frontend.errors import OpenAIError
from openai_frontend.schemas.openai import ModelCard, ModelList, now
from openai_frontend.triton_client import TritonClient

router = APIRouter()

# Names clients send when they do not care (the seed's examples use "null" and "default").
PLACEHOLDERS = frozenset({"", "null", "none", "default"})
# How old a ready-model list may be when it names the requested model (an unloaded one then fails in Triton).
READY_MAX_AGE_S = 2.0


def _not_found(requested: str | None, ready: list[str]) -> OpenAIError:
    served = ", ".join(ready) or "none"
    return OpenAIError(404, f"The model `{requested}` does not exist. Served models: {served}", param="model",
                       code="model_not_found")


async def resolve_model(triton: TritonClient, requested: str | None) -> str:
    # A served name is trusted from a recent list (no index call per request); anything else is decided on a
    # fresh one, so loads and unloads show at once there.
    if requested in await triton.ready_models(max_age=READY_MAX_AGE_S):
        return requested
    ready = await triton.ready_models()
    if requested in ready:
        return requested
    if (requested is None or requested.strip().lower() in PLACEHOLDERS) and len(ready) == 1:
        return ready[0]
    raise _not_found(requested, ready)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    created = now()
    names = await request.app.state.triton.ready_models()
    return ModelList(data=[ModelCard(id=name, created=created) for name in names])


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    ready = await request.app.state.triton.ready_models()
    if model_id not in ready:
        raise _not_found(model_id, ready)
    return ModelCard(id=model_id, created=now())
