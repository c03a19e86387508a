"""The `ernie` backend inside the real tritonserver, through the real clients (tritonclient gRPC, HTTP)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from ernie_engine.metrics import Histogram
from tritonclient.utils import InferenceServerException

from tests.fixtures.triton import (
    ABSENT_MODEL,
    ABSENT_ROW,
    TEST_ROW_PARAMS,
    TritonServer,
    engine_metric,
    longer_context_row,
    running_server,
    triton_env,
    write_row,
)
from tests.process_utils import wait_for

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The weather today is sunny"
pytestmark = pytest.mark.server


# Helpers -----------------------------------------------------------------------------------------------

def generate(server: TritonServer, payload: dict, stream: bool = False) -> httpx.Response:
    route = "generate_stream" if stream else "generate"
    return httpx.post(f"{server.http_url}/v2/models/{server.model}/{route}", json=payload, timeout=60)


def sse_events(response: httpx.Response) -> list[dict]:
    lines = response.text.splitlines()
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]


def request(sampling: dict | None = None, **extra) -> dict:
    payload = {"text_input": PROMPT, "return_num_output_tokens": True, "return_finish_reason": True, **extra}
    if sampling is not None:
        payload["sampling_parameters"] = json.dumps(sampling)
    return payload


def model_ready(server: TritonServer) -> bool:
    return httpx.get(f"{server.http_url}/v2/models/{server.model}/ready", timeout=10).status_code == 200


def assert_still_serving(server: TritonServer) -> None:
    assert model_ready(server)
    body = generate(server, request({"max_tokens": 2, "temperature": 0})).json()
    assert body.get("num_output_tokens") == 2, body


@dataclass
class GrpcStream:
    """One gRPC bidirectional stream with one request on it; collects responses until the final one."""

    server: TritonServer
    responses: list = field(default_factory=list)
    arrival_times: list = field(default_factory=list)
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.server.grpc_url)
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result, error) -> None:
        if error is not None:
            self.error = error
            self.done.set()
            return
        self.arrival_times.append(time.monotonic())
        final = result.get_response().parameters.get("triton_final_response")
        if result.as_numpy("text_output") is not None:
            self.responses.append(result)
        if final is not None and final.bool_param:
            self.done.set()

    def send(self, prompt: str, sampling: dict, request_id: str = "", model: str = "") -> None:
        inputs = [
            _input("text_input", [prompt.encode()], "BYTES"),
            _input("stream", [True], "BOOL"),
            _input("sampling_parameters", [json.dumps(sampling).encode()], "BYTES"),
            _input("return_num_output_tokens", [True], "BOOL"),
            _input("return_finish_reason", [True], "BOOL"),
        ]
        self.send_inputs(inputs, request_id, model)

    def send_inputs(self, inputs: list[grpcclient.InferInput], request_id: str = "", model: str = "") -> None:
        self.client.async_stream_infer(model or self.server.model, inputs, request_id=request_id,
                                       enable_empty_final_response=True)

    def text(self) -> str:
        return "".join(r.as_numpy("text_output")[0].decode() for r in self.responses)

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _input(name: str, values: list, dtype: str) -> grpcclient.InferInput:
    array = np.array(values, dtype=np.object_ if dtype == "BYTES" else bool)
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


# Tests -------------------------------------------------------------------------------------------------

def test_auto_complete_adds_tensors_and_decoupled_policy(triton_server: TritonServer):
    config = httpx.get(f"{triton_server.http_url}/v2/models/{triton_server.model}/config", timeout=10).json()
    assert config["model_transaction_policy"]["decoupled"] is True
    inputs = {i["name"]: i for i in config["input"]}
    assert {"text_input", "messages", "prompt_token_ids", "sampling_parameters", "stream"} <= set(inputs)
    assert all(i["optional"] for i in inputs.values())
    outputs = {o["name"] for o in config["output"]}
    assert {"text_output", "reasoning_output", "tool_calls", "finish_reason", "num_output_tokens"} <= outputs


def test_grpc_concurrent_streams(triton_server: TritonServer):
    prompts = [PROMPT, "Where is the capital of China?", "床前明月光", "hello world 123"]
    streams = [GrpcStream(triton_server) for _ in prompts]
    # Long enough (~0.3 s on the tiny model) that the first stream cannot finish before the last one starts.
    max_tokens = 200
    try:
        for i, (stream, prompt) in enumerate(zip(streams, prompts, strict=True)):
            sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            stream.send(prompt, sampling, request_id=f"c{i}")
        assert all(s.done.wait(60) for s in streams), "a stream did not finish"
    finally:
        for stream in streams:
            stream.close()
    for stream in streams:
        assert stream.error is None, stream.error
        assert len(stream.responses) > 1, "streaming sends a response per step"
        last = stream.responses[-1]
        assert last.as_numpy("num_output_tokens")[0] == max_tokens
        assert last.as_numpy("finish_reason")[0] == b"length"
        assert stream.text()
    # Served together, not one after another: every stream had started before any had finished.
    assert max(s.arrival_times[0] for s in streams) < min(s.arrival_times[-1] for s in streams)


def test_http_generate_and_generate_stream_agree(triton_server: TritonServer):
    sampling = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = generate(triton_server, request(sampling))
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["num_output_tokens"] == 12 and body["finish_reason"] == "length"
    events = sse_events(generate(triton_server, request(sampling, stream=True), stream=True))
    assert len(events) > 1 and all("error" not in e for e in events), events
    assert "".join(e["text_output"] for e in events) == body["text_output"]
    assert events[-1]["num_output_tokens"] == 12 and events[-1]["finish_reason"] == "length"


def test_sampling_parameters_take_effect(triton_server: TritonServer):
    def run(sampling: dict, **extra) -> dict:
        response = generate(triton_server, request(sampling, return_token_ids=True, **extra))
        assert response.status_code == 200, response.text
        return response.json()

    for max_tokens in (1, 5):
        body = run({"max_tokens": max_tokens, "ignore_eos": True})
        assert body["num_output_tokens"] == max_tokens
        assert len(np.atleast_1d(body["output_token_ids"])) == max_tokens
    greedy = [run({"max_tokens": 16, "temperature": 0, "ignore_eos": True}) for _ in range(2)]
    assert greedy[0]["output_token_ids"] == greedy[1]["output_token_ids"]
    seeded = {"max_tokens": 16, "temperature": 1.0, "top_k": 0, "ignore_eos": True}
    same = [run({**seeded, "seed": 7})["output_token_ids"] for _ in range(2)]
    other = run({**seeded, "seed": 8})["output_token_ids"]
    assert same[0] == same[1] and same[0] != other
    # Generate-extension keys that are not inputs arrive as request parameters: they are sampling keys too.
    assert run(None, max_tokens=3, ignore_eos=True)["num_output_tokens"] == 3
    several = run({"n": 2, "max_tokens": 3, "ignore_eos": True})  # one response, one element per completion
    assert several["index"] == [0, 1] and several["num_output_tokens"] == [3, 3]
    assert len(several["text_output"]) == 2 and len(several["output_token_ids"]) == 6
    with_logprobs = run({"max_tokens": 3, "logprobs": 2}, return_logprobs=True)
    logprobs = json.loads(with_logprobs["logprobs"])
    assert [lp["token_id"] for lp in logprobs] == with_logprobs["output_token_ids"]
    assert all(lp["logprob"] <= 0 and len(lp["top_logprobs"]) == 2 for lp in logprobs)
    body = run({"max_tokens": 2}, return_num_input_tokens=True)
    assert body["num_input_tokens"] == len(np.atleast_1d(body["prompt_token_ids"])) > 0
    scored = run({"max_tokens": 1, "prompt_logprobs": 2})
    prompt_logprobs = json.loads(scored["prompt_logprobs"])
    assert [lp["token_id"] for lp in prompt_logprobs] == scored["prompt_token_ids"]
    assert prompt_logprobs[0]["logprob"] is None
    assert all(lp["logprob"] <= 0 and len(lp["top_logprobs"]) == 2 for lp in prompt_logprobs[1:])
    # exclude_input_in_output=false echoes a token-id prompt as text too.
    echo = {"prompt_token_ids": scored["prompt_token_ids"], "exclude_input_in_output": False,
            "sampling_parameters": json.dumps({"max_tokens": 1})}
    assert PROMPT in generate(triton_server, echo).json()["text_output"]


def test_cumulative_logprob_as_vllm_backend(triton_server: TritonServer):
    """vLLM backend clients ask `return_cumulative_logprob`: the sampled tokens' logprobs summed so far
    (the input was refused as unexpected)."""
    sampling = {"max_tokens": 4, "ignore_eos": True}
    flags = {"return_cumulative_logprob": True, "return_logprobs": True}
    body = generate(triton_server, request(sampling, **flags)).json()
    total = sum(lp["logprob"] for lp in json.loads(body["logprobs"]))
    assert body["cumulative_logprob"] == pytest.approx(total, rel=1e-5) and total < 0, body
    # Alone, and with logprobs null (unset): computed all the same, never NaN (not JSON).
    alone = generate(triton_server, request({**sampling, "n": 2, "logprobs": None},
                                            return_cumulative_logprob=True)).json()
    assert len(alone["cumulative_logprob"]) == 2 and all(c < 0 for c in alone["cumulative_logprob"]), alone
    payload = request(sampling, stream=True, **flags)
    events = sse_events(generate(triton_server, payload, stream=True))
    running = np.cumsum([json.loads(e["logprobs"])[0]["logprob"] for e in events])
    assert [e["cumulative_logprob"] for e in events] == pytest.approx(running.tolist(), rel=1e-5), events


def test_tokenizer_tasks(triton_server: TritonServer):
    def task(name: str, **payload) -> dict:
        response = generate(triton_server, {"task": name, **payload})
        assert response.status_code == 200, response.text
        return response.json()

    generated = generate(triton_server, request({"max_tokens": 1}, return_token_ids=True)).json()
    ids = np.atleast_1d(task("tokenize", text_input=PROMPT)["prompt_token_ids"]).tolist()
    assert ids == np.atleast_1d(generated["prompt_token_ids"]).tolist()  # what generation runs on
    with_bos = task("tokenize", text_input=PROMPT, add_special_tokens=True)
    assert with_bos["num_input_tokens"] == len(ids) + 1
    assert task("detokenize", prompt_token_ids=ids)["text_output"] == PROMPT
    messages = json.dumps([{"role": "user", "content": PROMPT}])
    chat_ids = np.atleast_1d(task("tokenize", messages=messages)["prompt_token_ids"]).tolist()
    assert PROMPT in task("detokenize", prompt_token_ids=chat_ids)["text_output"] and len(chat_ids) > len(ids)
    info = json.loads(task("tokenizer_info")["tokenizer_info"])
    assert info["eos_token"] and info["chat_template"] and info["model_max_length"] == 256
    for payload, expected in [({"task": "translate"}, "task must be one of"),
                              ({"task": "detokenize"}, "needs prompt_token_ids"),
                              ({"task": "tokenize"}, "exactly one of prompt or messages"),
                              ({"task": "tokenize", "text_input": PROMPT, "add_special_tokens": "yes"},
                               "add_special_tokens must be true or false (got 'yes')")]:
        assert expected in generate(triton_server, payload).json().get("error", "")
    assert_still_serving(triton_server)


def test_messages_use_the_chat_template(triton_server: TritonServer):
    messages = json.dumps([{"role": "user", "content": "Where is the capital of China?"}])
    payload = {"messages": messages, "sampling_parameters": json.dumps({"max_tokens": 4, "ignore_eos": True}),
               "return_num_input_tokens": True, "return_num_output_tokens": True}
    body = generate(triton_server, payload).json()
    raw = generate(triton_server, request({"max_tokens": 1}, return_num_input_tokens=True,
                                          text_input="Where is the capital of China?")).json()
    assert body["num_output_tokens"] == 4
    assert body["num_input_tokens"] > raw["num_input_tokens"], "the template adds role markup"
    # exclude_input_in_output=false echoes the rendered chat prompt (it echoed nothing for messages).
    ids = generate(triton_server, {"task": "tokenize", "messages": messages}).json()["prompt_token_ids"]
    rendered = generate(triton_server, {"task": "detokenize", "prompt_token_ids": ids}).json()["text_output"]
    for stream in (False, True):
        echo = {**payload, "exclude_input_in_output": False, "stream": stream}
        events = sse_events(generate(triton_server, echo, stream=True))
        assert "Where is the capital of China?" in rendered and events[0]["text_output"].startswith(rendered)


def test_cancelled_grpc_stream_aborts_the_engine_request(triton_server: TritonServer,
                                                         ernie_random_checkpoint: Path):
    # A row of its own: its counters start at zero, and its budget (seconds of decoding for the tiny model)
    # cannot run out before the cancellation reaches the engine, however loaded the machine is.
    max_tokens = 4000
    with longer_context_row(triton_server, ernie_random_checkpoint, max_tokens + 64) as model:
        stream = GrpcStream(triton_server)
        try:
            sampling = {"max_tokens": max_tokens, "ignore_eos": True}
            stream.send(PROMPT, sampling, request_id="to-cancel", model=model)
            assert wait_for(lambda: len(stream.responses) >= 2, timeout=30), "no tokens streamed"
            assert wait_for(lambda: engine_metric(triton_server, "num_kv_blocks_used", model) > 0, timeout=30)
        finally:
            stream.close(cancel=True)
        assert len(stream.responses) < max_tokens
        # The engine aborted it (not finished it) and freed its KV blocks.
        assert wait_for(lambda: engine_metric(triton_server, "request_abort_total", model) == 1, timeout=30)
        assert engine_metric(triton_server, "request_success_total", model) == 0
        assert wait_for(lambda: engine_metric(triton_server, "num_kv_blocks_used", model) == 0, timeout=30)
        assert engine_metric(triton_server, "num_requests_running", model) == 0
    assert_still_serving(triton_server)


def test_a_request_cancelled_while_queued_is_aborted_before_it_runs(triton_server: TritonServer,
                                                                     ernie_random_checkpoint: Path):
    """Cancellation was noticed only at a request's outputs: one waiting behind others was still prefilled
    once a slot freed, for a client long gone. max_num_seqs 1: the second request waits behind the first."""
    row, max_tokens = "ernie-test-one-seq", 4000
    params = {**TEST_ROW_PARAMS, "model": str(ernie_random_checkpoint), "max_num_seqs": "1",
              "max_model_len": str(max_tokens + 64), "num_gpu_blocks_override": "300"}
    write_row(triton_server.repository, row, params)
    url = f"{triton_server.http_url}/v2/repository/models/{row}"
    assert httpx.post(f"{url}/load", timeout=120).status_code == 200
    running, queued = GrpcStream(triton_server), GrpcStream(triton_server)
    try:
        sampling = {"max_tokens": max_tokens, "ignore_eos": True}
        running.send(PROMPT, sampling, model=row)
        assert wait_for(lambda: len(running.responses) >= 2, timeout=30), "no tokens streamed"
        queued.send(PROMPT + " again", sampling, model=row)
        assert wait_for(lambda: engine_metric(triton_server, "num_requests_waiting", row) == 1, timeout=30)
        queued.close(cancel=True)
        assert wait_for(lambda: engine_metric(triton_server, "request_abort_total", row) == 1, timeout=30)
        assert engine_metric(triton_server, "num_requests_running", row) == 1  # the first one still runs
        assert engine_metric(triton_server, "num_requests_waiting", row) == 0
    finally:
        running.close(cancel=True)
        queued.client.close()
        httpx.post(f"{url}/unload", timeout=120)
    assert_still_serving(triton_server)


BAD_INPUTS = {
    "malformed sampling JSON": ({"sampling_parameters": "{max_tokens"}, "sampling_parameters is not valid"),
    "unknown sampling key": ({"sampling_parameters": '{"max_tokenz": 3}'}, "max_tokenz"),
    "bad sampling value": ({"sampling_parameters": '{"temperature": -1}'}, "temperature"),
    "prompt too long": ({"text_input": "hello world " * 200}, "max_model_len"),
    "both prompt and messages": ({"messages": '[{"role": "user", "content": "hi"}]'}, "exactly one of"),
    "neither prompt nor messages": ({"text_input": None}, "exactly one of"),
    "messages not a list": ({"text_input": None, "messages": '{"role": "user"}'}, "messages must be a JSON"),
    "empty task": ({"task": ""}, "tokenizer_info (got '')"),
    # A raw prompt goes through no chat template: these were silently ignored.
    "tools without messages": ({"tools": '[{"type": "function", "function": {"name": "f"}}]'},
                               "tools apply to messages only"),
    "template kwargs without messages": ({"chat_template_kwargs": '{"enable_thinking": true}'},
                                         "chat_template_kwargs apply to messages only"),
    "tokenize tools without messages": ({"task": "tokenize", "tools": "[]"}, "tools apply to messages only"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_an_error_naming_it_and_the_model_stays_ready(triton_server: TritonServer, case: str):
    change, expected = BAD_INPUTS[case]
    payload = {k: v for k, v in {**request(), **change}.items() if v is not None}
    body = generate(triton_server, payload).json()
    assert expected in body.get("error", ""), body
    events = sse_events(generate(triton_server, {**payload, "stream": True}, stream=True))
    assert len(events) == 1 and expected in events[0].get("error", ""), events
    assert_still_serving(triton_server)


def test_bad_input_over_grpc_stream(triton_server: TritonServer):
    stream = GrpcStream(triton_server)
    try:
        stream.send(PROMPT, {"max_tokens": 2, "no_such_key": 1})
        assert stream.done.wait(30)
    finally:
        stream.close()
    assert isinstance(stream.error, InferenceServerException) and "no_such_key" in str(stream.error)
    assert_still_serving(triton_server)


@pytest.mark.parametrize("name", ["text_input", "sampling_parameters", "task"])
def test_string_input_that_is_not_utf8_is_an_error_naming_it(triton_server: TritonServer, name: str):
    stream = GrpcStream(triton_server)
    inputs = {"text_input": PROMPT.encode(), "sampling_parameters": b'{"max_tokens": 2}', name: b"\xff\xfe"}
    try:
        stream.send_inputs([_input(key, [value], "BYTES") for key, value in inputs.items()])
        assert stream.done.wait(30)
    finally:
        stream.close()
    assert isinstance(stream.error, InferenceServerException), stream.error
    assert f"{name} is not valid UTF-8" in str(stream.error)
    assert_still_serving(triton_server)


def test_absent_checkpoint_fails_to_load_naming_the_path(triton_server: TritonServer):
    response = httpx.post(f"{triton_server.http_url}/v2/repository/models/{ABSENT_ROW}/load", timeout=120)
    assert response.status_code == 400
    error = response.json()["error"]
    assert ABSENT_MODEL in error and str(triton_server.model_root / ABSENT_MODEL) in error, error
    # The server and its other rows carry on.
    assert httpx.get(f"{triton_server.http_url}/v2/health/ready", timeout=10).status_code == 200
    assert_still_serving(triton_server)


def test_unload_drains_in_flight_streams_then_stops_the_engine(triton_server: TritonServer,
                                                               ernie_random_checkpoint: Path):
    row = "ernie-test-unload"
    write_row(triton_server.repository, row, {"model": str(ernie_random_checkpoint), **TEST_ROW_PARAMS})
    url = f"{triton_server.http_url}/v2/repository/models/{row}"
    assert httpx.post(f"{url}/load", timeout=120).status_code == 200
    stream = GrpcStream(triton_server)
    try:
        stream.send(PROMPT, {"max_tokens": 64, "ignore_eos": True}, model=row)
        assert wait_for(lambda: len(stream.responses) >= 2, timeout=30), "no tokens streamed"
        assert httpx.post(f"{url}/unload", timeout=120).status_code == 200
        assert stream.done.wait(60), "the in-flight stream got no final response"
    finally:
        stream.close()
    assert stream.error is None and stream.responses[-1].as_numpy("num_output_tokens")[0] == 64
    # Then finalize stops the engine, and the stub exits without crashing.
    log = triton_server.log_path.read_text
    assert wait_for(lambda: f"[ernie] {row}: engine stopped" in log(), timeout=30)
    assert wait_for(lambda: f"successfully unloaded '{row}'" in log(), timeout=30)
    assert "Segmentation fault" not in log()
    assert_still_serving(triton_server)


def test_reload_with_a_new_config_keeps_the_server_up_and_exporting(triton_server: TritonServer,
                                                                     ernie_random_checkpoint: Path):
    # Triton loads the new instance before it unloads the old one, and both export the same metrics: the old
    # one releasing them must not free them under the new one (tritonserver crashed at its next update).
    row = "ernie-test-reload"
    params = {"model": str(ernie_random_checkpoint), **TEST_ROW_PARAMS}
    url = f"{triton_server.http_url}/v2/repository/models/{row}"
    write_row(triton_server.repository, row, params)
    assert httpx.post(f"{url}/load", timeout=120).status_code == 200
    try:
        write_row(triton_server.repository, row, {**params, "logprobs_mode": "processed_logprobs"})
        assert httpx.post(f"{url}/load", timeout=120).status_code == 200
        log = triton_server.log_path.read_text
        assert wait_for(lambda: log().count(f"[ernie] {row}: engine stopped") == 1, timeout=30)
        # The new config holds: min_p 1 leaves one token to draw from, the others' processed logprobs are
        # -inf, which strict JSON cannot carry (-Infinity): -9999.0, as vLLM says.
        sampling = {"max_tokens": 2, "logprobs": 2, "temperature": 1.0, "min_p": 1.0, "ignore_eos": True}
        payload = request(sampling, return_logprobs=True)
        response = httpx.post(f"{triton_server.http_url}/v2/models/{row}/generate", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        strict = {"parse_constant": lambda name: pytest.fail(f"not JSON: {name}")}
        logprobs = json.loads(response.json()["logprobs"], **strict)
        assert [top["logprob"] for top in logprobs[0]["top_logprobs"]] == [0.0, -9999.0]
        # The new engine's count, once the new instance exports (within an update interval of the old exit)
        sample = f'ernie:request_success_total{{model="{row}"}} 1'
        assert wait_for(lambda: sample in httpx.get(triton_server.metrics_url, timeout=10).text.splitlines(),
                        timeout=15)
    finally:
        httpx.post(f"{url}/unload", timeout=120)
    assert "Signal (11)" not in log()
    assert_still_serving(triton_server)


def server_pid(server: TritonServer) -> int:
    port = server.http_url.rsplit(":", 1)[1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--http-port={port}".encode() in cmdline.read_bytes().split(b"\0"):
                return int(cmdline.parent.name)
        except OSError:  # exited meanwhile
            continue
    raise AssertionError(f"no tritonserver process serves {server.http_url}")


def backend_module() -> ModuleType:
    """backend/model.py, imported with the real triton_python_backend_utils (no server: its helpers only)."""
    if "ernie_backend_model" not in sys.modules:
        sys.path.insert(0, str(triton_env.python_backend_dir()))
        spec = importlib.util.spec_from_file_location("ernie_backend_model", ROOT / "backend" / "model.py")
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(module)
    return sys.modules["ernie_backend_model"]


def export_lock_held(server: TritonServer, row: str) -> bool:
    """Whether an instance of `row` holds its metrics export lock (an abstract socket name, "@..." here)."""
    name = backend_module().export_lock_name(server_pid(server), row)
    return "@" + name[1:].decode() in Path("/proc/net/unix").read_text().split()


def leftover_lock_files(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"ernie-metrics-{pid}-*"))


def test_metrics_export_lock_is_handed_over_then_released(triton_server: TritonServer,
                                                          ernie_random_checkpoint: Path):
    """One instance of a row exports at a time: a reload's new instance takes the lock once the old one has
    released its metrics; the lock goes with the last instance and leaves no file behind."""
    row = "ernie-test-lock"
    params = {"model": str(ernie_random_checkpoint), **TEST_ROW_PARAMS}
    url = f"{triton_server.http_url}/v2/repository/models/{row}"
    log = triton_server.log_path.read_text
    write_row(triton_server.repository, row, params)
    assert httpx.post(f"{url}/load", timeout=120).status_code == 200
    try:
        assert export_lock_held(triton_server, row)
        write_row(triton_server.repository, row, {**params, "max_num_seqs": "4"})
        assert httpx.post(f"{url}/load", timeout=120).status_code == 200
        assert wait_for(lambda: log().count(f"[ernie] {row}: engine stopped") == 1, timeout=30)
        assert wait_for(lambda: export_lock_held(triton_server, row), timeout=10), "the new instance"
    finally:
        httpx.post(f"{url}/unload", timeout=120)
    assert wait_for(lambda: log().count(f"[ernie] {row}: engine stopped") == 2, timeout=30)
    assert not export_lock_held(triton_server, row)
    assert not leftover_lock_files(server_pid(triton_server))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stubs_exit_when_tritonserver_is_killed(tmp_path: Path, ernie_random_checkpoint: Path):
    # A stub outlived a killed (OOM, crash, SIGKILL) server forever, with its memory and /dev/shm region: the
    # metrics exporter's next call waited for the dead server's answer holding the GIL, so the stub never
    # acted on its parent's death. Then with requests in flight: the next is_cancelled call (at each output)
    # waited forever for the server's answer, holding the lock the stub's own exit path needs.
    row, repository = "ernie-test-killed", tmp_path / "models"
    params = {**TEST_ROW_PARAMS, "max_model_len": "4096", "num_gpu_blocks_override": "600"}
    write_row(repository, row, {"model": str(ernie_random_checkpoint), **params})
    with running_server(tmp_path, repository, row) as server:
        pid = server_pid(server)
        stubs = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        regions = [Path("/dev/shm", Path(f"/proc/{s}/cmdline").read_bytes().split(b"\0")[2].decode())
                   for s in stubs]
        streams = [GrpcStream(server) for _ in range(2)]
        try:
            for stream in streams:  # seconds of decoding each, not streamed: no response is on its way
                sampling = json.dumps({"max_tokens": 4000, "ignore_eos": True}).encode()
                stream.send_inputs([_input("text_input", [PROMPT.encode()], "BYTES"),
                                    _input("sampling_parameters", [sampling], "BYTES")])
            assert wait_for(lambda: engine_metric(server, "generation_tokens_total") > 0, timeout=30)
            os.kill(pid, signal.SIGKILL)
            time.sleep(1.5)  # a stub takes an unreaped parent for a live one: its exporter calls meanwhile
            os.waitpid(pid, 0)  # then reaped, as its supervisor would
            assert stubs and wait_for(lambda: not any(map(_alive, stubs)), timeout=15), "a stub outlived it"
            # A lock file in /tmp (the metrics export lock) stayed behind after every killed server.
            assert not leftover_lock_files(pid)
        finally:  # what a killed server leaves behind
            for stub in filter(_alive, stubs):
                os.kill(stub, signal.SIGKILL)
            for leftover in [*regions, *leftover_lock_files(pid)]:
                leftover.unlink(missing_ok=True)
            for stream in streams:
                stream.client.close()


@pytest.mark.parametrize(("bounds", "batches"), [
    (Histogram().buckets, ([0.003, 0.003, 0.09, 1.7], [700.0, 0.5, 0.0001])),
    ((1.0, 10.0), ([0.5, 3600.0, 4.0], [25.0], [0.2, 7.0])),  # far above the last bound: the sum still holds
])
def test_histogram_replay_reproduces_the_engine_histogram(bounds: tuple[float, ...], batches: tuple):
    """The exporter can only `observe`: its replayed values must land in the engine's buckets with its sum."""
    backend = backend_module()
    engine, triton = Histogram(bounds), Histogram(bounds)
    before = engine.snapshot()
    for batch in batches:
        for value in batch:
            engine.observe(value)
        after = engine.snapshot()
        for value in backend.replay_values(before, after):
            triton.observe(value)
        assert triton.snapshot()["cumulative_counts"] == after["cumulative_counts"]
        assert triton.sum == pytest.approx(after["sum"])
        before = after


def test_engine_metrics_on_the_metrics_port(triton_server: TritonServer):
    generate(triton_server, request({"max_tokens": 3, "ignore_eos": True}))
    assert wait_for(lambda: engine_metric(triton_server, "time_to_first_token_seconds_count") > 0, timeout=15)
    assert engine_metric(triton_server, "prompt_tokens_total") > 0
    assert engine_metric(triton_server, "generation_tokens_total") >= 3
    assert 0 <= engine_metric(triton_server, "gpu_cache_usage_perc") <= 1
    # num_gpu_blocks_override of the test row
    assert engine_metric(triton_server, "num_kv_blocks_total") == 128
    for gauge in ("num_requests_running", "num_requests_waiting", "request_preempted_total",
                  "prefix_cache_token_num"):
        engine_metric(triton_server, gauge)
    text = httpx.get(triton_server.metrics_url, timeout=10).text
    assert "# TYPE ernie:time_to_first_token_seconds histogram" in text
    assert "# TYPE ernie:generation_tokens_total counter" in text


def test_perf_analyzer_script(triton_server: TritonServer):
    env = {**os.environ, "GRPC_URL": triton_server.grpc_url, "CONCURRENCY": "1:2", "REQUEST_COUNT": "4",
           "MAX_TOKENS": "8"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "perf_analyzer.sh"), triton_server.model],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    throughput = re.findall(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec", result.stdout)
    assert [c for c, _ in throughput] == ["1", "2"], result.stdout[-3000:]
    assert all(float(t) > 0 for _, t in throughput)


def test_waiting_for_a_row_the_repository_lacks_fails_at_once(triton_server: TritonServer):
    """serve.sh and the fixtures wait for rows by name: one Triton's repository index does not list (a
    misspelled name) used to be waited for until the timeout (serve.sh's LOAD_TIMEOUT: 600 s)."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="'no-such-row' is not in the model repository"):
        triton_env.wait_for_model(triton_server.http_url, "no-such-row", 30)
    assert time.monotonic() - started < 10


def test_installed_backend_serves_the_real_model_repository(tmp_path: Path, ernie_random_checkpoint: Path):
    backends = triton_env.assemble_backends(tmp_path / "backends")
    (backends / "ernie").unlink()  # a standard installation: Triton's python backend only
    script = ROOT / "scripts" / "install_backend.sh"
    result = subprocess.run(["bash", str(script), "--no-deps", str(backends)], capture_output=True, text=True,
                            timeout=600)  # compiles the CPU kernels from scratch
    assert result.returncode == 0, result.stderr
    installed = backends / "ernie"
    assert not installed.is_symlink() and (installed / "model.py").is_file()
    assert (installed / "ernie_engine" / "async_engine.py").is_file()
    # model_repository/ as shipped: the default row finds its checkpoint under ERNIE_MODEL_ROOT ...
    (tmp_path / "model_root").mkdir()
    (tmp_path / "model_root" / "ernie-4.5-tiny").symlink_to(ernie_random_checkpoint)
    with running_server(tmp_path, ROOT / "model_repository", "ernie-4.5-tiny", backends) as server:
        assert_still_serving(server)
        # ... and a seed row whose checkpoint is not there says where it looked.
        row, hub_id = "ernie-4.5-21b-a3b-wint4-tp1-32k", "PaddlePaddle/ERNIE-4.5-21B-A3B-Paddle"
        response = httpx.post(f"{server.http_url}/v2/repository/models/{row}/load", timeout=120)
        assert response.status_code == 400 and str(server.model_root / hub_id) in response.json()["error"]
        assert_still_serving(server)
