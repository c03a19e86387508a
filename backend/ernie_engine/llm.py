"""Offline batch inference, nano-vllm style: `LLM(model_dir).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import EngineConfig
from .llm_engine import LLMEngine
from .outputs import RequestOutput, merge_outputs
from .sampling_params import SamplingParams

# Text, token ids, or vLLM's TextPrompt / TokensPrompt dicts: {"prompt": text} or {"prompt_token_ids": ids}.
Prompt = str | list[int] | dict[str, Any]
PROMPT_KEYS = {"prompt", "prompt_token_ids"}


class LLM:
    def __init__(self, model: str | Path, **engine_kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_kwargs))
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Text prompts, token-id lists or prompt dicts; one merged output per prompt, in order."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        return self._run([_prompt_kwargs(p) for p in prompts], sampling_params)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; the checkpoint's chat template applies."""
        conversations = [messages] if not messages or isinstance(messages[0], dict) else messages
        requests = [{"messages": m, "tools": tools, "chat_template_kwargs": chat_template_kwargs}
                    for m in conversations]
        return self._run(requests, sampling_params)

    def _run(self, requests: list[dict[str, Any]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(requests)
        if len(sampling_params) != len(requests):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [f"offline-{next(self._ids)}" for _ in requests]
        built = [self.engine.make_request(rid, sampling_params=sp, **kw)
                 for rid, kw, sp in zip(ids, requests, sampling_params, strict=True)]
        deltas: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        try:
            for request in built:
                self.engine.add(request)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    deltas[out.request_id].append(out)
        except BaseException:  # e.g. KeyboardInterrupt: leave no request behind for the next call
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [merge_outputs(deltas[rid]) for rid in ids]


def _prompt_kwargs(prompt: Prompt) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not isinstance(prompt, dict):
        return {"prompt_token_ids": prompt}
    if unknown := sorted(prompt.keys() - PROMPT_KEYS):  # e.g. multi_modal_data: not taken here
        raise ValueError(f"prompt keys not supported: {', '.join(unknown)} (give prompt or prompt_token_ids)")
    return dict(prompt)
