"""OpenAI's error body `{"error": {"message", "type", "param", "code"}}` for every failure."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openai_frontend.schemas.openai import ErrorInfo, ErrorResponse
from openai_frontend.triton_client import TritonError

logger = logging.getLogger(__name__)

# Branch tags pydantic puts in an error's location inside unions: type expressions and class names.
_UNION_TAG = re.compile(r"[A-Z\[]|^(str|int|float|bool|none)$")
_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    def __init__(self, status_code: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def from_triton(cls, exc: TritonError) -> OpenAIError:
        """Triton's 4xx are bad request values; 502-504 mean it is down; anything else is its fault."""
        if 400 <= exc.status_code < 500:
            return cls(400, exc.message)
        if exc.status_code in (502, 503, 504):
            return cls(503, exc.message)
        return cls(500, exc.message)

    def body(self) -> dict:
        default = "invalid_request_error" if self.status_code < 500 else "server_error"
        info = ErrorInfo(message=self.message, type=_TYPES.get(self.status_code, default), param=self.param,
                         code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


def _param(loc: tuple) -> str | None:
    """The request parameter an error is about, without pydantic's union branch tags (`str`, `list[int]`,
    `NamedToolChoice`, ...): `messages.0.content`, not `messages.0.content.str`."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and _UNION_TAG.search(p))]
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", "")
        return OpenAIError(400, f"Request body is not valid JSON: {reason}")
    # A value matching no branch of a union fails once per branch: the branch that got furthest is meant.
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    param, msg = _param(error.get("loc", ())), error["msg"].removeprefix("Value error, ")
    return OpenAIError(400, f"{param}: {msg}" if param else msg, param=param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(TritonError)
    async def _triton(_: Request, exc: TritonError) -> JSONResponse:
        return OpenAIError.from_triton(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers a malformed request with 400, not FastAPI's 422.
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return OpenAIError(500, f"internal error: {exc!r}").response()
