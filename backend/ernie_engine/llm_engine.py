"""The synchronous engine: requests in, one `step()` at a time, `RequestOutput` deltas out.

`make_request` validates and tokenizes without touching engine state (callers on other threads may use
it); `add`, `step` and `abort` belong to one thread (the async engine's step loop, or the offline `LLM`).
"""

from __future__ import annotations

import json
import logging
import numbers
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .block_manager import BlockManager
from .chat_template import ChatTemplate, media_part_types
from .config import MM_SETTINGS, EngineConfig, check_checkpoint_folder
from .device import default_device, resolve_dtype
from .distributed.executor import TensorParallelExecutor
from .metrics import EngineMetrics
from .model_runner import ModelRunner
from .models.registry import get_model_class
from .multimodal.engine_inputs import EngineProcessor, MultimodalInputs, build_processor
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .parsers.reasoning import THINK_END, THINK_START
from .sampler import NO_TOKEN, SampledToken
from .sampling_params import NEUTRAL_DEFAULTS, SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Request, Sequence
from .structured_output import StructuredOutput
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

NO_TOKEN_ERROR = ("the request's constraints (allowed_token_ids, bad_words, min_tokens, structured output) "
                  "leave no token to generate")


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults from generation_config.json (do_sample false means greedy; max_new_tokens is the
    default max_tokens, as vLLM's), checked here: a bad value would otherwise fail every request."""
    path = model_dir / "generation_config.json"
    try:
        raw = json.loads(path.read_text()) if path.is_file() else {}
        defaults = {k: raw[k] for k in NEUTRAL_DEFAULTS if raw.get(k) is not None}
        if raw.get("do_sample") is False:
            defaults["temperature"] = 0.0
        if raw.get("max_new_tokens") is not None:
            defaults["max_tokens"] = raw["max_new_tokens"]
        SamplingParams(**defaults)
    except ValueError as err:  # also invalid JSON
        raise ValueError(f"{path.name} of {model_dir}: {err}") from None
    return defaults


def leaves_thinking(template: ChatTemplate, template_kwargs: dict[str, Any], prompt: str) -> bool:
    """Whether a rendered chat prompt leaves the model thinking (its output starts as reasoning): after a
    generation prompt, as the template's thinking switch says; in a continued message, inside `<think>`."""
    if template_kwargs.get("add_generation_prompt", True):
        return template.thinking_enabled(template_kwargs)
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_dir = config.resolve_model_path()
        check_checkpoint_folder(model_dir)
        resolve_dtype(config.dtype, default_device())  # a bad dtype fails here, not once per spawned rank
        self.sampling_defaults = generation_defaults(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.chat_template = ChatTemplate.from_dir(model_dir)
        runner_class = TensorParallelExecutor if config.tensor_parallel_size > 1 else ModelRunner
        self.runner = runner_class(config, model_dir, vocab_limit=self.tokenizer.vocab_size)
        try:
            self._set_up(config, model_dir)
        except BaseException:  # e.g. a bad max_model_len: the tensor-parallel workers must not outlive it
            self.shutdown()
            raise

    def _set_up(self, config: EngineConfig, model_dir: Path) -> None:
        """Everything around the runner: lengths, KV cache, scheduler, output processing, media."""
        model_config = self.runner.model_config
        self.vocab_size = self.runner.vocab_limit
        # Unseeded requests draw their seeds from the engine's (vLLM's `seed`): the same requests in the same
        # order sample the same tokens on every run. make_request runs on callers' threads: hence the lock.
        self._seeds = np.random.default_rng(config.seed)
        self._seeds_lock = threading.Lock()
        eos = set(self.tokenizer.eos_token_ids) | set(model_config.eos_token_ids)
        self.eos_token_ids = frozenset(t for t in eos if 0 <= t < self.vocab_size)
        self.max_model_len = self._resolve_max_model_len()
        self.max_num_batched_tokens = self._resolve_batched_tokens()
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens,
                                   config.enable_chunked_prefill, config.enable_max_prefill)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len, config.reasoning_parser,
                                                config.tool_call_parser)
        # Grammars see the whole model vocab (padded past the tokenizer) but mask only sampled ids.
        self.structured_output = StructuredOutput(
            self.tokenizer, model_config.vocab_size, self.vocab_size, self.eos_token_ids,
            think_end_id=self.tokenizer.added_tokens.get(THINK_END) if config.reasoning_parser else None,
        )
        self.mm_processor: EngineProcessor | None = None  # multimodal checkpoints: all messages go through it
        if hasattr(get_model_class(model_config.architecture), "embed_multimodal"):
            self.mm_processor = build_processor(model_config, model_dir, self.tokenizer, config)
        elif given := [name for name in MM_SETTINGS if getattr(config, name)]:
            raise ValueError(f"{', '.join(given)} set, but {model_config.architecture} takes text only")
        self.metrics = EngineMetrics()
        self.requests: dict[str, Request] = {}
        self._update_gauges()

    def _resolve_max_model_len(self) -> int:
        """max_model_len, then allocate the KV cache and cap the length at what it can hold."""
        limit = self.runner.model_config.max_position_embeddings
        max_len = self.config.max_model_len or limit
        if max_len > limit:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings {limit}")
        self.num_blocks = self.runner.num_kv_blocks(max_len)
        self.runner.allocate_kv_cache(self.num_blocks)
        capacity = self.num_blocks * self.config.block_size
        if capacity < max_len:
            logger.warning("max_model_len lowered from %d to %d (the KV cache capacity)", max_len, capacity)
            max_len = capacity
        return max_len

    def _resolve_batched_tokens(self) -> int:
        chunked = self.config.enable_chunked_prefill
        batched = self.config.max_num_batched_tokens or (2048 if chunked else max(2048, self.max_model_len))
        if not chunked and batched < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens {batched} < max_model_len {self.max_model_len} needs "
                             "enable_chunked_prefill (a whole prompt must fit in one step)")
        return batched

    # Requests ---------------------------------------------------------------------------------------

    def make_request(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> Request:
        """Validate and tokenize; ValueError names what is wrong. Touches no engine state."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids or messages")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        template_kwargs = self._template_kwargs(chat_template_kwargs)
        if messages is not None and self.mm_processor is not None:
            return self._make_multimodal_request(request_id, messages, tools, template_kwargs, params)
        prompt, prompt_token_ids, thinking = self._text_prompt(prompt, prompt_token_ids, messages, tools,
                                                               template_kwargs)
        if (kept := self._truncated(prompt_token_ids, params)) is not prompt_token_ids:
            prompt, prompt_token_ids = None, kept  # the text no longer matches the ids
        processor = self.mm_processor
        if processor is not None and not processor.placeholder_ids.isdisjoint(prompt_token_ids):
            raise ValueError("image / video placeholder tokens need their media: send messages with images")
        return self._build_request(request_id, prompt, prompt_token_ids, params, thinking, bool(tools))

    def _template_kwargs(self, chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        template_kwargs = chat_template_kwargs or {}
        if not isinstance(template_kwargs, dict):
            raise ValueError("chat_template_kwargs must be an object")
        if reserved := sorted({"messages", "tools"} & template_kwargs.keys()):
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)} (request fields)")
        if not self.config.reasoning_parser:
            # Without a reasoning parser the thinking would land in the answer: think only when asked to.
            template_kwargs = {"enable_thinking": False, **template_kwargs}
        return template_kwargs

    def _text_prompt(
        self,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        messages: list[dict[str, Any]] | None,
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any],
    ) -> tuple[str | None, list[int], bool]:
        """The prompt text (None for token ids), its token ids, and whether it leaves the model thinking."""
        thinking = False
        if messages is not None:
            if media := media_part_types(messages):  # as text they would be placeholders: media lost
                raise ValueError(f"this model takes text only: {', '.join(sorted(media))} content parts need "
                                 "a multimodal model (ERNIE-4.5-VL, PaddleOCR-VL)")
            # chat_template_kwargs may set add_generation_prompt / continue_final_message (as vLLM's).
            prompt = self.chat_template.render(messages, tools, **template_kwargs)
            thinking = leaves_thinking(self.chat_template, template_kwargs, prompt)
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
            return prompt, ids, thinking or (messages is None and prompt.rstrip().endswith(THINK_START))
        ids = self._check_token_ids(prompt_token_ids)
        tail = self.tokenizer.decode(ids[-4:], skip_special_tokens=False)
        return None, ids, tail.rstrip().endswith(THINK_START)

    # Tokenizer service (no engine state: safe from any thread) --------------------------------------

    def tokenize(
        self,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """The token ids a generation request for this prompt or these messages would run on (messages go
        through the chat template, or a multimodal checkpoint's processor); `add_special_tokens` puts bos
        first, which generation requests do not. Any length: max_model_len is not checked here."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        template_kwargs = self._template_kwargs(chat_template_kwargs)
        if messages is not None and self.mm_processor is not None:
            ids = self.mm_processor(messages, tools, template_kwargs).prompt_token_ids
        else:
            _, ids, _ = self._text_prompt(prompt, None, messages, tools, template_kwargs)
        return [self.tokenizer.bos_token_id, *ids] if add_special_tokens else ids

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids, special tokens included."""
        return self.tokenizer.decode(self._check_token_ids(token_ids), skip_special_tokens=False)

    def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's /tokenizer_info: the special tokens, the chat template, the context length."""
        return {
            **self.tokenizer.special_tokens,
            "chat_template": self.chat_template.source,
            "model_max_length": self.max_model_len,
            "vocab_size": self.vocab_size,
        }

    def _make_multimodal_request(
        self,
        request_id: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any],
        params: SamplingParams,
    ) -> Request:
        """Messages through the checkpoint's processor: media fetched, preprocessed, placeholders expanded."""
        processor = self.mm_processor
        prompt = processor(messages, tools, template_kwargs)
        thinking = leaves_thinking(processor.template, template_kwargs, prompt.prompt)
        ids = prompt.prompt_token_ids
        if self._truncated(ids, params) is not ids:  # a cut could split an image's placeholders
            raise ValueError("truncate_prompt_tokens cannot cut a multimodal chat prompt "
                             f"({len(ids)} tokens); send it whole")
        request = self._build_request(request_id, prompt.prompt, ids, params, thinking, bool(tools))
        if prompt.images is not None:
            request.mm = MultimodalInputs.from_prompt(prompt, processor.placeholder_ids)
        return request

    def _truncated(self, ids: list[int], params: SamplingParams) -> list[int]:
        """The last truncate_prompt_tokens ids (-1: as many as fit next to max_tokens), else `ids` itself."""
        keep = params.truncate_prompt_tokens
        if keep is not None and keep >= self.max_model_len:
            raise ValueError(f"truncate_prompt_tokens {keep} leaves no room below max_model_len "
                             f"{self.max_model_len}")
        if keep == -1:
            keep = self.max_model_len - (params.max_tokens or 1)
        return ids[-keep:] if keep is not None and 0 < keep < len(ids) else ids

    def _check_token_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, list | tuple) or not ids:
            raise ValueError(f"prompt_token_ids must be a non-empty list of token ids, got {ids!r}")
        wrong = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
        if wrong:  # int() would silently floor 5.7 or parse "5"
            raise ValueError(f"prompt_token_ids must be integers, got {wrong[:5]!r}")
        ids = [int(t) for t in ids]
        # As vLLM, the tokenizer's: ids of padded embedding rows past it (ERNIE-4.5: ~100k of 103424) are
        # never sampled, and the penalties and prompt logprobs index the sampled logits with them.
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids holds ids outside the vocabulary (0..{self.vocab_size - 1}): "
                             f"{bad[:5]}")
        return ids

    def _build_request(self, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams,
                       thinking: bool, has_tools: bool) -> Request:
        n = len(ids)
        if n == 0:
            raise ValueError("prompt is empty (it tokenizes to no tokens)")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens but max_model_len is {self.max_model_len} "
                             "(one more token must fit; prompts are truncated only when "
                             "truncate_prompt_tokens asks)")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                             f"{self.max_model_len}")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs {self.config.max_num_seqs}")
        for name in ("stop_token_ids", "logit_bias", "allowed_token_ids"):
            if any(t >= self.vocab_size for t in getattr(params, name) or ()):
                raise ValueError(f"{name} token ids must be below the vocabulary size {self.vocab_size}")
        grammar = self.structured_output.matcher_for(params, thinking)  # ValueError names a bad constraint
        room = self.max_model_len - n
        max_tokens = params.max_tokens or min(self.sampling_defaults.get("max_tokens", room), room)
        if params.min_tokens > max_tokens:  # vLLM's check, on the resolved max_tokens
            raise ValueError(f"min_tokens {params.min_tokens} exceeds max_tokens {max_tokens} (the default: "
                             "generation_config.json's max_new_tokens or what max_model_len leaves)")
        params = params.with_defaults(self.sampling_defaults)
        eos = self.eos_token_ids
        stop_token_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos)
        bad_words_ids = self._bad_words_ids(params.bad_words)
        if params.allowed_token_ids is not None:
            banned = {ids[0] for ids in bad_words_ids if len(ids) == 1}
            if params.min_tokens:
                banned |= stop_token_ids | eos
            if banned.issuperset(params.allowed_token_ids):
                raise ValueError(f"allowed_token_ids {params.allowed_token_ids} leaves no token to generate: "
                                 "each is a bad word (or a stop token, masked until min_tokens)")
        request = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            seed=params.seed if params.seed is not None else self._draw_seed(),
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
            eos_token_ids=eos,
            bad_words_ids=bad_words_ids,
            prompt_logprobs=None if params.prompt_logprobs is None else [],
            prompt=prompt,
            thinking=thinking,
            has_tools=has_tools,
        )
        request.sequences = [Sequence.create(request, i) for i in range(params.n)]
        for seq in request.sequences if grammar is not None else ():
            seq.grammar = grammar.copy()
        return request

    def _draw_seed(self) -> int:
        with self._seeds_lock:
            return int(self._seeds.integers(2**63))

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each word as tokenized alone and after a space (vLLM's two spellings), without duplicates."""
        found: dict[tuple[int, ...], None] = {}
        for word in words:
            for spelling in {word.lstrip(), " " + word.lstrip()}:
                ids = tuple(t for t in self.tokenizer.encode(spelling) if t < self.vocab_size)
                if ids:
                    found[ids] = None
        return [list(ids) for ids in found]

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.output_processor.add(request)
        for seq in request.sequences:
            self.scheduler.add(seq)

    def add_request(self, request_id: str, **kwargs: Any) -> None:
        self.add(self.make_request(request_id, **kwargs))

    def abort(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        """End a request (its blocks are freed); the final output, or None if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.sequences:  # all of them: a failed step may leave a finished one holding blocks
            self.scheduler.finish(seq)
        self.metrics.inc("request_failure_total" if error else "request_abort_total")
        out = self.output_processor.abort(request, error)
        self._update_gauges()
        return out

    def abort_all(self, error: str | None = None) -> list[RequestOutput]:
        return [out for rid in list(self.requests) if (out := self.abort(rid, error))]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def check_health(self) -> None:
        """Raise, naming the cause, once the model can no longer run (a tensor-parallel worker died)."""
        if isinstance(self.runner, TensorParallelExecutor):
            self.runner.check_health()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (the in-process runner holds nothing to release)."""
        if isinstance(self.runner, TensorParallelExecutor):
            self.runner.shutdown()

    # Step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self._note_scheduled(out)
        if not out.scheduled:
            return []
        try:
            sampled = self.runner.execute(out)
        except Exception as err:  # the batch is lost; its requests fail, the engine keeps serving
            logger.exception("engine step failed")
            failed = dict.fromkeys(seq.request.request_id for seq in out.scheduled)
            return [o for rid in failed if (o := self.abort(rid, f"engine step failed: {err!r}"))]
        self.scheduler.update(out)
        _release_media(out)
        outputs = []
        for request, seqs, tokens in _group_by_request(out.sampling, sampled):
            if any(token.token_id == NO_TOKEN for token in tokens):
                # Its masks left no token (bad_words against allowed_token_ids or a grammar): it alone fails.
                if failed_out := self.abort(request.request_id, NO_TOKEN_ERROR):
                    outputs.append(failed_out)
                continue
            for seq, token in zip(seqs, tokens, strict=True):
                seq.token_ids.append(token.token_id)
            try:
                outputs.append(self._process(request, seqs, tokens))
            except Exception as err:  # one request's output handling must not affect the others
                logger.exception("output processing failed for request %s", request.request_id)
                if failed_out := self.abort(request.request_id, f"output processing failed: {err!r}"):
                    outputs.append(failed_out)
        self._update_gauges()
        return outputs

    def _process(self, request: Request, seqs: list[Sequence], tokens: list[SampledToken]) -> RequestOutput:
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.observe("time_to_first_token_seconds", now - request.arrival_time)
        self.metrics.inc("generation_tokens_total", len(seqs))
        output = self.output_processor.process(seqs, tokens)[0]
        for seq in seqs:
            if seq.is_finished:
                self.scheduler.finish(seq)
        if request.finished:
            self._note_finished(request, now)
        return output

    def _note_scheduled(self, out: SchedulerOutput) -> None:
        if out.scheduled:  # a wake-up that found nothing to run is no step
            self.metrics.inc("num_steps_total")
        self.metrics.inc("request_preempted_total", len(out.preempted))
        now = time.monotonic()
        for seq in out.scheduled:
            request = seq.request
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                self.metrics.observe("request_queue_time_seconds", now - request.arrival_time)
                self.metrics.inc("prompt_tokens_total", request.num_prompt_tokens)

    def _note_finished(self, request: Request, now: float) -> None:
        del self.requests[request.request_id]
        self.metrics.inc("request_success_total")
        self.metrics.observe("e2e_request_latency_seconds", now - request.arrival_time)
        # Once per request, its mean (vLLM's request_time_per_output_token): a per-token observation is one
        # round trip to tritonserver each when exported, ~15 % of decode throughput at 32 streams.
        num_out = max(seq.num_output_tokens for seq in request.sequences)
        if num_out > 1 and request.first_token_time is not None:
            tpot = (now - request.first_token_time) / (num_out - 1)
            self.metrics.observe("time_per_output_token_seconds", tpot)

    def _update_gauges(self) -> None:
        bm = self.block_manager
        running = len({seq.request.request_id for seq in self.scheduler.running})  # at most max_num_seqs
        self.metrics.set(
            num_requests_running=running,
            num_requests_waiting=len(self.requests) - running,
            num_kv_blocks_total=bm.num_blocks,
            num_kv_blocks_used=bm.num_used_blocks,
            num_kv_blocks_free=bm.num_free_blocks,
            gpu_cache_usage_perc=bm.num_used_blocks / bm.num_blocks,
            prefix_cache_token_num=bm.prefix_hit_tokens,
        )

    def get_metrics(self) -> dict[str, Any]:
        return self.metrics.snapshot()


def _release_media(out: SchedulerOutput) -> None:
    """Drop image embeddings once every sequence of their request is past the prompt (the pixels stay, so a
    preempted sequence recomputes them)."""
    for seq in out.scheduled:
        mm, seqs = seq.request.mm, seq.request.sequences
        if mm is not None and mm.embeds is not None and all(
            s.num_computed_tokens >= s.num_prompt_tokens for s in seqs
        ):
            mm.embeds = None


def _group_by_request(
    seqs: list[Sequence], tokens: list[SampledToken]
) -> list[tuple[Request, list[Sequence], list[SampledToken]]]:
    groups: dict[str, tuple[Request, list[Sequence], list[SampledToken]]] = {}
    for seq, token in zip(seqs, tokens, strict=True):
        group = groups.setdefault(seq.request.request_id, (seq.request, [], []))
        group[1].append(seq)
        group[2].append(token)
    return list(groups.values())
