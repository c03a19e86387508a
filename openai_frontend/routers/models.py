"""GET /v1/models[/{id}] (Triton's ready models) and the mapping of a request's `model` to one of them."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request

from openai_frontend.errors import OpenAIError
from openai_frontend.schemas.openai import ModelCard, ModelList, now
from openai_frontend.triton_client import TritonClient, TritonError

logger = logging.getLogger(__name__)
router = APIRouter()

# Names clients send when they do not care (the seed's examples use "null" and "default").
PLACEHOLDERS = frozenset({"", "null", "none", "default"})
# How old a ready-model list may be when it names the requested model (an unloaded one then fails in Triton).
READY_MAX_AGE_S = 2.0


def _is_placeholder(requested: str | None) -> bool:
    return requested is None or requested.strip().lower() in PLACEHOLDERS


def _not_found(requested: str | None, ready: list[str]) -> OpenAIError:
    served = ", ".join(ready) or "none"
    if _is_placeholder(requested):
        message = f"No model named and {len(ready)} served: set `model` to one of: {served}"
    else:
        message = f"The model `{requested}` does not exist. Served models: {served}"
    return OpenAIError(404, message, param="model", code="model_not_found")


async def resolve_model(triton: TritonClient, requested: str | None) -> str:
    # A served name is trusted from a recent list (no index call per request); anything else is decided on a
    # fresh one, so loads and unloads show at once there.
    if requested in await triton.ready_models(max_age=READY_MAX_AGE_S):
        return requested
    ready = await triton.ready_models()
    if requested in ready:
        return requested
    if _is_placeholder(requested) and len(ready) == 1:
        return ready[0]
    raise _not_found(requested, ready)


async def _model_card(triton: TritonClient, name: str, created: int) -> ModelCard:
    try:
        max_model_len = (await triton.tokenizer_info(name))["model_max_length"]
    except (TritonError, KeyError, ValueError) as exc:  # not an ernie row, or unloading meanwhile
        logger.info("no max_model_len for %s: %s", name, exc)
        max_model_len = None
    return ModelCard(id=name, created=created, max_model_len=max_model_len)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    triton = request.app.state.triton
    created = now()
    names = await triton.ready_models()
    return ModelList(data=list(await asyncio.gather(*(_model_card(triton, n, created) for n in names))))


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    triton = request.app.state.triton
    ready = await triton.ready_models()
    if model_id not in ready:
        raise _not_found(model_id, ready)
    return await _model_card(triton, model_id, now())
