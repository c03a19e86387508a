"""Bounded leak / soak run against a running frontend + tritonserver on 127.0.0.1 (not run in CI).

    python scripts/soak.py --frontend http://127.0.0.1:8188 --metrics http://127.0.0.1:8002/metrics

Drives a mixed load (chat and completions, streamed or not, n > 1, logprobs, stop strings, guided json /
regex, tool calls, clients leaving midway, non-streaming timeouts, bad requests, bursts past max_num_seqs)
in rounds, and after each round, once idle, prints what must return to baseline: RSS, open fds, threads and
TCP sockets by state of the frontend, tritonserver and each backend stub, the engine gauges, the frontend's
in-flight gauge and the number of metric series on both endpoints. At most --warmup + 2 x 1000 requests
and --max-seconds in all. The backend stub's own state (`ongoing`, the engine's streams, the grammar cache)
is not visible from outside: compare the stub's RSS and the engine gauges.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx

TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Determine weather in my location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["location", "unit"]}}}
CITIES = ["Paris", "Beijing", "Tokyo", "Cairo", "Lima", "Oslo"]
BURST = 40  # concurrent streams in a burst: past any row's max_num_seqs


# Processes -----------------------------------------------------------------------------------------------

def listener_pid(port: int) -> int:
    """The process listening on 127.0.0.1:port (by socket inode)."""
    inodes = {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
              if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] in inodes for fd in fds):
                return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"nothing listens on port {port}")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def process_stats(pid: int) -> dict[str, int | str]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    if status["State"].split()[0] == "Z":  # a stub that died: Triton does not reap it, it has no fds nor RSS
        return {"state": "exited"}
    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    inodes = {fd[8:-1] for fd in fds if fd.startswith("socket:")}
    states = Counter(TCP_STATES.get(line.split()[3], line.split()[3])
                     for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
                     if line.split()[9] in inodes)
    return {"rss_mb": int(status["VmRSS"].split()[0]) // 1024, "fds": len(fds),
            "threads": int(status["Threads"]), "tcp": ",".join(f"{k}={v}" for k, v in sorted(states.items()))}


# Load ----------------------------------------------------------------------------------------------------

def requests_for(i: int, model: str, tools_model: str) -> tuple[str, str, dict, float]:
    """(kind, path, body, client timeout) of request i: a fixed mix."""
    city = CITIES[i % len(CITIES)]
    chat = {"model": model, "messages": [{"role": "user", "content": f"Where is the capital of {city}?"}],
            "max_tokens": 24}
    text = {"model": model, "prompt": f"The capital of {city} is", "max_tokens": 24}
    key = f"k{i % 300}"  # many distinct grammars: the compile cache must stay bounded
    schema = {"type": "object", "properties": {key: {"type": "integer"}}, "required": [key]}
    mix = [
        ("chat", "/v1/chat/completions", chat, 60),
        ("chat_stream", "/v1/chat/completions", {**chat, "stream": True,
                                                 "stream_options": {"include_usage": True}}, 60),
        ("cmpl_n_logprobs", "/v1/completions", {**text, "n": 2, "logprobs": 2, "echo": True}, 60),
        ("cmpl_stream_n", "/v1/completions", {**text, "prompt": [text["prompt"], "1 + 1 ="], "n": 2,
                                              "stream": True, "logprobs": 1}, 60),
        ("chat_stop", "/v1/chat/completions", {**chat, "stop": [" is", "."], "n": 2}, 60),
        ("guided_json", "/v1/chat/completions", {**chat, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, 60),
        ("guided_regex", "/v1/completions", {**text, "guided_regex": f"[a-z]{{1,{1 + i % 200}}}"}, 60),
        ("tools", "/v1/chat/completions", {
            "model": tools_model, "tools": [WEATHER_TOOL], "max_tokens": 64, "stream": i % 2 == 0,
            "messages": [{"role": "user", "content": f"What's the weather like in {city}?"}]}, 60),
        ("tool_required", "/v1/chat/completions", {**chat, "model": tools_model, "tools": [WEATHER_TOOL],
                                                   "tool_choice": "required", "max_tokens": 48}, 60),
        ("disconnect_stream", "/v1/chat/completions", {**chat, "max_tokens": 400, "stream": True}, 60),
        ("timeout", "/v1/completions", {**text, "max_tokens": 400, "ignore_eos": True}, 0.15),
        ("bad_model", "/v1/chat/completions", {**chat, "model": f"nope-{i}"}, 10),
        ("bad_value", "/v1/completions", {**text, "max_tokens": -1}, 10),
        ("bad_schema", "/v1/chat/completions", {**chat, "guided_regex": "(unclosed"}, 10),
        ("too_long", "/v1/completions", {**text, "prompt": "word " * 6000}, 10),
    ]
    return mix[i % len(mix)]


async def one(client: httpx.AsyncClient, i: int, model: str, tools_model: str, tally: Counter) -> None:
    kind, path, body, timeout = requests_for(i, model, tools_model)
    try:
        if not body.get("stream"):
            response = await client.post(path, json=body, timeout=timeout)
            tally[f"{kind}:{response.status_code}"] += 1
            return
        async with client.stream("POST", path, json=body, timeout=timeout) as response:
            chunks = 0
            async for _ in response.aiter_lines():
                chunks += 1
                if kind == "disconnect_stream" and chunks >= 6:
                    break  # leaving the block closes the connection midway
            tally[f"{kind}:{response.status_code}"] += 1
    except httpx.TimeoutException:
        tally[f"{kind}:timeout"] += 1


async def burst(client: httpx.AsyncClient, start: int, model: str, tally: Counter) -> None:
    body = {"model": model, "prompt": "1 + 1 =", "max_tokens": 32, "stream": True}

    async def stream(j: int) -> None:
        async with client.stream("POST", "/v1/completions", json={**body, "seed": start + j}) as response:
            async for _ in response.aiter_lines():
                pass
            tally[f"burst:{response.status_code}"] += 1

    await asyncio.gather(*(stream(j) for j in range(BURST)))


async def drive(frontend: str, count: int, first: int, models: tuple[str, str], tally: Counter) -> None:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=8)
    async with httpx.AsyncClient(base_url=frontend, limits=limits) as client:
        semaphore = asyncio.Semaphore(12)

        async def guarded(i: int) -> None:
            async with semaphore:
                await one(client, i, *models, tally)

        sent = 0
        while sent < count:
            size = min(200, count - sent)
            await asyncio.gather(burst(client, first + sent, models[0], tally),
                                 *(guarded(first + sent + k) for k in range(size - BURST)))
            sent += size


# Measurements --------------------------------------------------------------------------------------------

def series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def engine_gauges(text: str) -> dict[str, float]:
    names = "num_requests_running|num_requests_waiting|num_kv_blocks_used"
    found = re.findall(rf'^ernie:({names}){{model="([^"]+)"}} (\S+)$', text, re.M)
    return {f"{model}:{name}": float(value) for name, model, value in found}


def settle(frontend: str, metrics: str, timeout: float = 30.0) -> dict:
    """Wait until the engines and the frontend are idle (or timeout); the snapshot then."""
    deadline = time.monotonic() + timeout
    while True:
        triton_text, front_text = httpx.get(metrics).text, httpx.get(f"{frontend}/metrics").text
        gauges = engine_gauges(triton_text)
        in_flight = float(re.search(r"^openai_frontend_requests_in_flight (\S+)$", front_text, re.M).group(1))
        if (not any(gauges.values()) and not in_flight) or time.monotonic() > deadline:
            return {"engine": {k: v for k, v in gauges.items() if v}, "frontend_in_flight": in_flight,
                    "series": {"triton": series(triton_text), "frontend": series(front_text)}}
        time.sleep(0.5)


def snapshot(frontend: str, metrics: str) -> dict:
    idle = settle(frontend, metrics)
    time.sleep(2)  # let closed connections reach their final state
    front = listener_pid(urlparse(frontend).port)
    triton = listener_pid(urlparse(metrics).port)
    stubs = {f"stub{k}": pid for k, pid in enumerate(children(triton))}
    pids = {"frontend": front, "tritonserver": triton, **stubs}
    return {**idle, **{name: process_stats(pid) for name, pid in pids.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frontend", default="http://127.0.0.1:8188")
    parser.add_argument("--metrics", default="http://127.0.0.1:8002/metrics", help="Triton's metrics URL")
    parser.add_argument("--model", default=None, help="default: the first served model")
    parser.add_argument("--tools-model", default=None, help="a row with a tool parser (default: --model)")
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--requests", type=int, default=1000, help="requests per round (<= 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="<= 2")
    parser.add_argument("--max-seconds", type=float, default=900)
    args = parser.parse_args()
    assert urlparse(args.frontend).hostname == "127.0.0.1" and urlparse(args.metrics).hostname == "127.0.0.1"
    model = args.model or httpx.get(f"{args.frontend}/v1/models").json()["data"][0]["id"]
    models = (model, args.tools_model or model)
    start, sent, tally = time.monotonic(), 0, Counter()
    print(json.dumps({"round": "baseline", **snapshot(args.frontend, args.metrics)}), flush=True)
    for round_, count in enumerate([args.warmup] + [min(args.requests, 1000)] * min(args.rounds, 2)):
        left = args.max_seconds - (time.monotonic() - start)
        try:
            asyncio.run(asyncio.wait_for(drive(args.frontend, count, sent, models, tally), max(1.0, left)))
        except TimeoutError:
            print(f"time budget of {args.max_seconds:g} s spent: stopping", flush=True)
            break
        sent += count
        print(json.dumps({"round": round_, "sent": sent, "elapsed_s": round(time.monotonic() - start),
                          **snapshot(args.frontend, args.metrics)}), flush=True)
    print(json.dumps(dict(sorted(tally.items()))))


if __name__ == "__main__":
    main()
