"""ERNIE-4.5 serving engine on PaddlePaddle (no Triton imports): see docs/ARCHITECTURE.md.

The public names load lazily, so importing a light submodule (tokenizer, chat_template, parsers) does not
pull in Paddle and the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "llm",
    "AsyncLLMEngine": "async_engine",
    "RequestStream": "async_engine",
    "LLMEngine": "llm_engine",
    "EngineConfig": "config",
    "SamplingParams": "sampling_params",
    "RequestOutput": "outputs",
    "CompletionOutput": "outputs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
