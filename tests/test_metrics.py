"""Metrics as an operator's dashboard reads them: after a known workload each counter moved by exactly what
happened, the gauges are back at zero and each histogram holds one observation per request, in vLLM's and
FastDeploy's buckets, on Triton's metrics port (replayed from the engine) and on the frontend's /metrics."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.frontend import Frontend
from tests.fixtures.triton import TritonServer
from tests.process_utils import wait_for

# vLLM's buckets (vllm/v1/metrics/loggers.py); FastDeploy's request latency buckets are the same.
VLLM_BUCKETS = {
    "time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0],
    "time_per_output_token_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                                      2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
    "e2e_request_latency_seconds": [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0],
}
VLLM_BUCKETS["request_queue_time_seconds"] = VLLM_BUCKETS["e2e_request_latency_seconds"]
HISTOGRAMS = list(VLLM_BUCKETS)


def key(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def scrape(url: str, prefix: str) -> dict[str, float]:
    """The samples of the metrics named `prefix...`, by `key` (the name without the prefix)."""
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    return {key(s.name.removeprefix(prefix), **s.labels): s.value
            for family in families for s in family.samples if s.name.startswith(prefix)}


class Engine:
    """The test row's `ernie:` samples on Triton's metrics port."""

    def __init__(self, server: TritonServer) -> None:
        self.server = server
        self.samples = scrape(server.metrics_url, "ernie:")

    def __getitem__(self, name: str) -> float:
        return self.samples[key(name, model=self.server.model)]

    def buckets(self, name: str) -> list[float]:
        prefix = f"{name}_bucket{{le="
        return [float(k.removeprefix(prefix).split(",")[0]) for k in self.samples
                if k.startswith(prefix) and k.endswith(f"model={self.server.model}}}")]


def test_triton_export_counts_a_known_workload_exactly(triton_server: TritonServer):
    before = Engine(triton_server)
    prompt_tokens = generation_tokens = 0
    took = 0.0
    for n in (1, 2, 3):  # one prompt each, n choices: its prompt counts once, every choice's tokens count
        sampling = {"max_tokens": 4, "ignore_eos": True, "n": n, "temperature": 1.0}
        payload = {"text_input": "hello world " * n, "sampling_parameters": json.dumps(sampling),
                   "return_num_input_tokens": True, "return_num_output_tokens": True}
        start = time.monotonic()
        response = httpx.post(f"{triton_server.http_url}/v2/models/{triton_server.model}/generate",
                              json=payload, timeout=60)
        took += time.monotonic() - start
        body = response.json()
        inputs, outputs = (body[k] if n > 1 else [body[k]] for k in ("num_input_tokens", "num_output_tokens"))
        assert outputs == [4] * n and len(set(inputs)) == 1
        prompt_tokens += inputs[0]
        generation_tokens += sum(outputs)

    def exported(engine: Engine) -> bool:  # the exporter copies the engine's metrics every 0.5 s
        names = ["request_success_total", *(f"{name}_count" for name in HISTOGRAMS)]
        return all(engine[name] - before[name] == 3 for name in names)

    assert wait_for(lambda: exported(Engine(triton_server)), timeout=15)
    after = Engine(triton_server)

    def grown(name: str) -> float:
        return after[name] - before[name]

    assert grown("prompt_tokens_total") == prompt_tokens
    assert grown("generation_tokens_total") == generation_tokens == 4 * 6
    for name in ("request_failure_total", "request_abort_total", "request_preempted_total"):
        assert grown(name) == 0, name
    for name in ("num_requests_running", "num_requests_waiting", "num_kv_blocks_used",
                 "gpu_cache_usage_perc"):
        assert after[name] == 0, name
    # One observation per request in each histogram (TPOT too: each request has more than one token).
    sums = {name: grown(f"{name}_sum") for name in HISTOGRAMS}
    assert 0 < sums["request_queue_time_seconds"] <= sums["time_to_first_token_seconds"]
    assert sums["time_to_first_token_seconds"] < sums["e2e_request_latency_seconds"] <= took
    assert 0 < sums["time_per_output_token_seconds"] < sums["e2e_request_latency_seconds"]


def test_histograms_have_vllms_buckets_on_the_metrics_port(triton_server: TritonServer):
    """Before, every histogram had the TTFT buckets without vLLM's last one (up to 640 s): e2e latencies of
    long generations (minutes on CPU) all fell in +Inf, where quantiles stop, and TPOT had TTFT's bounds."""
    engine = Engine(triton_server)
    for name, bounds in VLLM_BUCKETS.items():
        assert engine.buckets(name) == [*bounds, float("inf")], name


def test_frontend_counts_requests_and_tokens_exactly(openai_frontend: Frontend):
    url = f"{openai_frontend.url}/metrics"
    before = scrape(url, "openai_frontend_")
    client = openai.OpenAI(base_url=openai_frontend.base_url, api_key="EMPTY", max_retries=0)
    ask = dict(model="default", messages=[{"role": "user", "content": "Hello!"}], max_tokens=3, n=2,
               extra_body={"ignore_eos": True})
    answer = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    streamed = chunks[-1].usage
    assert answer.usage.completion_tokens == streamed.completion_tokens == 6
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**ask, "max_tokens": 100000})
    after = scrape(url, "openai_frontend_")

    def delta(name: str, **labels: str) -> float:
        return after.get(key(name, **labels), 0.0) - before.get(key(name, **labels), 0.0)

    chat = "/v1/chat/completions"
    assert delta("requests_total", endpoint=chat, status="200") == 2
    assert delta("requests_total", endpoint=chat, status="400") == 1
    assert delta("prompt_tokens_total", endpoint=chat) == answer.usage.prompt_tokens + streamed.prompt_tokens
    assert delta("completion_tokens_total", endpoint=chat) == 12
    assert delta("time_to_first_token_seconds_count", endpoint=chat) == 1  # streams only
    assert after[key("requests_in_flight")] == 0
