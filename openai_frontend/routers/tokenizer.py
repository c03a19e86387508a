"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info.

The backend owns the tokenizer and chat template; these are its `task` requests through Triton, so the ids
are exactly those a generation request runs on (lm-evaluation-harness's remote tokenizer uses all three).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from openai_frontend.outputs import ints
from openai_frontend.routers.models import resolve_model
from openai_frontend.schemas.openai import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from openai_frontend.translate import detokenize_payload, tokenize_payload

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    triton = request.app.state.triton
    model = await resolve_model(triton, body.model)
    answer, info = await asyncio.gather(triton.generate(model, tokenize_payload(body)),
                                        triton.tokenizer_info(model))
    tokens = ints(answer["prompt_token_ids"])
    return TokenizeResponse(count=len(tokens), max_model_len=info["model_max_length"], tokens=tokens)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    triton = request.app.state.triton
    model = await resolve_model(triton, body.model)
    answer = await triton.generate(model, detokenize_payload(body.tokens))
    return DetokenizeResponse(prompt=answer["text_output"])


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None) -> dict[str, Any]:
    triton = request.app.state.triton
    return await triton.tokenizer_info(await resolve_model(triton, model))
