"""Triton Python-based backend `ernie`: a thin adapter between Triton tensors and the ERNIE engine.

Installed as `<backends>/ernie/model.py` next to the `ernie_engine` package; a model's config.pbtxt holds only
`backend: "ernie"` and parameters (EngineConfig fields): `auto_complete_config` adds the tensors and the
decoupled policy. As in Triton's vLLM backend, each request runs as a coroutine on an asyncio loop in a
thread, so `execute` returns at once and responses stream through each request's response sender.

Responses: streaming sends one response per completion delta (`index` says which of n); non-streaming sends
exactly one response whose tensors hold one element per completion (`output_token_ids` concatenated in index
order, split by `num_output_tokens`).

Health: once the engine cannot serve (a tensor-parallel worker died), new requests fail at once with an
UNAVAILABLE error naming the cause, and `HealthMonitor` unloads the model so that Triton reports it not ready
(see there for why not exit the stub).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))  # the sibling ernie_engine package

from ernie_engine.async_engine import AsyncLLMEngine  # noqa: E402
from ernie_engine.config import EngineConfig  # noqa: E402
from ernie_engine.metrics import COUNTERS, GAUGES, HISTOGRAMS  # noqa: E402
from ernie_engine.outputs import CompletionOutput, RequestOutput, merge_outputs  # noqa: E402
from ernie_engine.sampling_params import SamplingParams  # noqa: E402

FLAGS = ("stream", "exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
         "return_num_output_tokens", "return_logprobs", "return_cumulative_logprob", "return_token_ids")
INPUTS = [
    ("text_input", "TYPE_STRING", [1]),
    ("prompt_token_ids", "TYPE_INT64", [-1]),
    ("messages", "TYPE_STRING", [1]),
    ("tools", "TYPE_STRING", [1]),
    ("chat_template_kwargs", "TYPE_STRING", [1]),
    ("sampling_parameters", "TYPE_STRING", [1]),
    ("task", "TYPE_STRING", [1]),
] + [(name, "TYPE_BOOL", [1]) for name in FLAGS]
TASKS = ("generate", "tokenize", "detokenize", "tokenizer_info")
OUTPUTS = [
    ("text_output", "TYPE_STRING"),
    ("reasoning_output", "TYPE_STRING"),
    ("tool_calls", "TYPE_STRING"),
    ("index", "TYPE_INT32"),
    ("finish_reason", "TYPE_STRING"),
    ("num_input_tokens", "TYPE_INT32"),
    ("num_output_tokens", "TYPE_INT32"),
    ("num_cached_tokens", "TYPE_INT32"),
    ("logprobs", "TYPE_STRING"),
    ("cumulative_logprob", "TYPE_FP32"),
    ("prompt_logprobs", "TYPE_STRING"),
    ("output_token_ids", "TYPE_INT64"),
    ("prompt_token_ids", "TYPE_INT64"),
    ("tokenizer_info", "TYPE_STRING"),
]
MIN_LOGPROB = -9999.0  # what a -inf logprob is sent as
METRICS_INTERVAL_S = 0.5
CANCEL_POLL_S = 1.0
HEALTH_INTERVAL_S = 0.5
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class ParsedRequest:
    prompt: dict[str, Any]  # add_request keywords: prompt | prompt_token_ids | messages, tools, ...
    sampling: SamplingParams
    flags: dict[str, bool] = field(default_factory=dict)


class TritonPythonModel:
    @classmethod
    def auto_complete_config(cls, auto_complete_model_config):
        config = auto_complete_model_config.as_dict()
        have_inputs = {i["name"] for i in config["input"]}
        have_outputs = {o["name"] for o in config["output"]}
        for name, dtype, dims in INPUTS:
            if name not in have_inputs:
                auto_complete_model_config.add_input(
                    {"name": name, "data_type": dtype, "dims": dims, "optional": True})
        for name, dtype in OUTPUTS:
            if name not in have_outputs:
                auto_complete_model_config.add_output({"name": name, "data_type": dtype, "dims": [-1]})
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        return auto_complete_model_config

    def initialize(self, args: dict[str, str]) -> None:
        self.logger = pb_utils.Logger
        self.name = args["model_name"]
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the ernie backend streams: keep model_transaction_policy "
                                                "{ decoupled: true } (set by auto_complete_config)")
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        engine_config = EngineConfig.from_parameters(params)
        model_dir = engine_config.resolve_model_path()  # an absent checkpoint fails here, naming the paths
        self.logger.log_info(f"[ernie] {self.name}: loading {model_dir}")
        self.engine = AsyncLLMEngine(engine_config)
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="ernie-requests", daemon=True)
        self.loop_thread.start()
        self.ongoing: dict[str, Future] = {}
        self.metrics = EngineMetricsExporter(self.engine, {"model": self.name})
        self.health = HealthMonitor(self.engine, self.name)
        self.logger.log_info(f"[ernie] {self.name}: ready")

    def execute(self, requests: list) -> None:
        for request in requests:
            request_id = f"{request.request_id() or 'triton'}-{uuid.uuid4().hex[:12]}"
            future = asyncio.run_coroutine_threadsafe(self._generate(request, request_id), self.loop)
            self.ongoing[request_id] = future
            future.add_done_callback(lambda _, rid=request_id: self.ongoing.pop(rid, None))
        return None

    async def _generate(self, request, request_id: str) -> None:
        sender = request.get_response_sender()
        try:
            self.engine.check_health()
        except Exception as err:  # the model is being unloaded (HealthMonitor): fail fast, naming the cause
            message = f"model {self.name} is unavailable: {err}"
            sender.send(error_response(message, pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
            return
        try:
            # Off this loop, which forwards every stream's responses: tokenizing, and fetching and decoding
            # media, can take seconds (a slow media host: the fetch timeout).
            task = _string(request, "task")
            if task not in (None, "generate"):
                sender.send(await asyncio.to_thread(tokenizer_task, self.engine, request, task), flags=FINAL)
                return
            parsed = parse_request(request)
            stream = await asyncio.to_thread(self.engine.add_request, request_id,
                                             sampling_params=parsed.sampling, **parsed.prompt)
        except Exception as err:  # bad input (ValueError) or a stopped engine: answer; the model stays ready
            self.logger.log_verbose(f"[ernie] {request_id}: rejected: {err!r}")
            message = str(err) if isinstance(err, ValueError) else f"internal error: {err!r}"
            sender.send(error_response(message), flags=FINAL)
            return
        watcher = asyncio.create_task(_abort_once_cancelled(self.engine, sender, request_id))
        try:
            await self._respond(sender, stream, parsed, request_id)
        except Exception as err:  # never leave a client waiting for its final response
            self.logger.log_error(f"[ernie] {request_id}: {err!r}")
            self.engine.abort(request_id)
            sender.send(error_response(f"internal error: {err!r}"), flags=FINAL)
        finally:
            watcher.cancel()

    async def _respond(self, sender, stream, parsed: ParsedRequest, request_id: str) -> None:
        prefix: str | None = None  # the echoed prompt, known at the first output
        streaming = parsed.flags["stream"]
        deltas: list[RequestOutput] = []  # kept for the single non-streaming response
        started: set[int] = set()
        last: RequestOutput | None = None
        async for last in stream:
            if sender.is_cancelled():
                self.engine.abort(request_id)  # frees its KV blocks
                cancelled = error_response("request was cancelled", pb_utils.TritonError.CANCELLED)
                sender.send(cancelled, flags=FINAL)
                return
            if last.error:
                sender.send(error_response(last.error), flags=FINAL)
                return
            if prefix is None:
                echo = not parsed.flags["exclude_input_in_output"]
                prefix = self._prompt_text(parsed.prompt, last.prompt_token_ids) if echo else ""
            for completion in last.outputs:
                if prefix and completion.index not in started:
                    completion.text = prefix + completion.text
                started.add(completion.index)
            if not streaming:
                deltas.append(last)
                continue
            for i, completion in enumerate(last.outputs):
                final = last.finished and i == len(last.outputs) - 1
                if final or not _parser_took_it(last, completion, parsed.flags):
                    sender.send(build_response(last, [completion], parsed.flags), flags=FINAL if final else 0)
            if last.finished:
                return
        if last is None:
            sender.send(error_response("the engine ended the request without output"), flags=FINAL)
        elif streaming:  # the engine ended the stream without a finished output
            sender.send(flags=FINAL)
        else:
            merged = merge_outputs(deltas)
            sender.send(build_response(merged, merged.outputs, parsed.flags), flags=FINAL)

    def _prompt_text(self, prompt: dict[str, Any], prompt_token_ids: list[int] | None) -> str:
        """The prompt as echoed by exclude_input_in_output=false: a text prompt as sent, else the tokens the
        engine ran on decoded (for messages, the rendered chat template)."""
        if "prompt" in prompt:
            return prompt["prompt"]
        return self.engine.detokenize(prompt_token_ids) if prompt_token_ids else ""

    def finalize(self) -> None:
        # Triton drains in-flight requests before an unload; this aborts what a shutdown timeout left.
        self.logger.log_info(f"[ernie] {self.name}: finalize, aborting {len(self.ongoing)} request(s)")
        self.metrics.stop()
        self.health.stop()
        for request_id in list(self.ongoing):
            self.engine.abort(request_id)
        for future in list(self.ongoing.values()):
            try:
                future.result(timeout=10)
            except Exception as err:  # finalize must go on and stop the engine
                self.logger.log_warn(f"[ernie] {self.name}: finalize: a request ended with {err!r}")
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(timeout=5)
        self.logger.log_info(f"[ernie] {self.name}: engine stopped")


# Requests ----------------------------------------------------------------------------------------------

async def _abort_once_cancelled(engine: AsyncLLMEngine, sender, request_id: str) -> None:
    """Cancellation is checked at each output; a request still queued (or in a long prefill) has none yet, so
    it is also polled: a client gone meanwhile must not cost a prefill. The abort ends the stream."""
    while not sender.is_cancelled():
        await asyncio.sleep(CANCEL_POLL_S)
    engine.abort(request_id)


def parse_request(request) -> ParsedRequest:
    """Triton tensors (and request parameters) -> add_request keywords; ValueError names what is wrong."""
    text = _string(request, "text_input")
    chat = _chat_inputs(request)
    token_ids = _token_ids(request)
    sources = (("text_input", text), ("messages", chat["messages"]), ("prompt_token_ids", token_ids))
    given = [name for name, value in sources if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of text_input, messages or prompt_token_ids (got: "
                         f"{', '.join(given) or 'none'})")
    prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": token_ids, **chat}
    raw = _json(request, "sampling_parameters", dict) or {}
    # Generate-extension keys that are not inputs arrive as request parameters; Triton's own are "triton_*".
    extra = json.loads(request.parameters() or "{}")
    raw.update({k: v for k, v in extra.items() if not k.startswith("triton_")})
    flags = {name: _bool(request, name, default=name == "exclude_input_in_output") for name in FLAGS}
    if (flags["return_logprobs"] or flags["return_cumulative_logprob"]) and raw.get("logprobs") is None:
        raw["logprobs"] = 0  # at least the sampled tokens' logprobs (the engine sums them); null is unset
    prompt = {k: v for k, v in prompt.items() if v is not None}
    return ParsedRequest(prompt, SamplingParams.from_dict(raw), flags)


def tokenizer_task(engine: AsyncLLMEngine, request, task: str):
    """The tokenizer service (the `task` input): one response, nothing generated."""
    if task == "tokenize":
        add_special_tokens = json.loads(request.parameters() or "{}").get("add_special_tokens", False)
        if not isinstance(add_special_tokens, bool):
            raise ValueError(f"add_special_tokens must be true or false (got {add_special_tokens!r})")
        ids = engine.tokenize(prompt=_string(request, "text_input"), **_chat_inputs(request),
                              add_special_tokens=add_special_tokens)
        tensors = {"prompt_token_ids": np.array(ids, dtype=np.int64),
                   "num_input_tokens": np.array([len(ids)], dtype=np.int32)}
    elif task == "detokenize":
        token_ids = _token_ids(request)
        if token_ids is None:
            raise ValueError("task detokenize needs prompt_token_ids")
        tensors = {"text_output": _strings([engine.detokenize(token_ids)])}
    elif task == "tokenizer_info":
        tensors = {"tokenizer_info": _strings([json.dumps(engine.tokenizer_info(), ensure_ascii=False)])}
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


def _chat_inputs(request) -> dict[str, Any]:
    """The chat template's inputs as add_request and tokenize take them (None where not given). Tools and
    template kwargs shape a chat prompt only: with a raw prompt they would be silently ignored."""
    chat = {"messages": _json(request, "messages", list), "tools": _json(request, "tools", list),
            "chat_template_kwargs": _json(request, "chat_template_kwargs", dict)}
    alone = [k for k in ("tools", "chat_template_kwargs") if chat[k] is not None]
    if alone and chat["messages"] is None:
        raise ValueError(f"{' and '.join(alone)} apply to messages only (no template renders a raw prompt)")
    return chat


def _token_ids(request) -> list[int] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, "prompt_token_ids")
    return None if tensor is None else tensor.as_numpy().reshape(-1).tolist()


def _string(request, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise ValueError(f"{name} must hold one string, got {value.size}")
    item = value[0]
    if not isinstance(item, bytes):
        return str(item)
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} is not valid UTF-8: {err}") from None


def _json(request, name: str, kind: type) -> Any:
    text = _string(request, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} is not valid JSON: {err}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {'object' if kind is dict else 'list'}")
    return value


def _bool(request, name: str, default: bool) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else bool(tensor.as_numpy().reshape(-1)[0])


# Responses ---------------------------------------------------------------------------------------------

def build_response(out: RequestOutput, completions: list[CompletionOutput], flags: dict[str, bool]):
    tensors = {
        "text_output": _strings([c.text for c in completions]),
        "index": np.array([c.index for c in completions], dtype=np.int32),
    }
    if any(c.reasoning_text for c in completions):
        tensors["reasoning_output"] = _strings([c.reasoning_text for c in completions])
    if any(c.tool_calls for c in completions):
        tensors["tool_calls"] = _strings([json.dumps(c.tool_calls) for c in completions])
    if flags["return_finish_reason"]:
        tensors["finish_reason"] = _strings([c.finish_reason or "" for c in completions])
    if flags["return_num_input_tokens"]:
        tensors["num_input_tokens"] = np.full(len(completions), out.num_prompt_tokens, dtype=np.int32)
        tensors["num_cached_tokens"] = np.full(len(completions), out.num_cached_tokens, dtype=np.int32)
    if flags["return_num_output_tokens"]:
        tensors["num_output_tokens"] = np.array([c.num_output_tokens for c in completions], dtype=np.int32)
    if flags["return_logprobs"]:
        logprobs = [[_logprob(lp) for lp in c.logprobs or []] for c in completions]
        tensors["logprobs"] = _strings([json.dumps(lps) for lps in logprobs])
    if flags["return_cumulative_logprob"]:  # the sum so far, as vLLM's; NaN where none was computed
        cumulative = [np.nan if c.cumulative_logprob is None else c.cumulative_logprob for c in completions]
        tensors["cumulative_logprob"] = np.array(cumulative, dtype=np.float32)
    if out.prompt_logprobs is not None:  # asked for with the prompt_logprobs sampling parameter
        tensors["prompt_logprobs"] = _strings([json.dumps([_logprob(lp) for lp in out.prompt_logprobs])])
    if flags["return_token_ids"]:
        tensors["output_token_ids"] = np.array([t for c in completions for t in c.token_ids], dtype=np.int64)
        if out.prompt_token_ids is not None:
            tensors["prompt_token_ids"] = np.array(out.prompt_token_ids, dtype=np.int64)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


def _parser_took_it(out: RequestOutput, completion: CompletionOutput, flags: dict[str, bool]) -> bool:
    """vLLM's streaming rule: a step whose text a reasoning / tool-call parser took in (markup, or text it
    holds back) sends nothing, unless the client asked for token ids or logprobs. Text held back without
    a parser (a possible stop string, an unfinished character) still sends its step, as vLLM does."""
    shows = completion.text or completion.reasoning_text or completion.tool_calls or completion.finish_reason
    asked = flags["return_token_ids"] or flags["return_logprobs"] or out.prompt_logprobs is not None
    return completion.parsed and not shows and not asked


def _strings(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


def _logprob(lp) -> dict[str, Any]:
    top = [{"token_id": t, "token": s, "logprob": _finite(p)} for t, s, p in lp.top_logprobs]
    entry = {"token_id": lp.token_id, "token": lp.token, "logprob": _finite(lp.logprob), "top_logprobs": top}
    if lp.rank is not None:  # prompt tokens
        entry["rank"] = lp.rank
    return entry


def _finite(logprob: float | None) -> float | None:
    """A token the sampling excluded has logprob -inf, which JSON cannot carry: -9999.0, as vLLM says."""
    return None if logprob is None else max(logprob, MIN_LOGPROB)


def error_response(message: str, code=None):
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


# Health ------------------------------------------------------------------------------------------------

class HealthMonitor:
    """Polls `engine.check_health()`; on failure logs the cause and unloads this model, once. Also ends the
    stub once tritonserver is gone (see `_exit_orphaned`).

    A Python backend cannot flip its model's readiness, and Triton 2.51 keeps a model whose stub process died
    READY (requests then fail with "Stub process ... is not healthy", no restart). Unloading itself through
    the model loading API makes the model UNAVAILABLE: `/v2/models/<name>/ready` answers 400, the repository
    index says "unloaded", and loading it again starts a fresh engine. Triton lets in-flight requests finish
    first (the engine has already failed them) and then calls `finalize`, which stops the workers. The API
    needs `--model-control-mode=explicit` (how scripts/triton_env.py starts the server); in other modes the
    model stays listed as ready and requests fail fast in `_generate`.
    """

    def __init__(self, engine: AsyncLLMEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.server_pid = os.getppid()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ernie-health", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        serving = True
        while not self.stopped.wait(HEALTH_INTERVAL_S):
            if os.getppid() != self.server_pid:  # reparented: the server exited, reaped or not
                _exit_orphaned(self.name)
            if not serving:
                continue
            try:
                self.engine.check_health()
            except Exception as err:
                serving = False
                self._unload(err)

    def _unload(self, cause: Exception) -> None:
        pb_utils.Logger.log_error(f"[ernie] {self.name}: the engine cannot serve any more ({cause}); "
                                  "unloading the model")
        try:
            pb_utils.unload_model(self.name)
        except Exception as err:  # e.g. not in explicit model control mode
            pb_utils.Logger.log_error(f"[ernie] {self.name}: could not unload the model ({err!r}); it stays "
                                      "listed as ready and every request fails")

    def stop(self) -> None:
        self.stopped.set()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)


def _exit_orphaned(name: str) -> NoReturn:
    """Ends this stub: tritonserver is gone (killed, OOM, crashed). The stub's own check of its parent cannot
    be relied on: a call to the server made meanwhile (`is_cancelled` at each output of a request) waits
    forever for its answer, holding the lock the stub's exit path takes, so the stub (and a tensor-parallel
    model's workers, which exit once their pipes close) would stay, with their memory."""
    # Not pb_utils.Logger: its lines go through the dead server too.
    logging.getLogger(__name__).error("[ernie] %s: tritonserver is gone; ending its backend stub", name)
    os._exit(1)


# Metrics -----------------------------------------------------------------------------------------------

class EngineMetricsExporter:
    """Copies the engine's metrics snapshot to Triton's metrics endpoint as `ernie:<name>`, periodically.

    Triton shares one metric between all holders of its name and labels, and the first to release it frees it
    under the others: tritonserver then crashes at their next update. Two instances of a model hold the same
    ones while a load with a new config replaces the old instance (or with an instance_group count > 1), so
    an exclusive lock per server and model decides which one exports; the others take over once it is free.
    The lock is a socket name in Linux's abstract namespace, which the kernel frees with its socket: a lock
    file in /tmp stayed behind, one per model, after each server or stub that ended without `finalize`.

    Once tritonserver is gone (killed, crashed), a metric call waits forever for its answer, holding the GIL
    and the stub's message lock: the stub then never notices its parent died and stays, with its memory and
    /dev/shm region. So updates stop as soon as the stub's parent is no longer the server.
    """

    def __init__(self, engine: AsyncLLMEngine, labels: dict[str, str]):
        self.engine = engine
        self.labels = labels
        self.families: dict[str, Any] = {}
        self.gauges: dict[str, Any] = {}
        self.counters: dict[str, Any] = {}
        self.histograms: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.server_pid = os.getppid()
        self.lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._claim()  # at once, unless another instance exports (then _run retries)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ernie-metrics", daemon=True)
        self.thread.start()

    def _claim(self) -> bool:
        """Whether this instance exports: it holds the lock and its metrics (created on taking the lock)."""
        if self.families:
            return True
        try:
            self.lock.bind(export_lock_name(self.server_pid, self.labels["model"]))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:  # another instance exports
                return False
            raise
        self._create_metrics()
        return True

    def _create_metrics(self) -> None:
        snapshot = self.engine.metrics()
        # Families must outlive their metrics, so both are kept.
        kinds = ((GAUGES, pb_utils.MetricFamily.GAUGE), (COUNTERS, pb_utils.MetricFamily.COUNTER),
                 (HISTOGRAMS, pb_utils.MetricFamily.HISTOGRAM))
        self.families = {
            name: pb_utils.MetricFamily(name=f"ernie:{name}", description=name.replace("_", " "), kind=kind)
            for names, kind in kinds
            for name in names
        }
        self.gauges = {n: self.families[n].Metric(labels=self.labels) for n in GAUGES}
        self.counters = {n: self.families[n].Metric(labels=self.labels) for n in COUNTERS}
        self.histograms = {n: self.families[n].Metric(labels=self.labels, buckets=snapshot[n]["buckets"])
                           for n in HISTOGRAMS}
        self.last = {n: 0 for n in COUNTERS} | {n: _empty_histogram(snapshot[n]) for n in HISTOGRAMS}

    def _run(self) -> None:
        while not self.stopped.wait(METRICS_INTERVAL_S) and os.getppid() == self.server_pid:
            try:
                if self._claim():
                    self.update(self.engine.metrics())
            except Exception as err:  # metrics must never take the model down
                pb_utils.Logger.log_warn(f"[ernie] metrics update failed: {err!r}")

    def update(self, snapshot: dict[str, Any]) -> None:
        for name, metric in self.gauges.items():
            metric.set(float(snapshot[name]))
        for name, metric in self.counters.items():  # Triton counters only increase: add the growth
            growth = snapshot[name] - self.last[name]
            if growth > 0:
                metric.increment(float(growth))
            self.last[name] = snapshot[name]
        for name, metric in self.histograms.items():
            for value in replay_values(self.last[name], snapshot[name]):
                metric.observe(value)
            self.last[name] = snapshot[name]

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        # Release metrics before their families, while the stub still talks to the server: left to interpreter
        # exit, the teardown order is arbitrary and the stub crashes.
        for metrics in (self.gauges, self.counters, self.histograms, self.families):
            metrics.clear()
        self.lock.close()  # after the metrics are gone: another instance may create them now


def export_lock_name(server_pid: int, model: str) -> bytes:
    """Per tritonserver and model (other servers on this host export their own); a digest of the model name
    keeps it within the socket address limit (108 bytes)."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:32]
    return f"\0ernie-metrics-{server_pid}-{digest}".encode()


def _empty_histogram(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {**snapshot, "cumulative_counts": [0] * len(snapshot["cumulative_counts"]), "sum": 0.0, "count": 0}


def replay_values(before: dict[str, Any], after: dict[str, Any]) -> list[float]:
    """Observations that grow a Triton histogram as the engine's grew: each lands in the bucket the engine
    counted it in, and together they add up to the engine's growth in sum (the python backend can only
    `observe`, not copy bucket counts)."""
    bounds = list(after["buckets"])
    per_bucket = [max(b - a, 0) for b, a in zip(_per_bucket(after), _per_bucket(before), strict=True)]
    growth = after["sum"] - before["sum"]
    lowers = [0.0, *bounds]
    low = sum(lo * n for lo, n in zip(lowers, per_bucket, strict=True))
    # The +Inf bucket has no upper bound: wide enough for its values to take any excess over the lower bounds.
    uppers = [*bounds, bounds[-1] + max(bounds[-1], growth - low)]
    slots = [(lo, hi) for lo, hi, n in zip(lowers, uppers, per_bucket, strict=True) for _ in range(n)]
    if not slots:
        return []
    high = sum(hi for _, hi in slots)
    share = (growth - low) / (high - low) if high > low else 1.0
    share = min(max(share, 1e-6), 1.0)  # > 0: a value equal to a lower bound would fall in the bucket below
    return [lo + share * (hi - lo) for lo, hi in slots]


def _per_bucket(snapshot: dict[str, Any]) -> list[int]:
    cumulative = snapshot["cumulative_counts"]
    return [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
