"""Serving benchmark (issue 13's load): streamed OpenAI completions at several concurrencies.

Load: `--num-requests` (32) prompts of `--prompt-len` (128) random token ids (seeded, ids in --token-range, so
every server sees the same tokens; each level its own, so none is served from another's prefix cache),
`--max-tokens` (64) output tokens, greedy, EOS ignored (`ignore_eos`),
streamed, at most `--concurrency` requests in flight (1, 4, 16, 32). Per concurrency: output tok/s (all
output tokens / wall time), TTFT and inter-token latency (gaps between streamed chunks) p50 / p99; for our
targets also the CPU time each output token cost, per process (backend, tritonserver, frontend, this load
generator): on a 2-core machine every part of the stack takes its share from the engine's two kernel threads.

Targets, one of (combinable: `--engine --serve` prints the stack / engine ratio per concurrency):
    python scripts/bench_serving.py --base-url http://127.0.0.1:8188/v1 --model ROW   # a running server
    python scripts/bench_serving.py --serve --model CKPT [--quantization wint8] [--quantize-lm-head]  # ours
    python scripts/bench_serving.py --engine --model CKPT [--quantization wint8]      # AsyncLLMEngine alone
`--serve` starts tritonserver (one row serving CKPT) and the OpenAI frontend on free 127.0.0.1 ports and
stops them at the end. Every level is bounded by --timeout; unfinished requests are cancelled and the level
is marked incomplete. The machine may be shared: the load average is printed with each level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "backend"))

from cli_args import positive_int, positive_ints  # noqa: E402

logger = logging.getLogger("bench_serving")

SERVED_NAME = "ernie-bench"
READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class Load:
    num_requests: int = 32
    prompt_len: int = 128
    max_tokens: int = 64
    token_range: tuple[int, int] = (10, 3000)  # fits the random checkpoints' 3000-piece tokenizer
    seed: int = 0

    def prompts(self, level: int = 0) -> list[list[int]]:
        """Each level gets prompts of its own: no level is served from another's prefix cache."""
        rng = np.random.default_rng((self.seed, level))
        low, high = self.token_range
        return [rng.integers(low, high, size=self.prompt_len).tolist() for _ in range(self.num_requests)]


@dataclass
class Trace:
    """One request: when it was sent, when each chunk of output arrived, how many tokens it carried, whether
    its stream ran to the end."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""
    finished: bool = False


@dataclass
class Result:
    target: str
    concurrency: int
    requests: int
    completed: int
    tokens: int
    wall_s: float
    tok_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    load_avg: float
    errors: list[str] = field(default_factory=list)
    steps: int = 0  # engine steps during the level (0: unknown); tokens / steps shows how well it batched
    cpu_ms_per_token: dict[str, float] = field(default_factory=dict)  # by process, where known


# One request of the load: (prompt, trace to fill). Implementations stream and fill `trace` as chunks arrive.
SendFn = Callable[[list[int], Trace], Awaitable[None]]
# The engine's step counter (num_steps_total), where the target exposes it.
StepsFn = Callable[[], int]
# CPU seconds used so far, by process, where the target's processes are known.
CpuFn = Callable[[], dict[str, float]]


def process_cpu_seconds(pid: int) -> float:
    """User + system time of a process, all its threads (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(target: str, concurrency: int, traces: list[Trace], wall: float) -> Result:
    """TTFT and ITL come from the requests that streamed output: a request of a random-weight checkpoint can
    spend all its tokens on byte pieces that never form text, and then sends only its closing chunk."""
    done = [t for t in traces if t.finished]
    timed = [t for t in done if t.chunks]
    ttft = [t.chunks[0] - t.sent for t in timed]
    itl = [b - a for t in timed for a, b in zip(t.chunks, t.chunks[1:], strict=False)]
    tokens = sum(t.tokens for t in traces)
    errors = sorted({t.error for t in traces if t.error})
    return Result(target, concurrency, len(traces), len(done), tokens, wall, tokens / wall if wall else 0.0,
                  _percentile(ttft, 50), _percentile(ttft, 99), _percentile(itl, 50), _percentile(itl, 99),
                  os.getloadavg()[0], errors)


async def run_level(target: str, send: SendFn, prompts: list[list[int]], concurrency: int,
                    timeout: float) -> Result:
    """All prompts with at most `concurrency` in flight, bounded by `timeout` seconds."""
    gate = asyncio.Semaphore(concurrency)
    traces: list[Trace] = []

    async def one(prompt: list[int]) -> None:
        async with gate:
            trace = Trace(sent=time.perf_counter())
            traces.append(trace)
            try:
                await send(prompt, trace)
                trace.finished = True
            except asyncio.CancelledError:
                trace.error = "cancelled at the level timeout"
                raise
            except Exception as err:  # recorded per request: one failure must not hide the others' timings
                trace.error = f"{type(err).__name__}: {err}"

    start = time.perf_counter()
    tasks = [asyncio.create_task(one(p)) for p in prompts]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        logger.warning("%s c%d: %d request(s) unfinished after %.0f s", target, concurrency, len(pending),
                       timeout)
    return summarize(target, concurrency, traces, time.perf_counter() - start)


# Targets -----------------------------------------------------------------------------------------------

def openai_sender(client: Any, model: str, max_tokens: int) -> SendFn:
    """Streamed /completions with token-id prompts; usage (when the server sends it) counts the tokens."""

    async def send(prompt: list[int], trace: Trace) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        chunks = usage = 0
        async with client.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(str(event["error"]))
                # A chunk carries a token when it has text or is not the closing one: llama-server streams
                # tokens it does not render (e.g. ids past the random checkpoints' pieces) with empty text.
                if any(c.get("text") or c.get("finish_reason") is None for c in event.get("choices") or []):
                    trace.chunks.append(time.perf_counter())
                    chunks += 1
                usage = (event.get("usage") or {}).get("completion_tokens") or usage
        trace.tokens = usage or chunks

    return send


def engine_sender(engine: Any, max_tokens: int) -> SendFn:
    from ernie_engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    counter = iter(range(1 << 62))

    async def send(prompt: list[int], trace: Trace) -> None:
        stream = engine.add_request(f"bench-{next(counter)}", prompt_token_ids=prompt, sampling_params=params)
        async for out in stream:
            if out.error:
                raise RuntimeError(out.error)
            new = sum(len(c.token_ids) for c in out.outputs)
            if new:
                trace.chunks.append(time.perf_counter())
                trace.tokens += new

    return send


def engine_parameters(args: argparse.Namespace) -> dict[str, str]:
    """The row's config.pbtxt parameters; --engine builds its EngineConfig from the same ones."""
    params = {"model": str(args.model.resolve()), "max_model_len": str(args.max_model_len),
              "max_num_seqs": str(args.max_num_seqs)}
    if args.quantization:
        params["quantization"] = args.quantization
    if args.quantize_lm_head:
        params["quantize_lm_head"] = "true"
    if args.dtype:
        params["dtype"] = args.dtype
    if args.max_num_batched_tokens:
        params["max_num_batched_tokens"] = str(args.max_num_batched_tokens)
    return params


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_repository(folder: Path, params: dict[str, str]) -> Path:
    row = folder / SERVED_NAME
    (row / "1").mkdir(parents=True)
    entries = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    header = 'backend: "ernie"\nmax_batch_size: 0\ninstance_group [{ kind: KIND_CPU count: 1 }]\n'
    (row / "config.pbtxt").write_text(f"{header}parameters [\n{entries}\n]\n")
    return folder


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def serve_stack(params: dict[str, str], load_timeout: float,
                log_dir: Path) -> Iterator[tuple[str, StepsFn, CpuFn]]:
    """tritonserver (one row) + the OpenAI frontend on free loopback ports; yields the frontend's /v1 URL, the
    engine's step counter (from Triton's metrics endpoint) and the processes' CPU time (the backend is
    tritonserver's Python stub process)."""
    import triton_env

    backends = triton_env.assemble_backends()
    repo = write_repository(log_dir / "model_repository", params)
    http, grpc, metrics, openai = (free_port() for _ in range(4))
    argv = triton_env.server_args(repo, http, grpc, metrics, models=(SERVED_NAME,), backends=backends)
    processes: list[subprocess.Popen] = []
    try:
        with (log_dir / "tritonserver.log").open("w") as log:
            processes.append(subprocess.Popen(argv, env=triton_env.server_env(), stdout=log,
                                              stderr=subprocess.STDOUT))
        triton_url = f"http://127.0.0.1:{http}"
        started = time.monotonic()
        alive = processes[0].poll
        triton_env.wait_for_model(triton_url, SERVED_NAME, load_timeout, alive=lambda: alive() is None)
        logger.info("row loaded in %.0f s (logs in %s)", time.monotonic() - started, log_dir)
        command = [sys.executable, "-m", "openai_frontend", "--triton-url", triton_url, "--port", str(openai),
                   "--log-level", "warning"]
        with (log_dir / "frontend.log").open("w") as log:
            processes.append(subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        base_url = f"http://127.0.0.1:{openai}/v1"
        _wait_http(f"{base_url}/models", processes[1], READY_TIMEOUT_S)
        triton, frontend = (p.pid for p in processes)

        def cpu() -> dict[str, float]:
            return {"backend": sum(process_cpu_seconds(pid) for pid in child_pids(triton)),
                    "tritonserver": process_cpu_seconds(triton), "frontend": process_cpu_seconds(frontend),
                    "load generator": own_cpu_seconds()}

        yield base_url, lambda: triton_steps(f"http://127.0.0.1:{metrics}/metrics"), cpu
    finally:
        for process in reversed(processes):
            _stop(process)


def triton_steps(metrics_url: str) -> int:
    """The backend's `ernie:num_steps_total` (exported every 0.5 s), from Triton's Prometheus text."""
    import httpx

    time.sleep(1.0)  # let the backend's exporter catch up with the level that just ended
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ernie:num_steps_total{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


# Driver ------------------------------------------------------------------------------------------------

async def measure(target: str, send: SendFn, load: Load, levels: list[int], timeout: float,
                  steps: StepsFn | None = None, cpu: CpuFn | None = None) -> list[Result]:
    warm = Load(num_requests=2, prompt_len=load.prompt_len, max_tokens=4, seed=load.seed + 1)
    await run_level(f"{target} warm-up", send, warm.prompts(), 2, timeout)  # first-call setup is not timed
    results = []
    for concurrency in levels:
        before, cpu_before = steps() if steps else 0, cpu() if cpu else {}
        result = await run_level(target, send, load.prompts(concurrency), concurrency, timeout)
        result.steps = steps() - before if steps else 0
        if cpu and result.tokens:
            result.cpu_ms_per_token = {name: (seconds - cpu_before[name]) * 1e3 / result.tokens
                                       for name, seconds in cpu().items()}
        logger.info("%s c%d: %.1f tok/s (load average %.1f)", target, concurrency, result.tok_s,
                    result.load_avg)
        results.append(result)
    return results


async def measure_openai(target: str, base_url: str, model: str, load: Load, levels: list[int],
                         timeout: float, steps: StepsFn | None = None,
                         cpu: CpuFn | None = None) -> list[Result]:
    import httpx

    # No keep-alive: llama-server closes idle connections, and reusing one it has just closed fails the
    # request ("Server disconnected without sending a response"). A new loopback connection per request costs
    # every target the same.
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=0)
    http_timeout = httpx.Timeout(connect=10.0, read=timeout, write=30.0, pool=None)
    client = httpx.AsyncClient(base_url=base_url.rstrip("/"), limits=limits, timeout=http_timeout)
    async with client:
        if not model:
            model = (await client.get("/models")).json()["data"][0]["id"]
        send = openai_sender(client, model, load.max_tokens)
        return await measure(target, send, load, levels, timeout, steps, cpu)


async def measure_engine(label: str, params: dict[str, str], load: Load, levels: list[int],
                         timeout: float) -> list[Result]:
    from ernie_engine import AsyncLLMEngine, EngineConfig

    engine = AsyncLLMEngine(EngineConfig.from_parameters(params))
    try:
        def steps() -> int:
            return engine.metrics()["num_steps_total"]

        def cpu() -> dict[str, float]:
            return {"engine + load generator": own_cpu_seconds()}

        return await measure(label, engine_sender(engine, load.max_tokens), load, levels, timeout, steps, cpu)
    finally:
        engine.shutdown()


def print_table(results: list[Result], load: Load) -> None:
    print(f"\n{load.num_requests} requests x {load.prompt_len} prompt tokens -> {load.max_tokens} output "
          f"tokens, greedy, ignore_eos, streamed; {os.cpu_count()} CPU cores; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'target':<18} {'conc':>4} {'done':>6} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'wall s':>7} {'load':>5} {'tok/step':>8}")
    for r in results:
        print(f"{r.target:<18} {r.concurrency:>4} {r.completed:>3}/{r.requests:<2} {r.tok_s:>9.1f} "
              f"{r.ttft_p50:>9.3f} {r.ttft_p99:>9.3f} {r.itl_p50 * 1e3:>6.0f}ms {r.itl_p99 * 1e3:>6.0f}ms "
              f"{r.wall_s:>7.1f} {r.load_avg:>5.1f} {r.tokens / r.steps if r.steps else float('nan'):>8.1f}")
        if r.cpu_ms_per_token:
            parts = ", ".join(f"{name} {ms:.2f}" for name, ms in r.cpu_ms_per_token.items())
            print(f"    CPU ms per output token: {parts}")
        for error in r.errors:
            print(f"    error: {error}")


def print_ratio(engine: list[Result], stack: list[Result]) -> None:
    by_level = {r.concurrency: r for r in engine}
    for r in stack:
        base = by_level.get(r.concurrency)
        if base and base.tok_s:
            mark = "  (target >= 0.9)" if r.concurrency == 16 else ""
            print(f"stack / engine at c{r.concurrency}: {r.tok_s / base.tok_s:.2f}{mark}")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8188/v1")
    target.add_argument("--serve", action="store_true", help="start tritonserver + frontend serving --model")
    target.add_argument("--engine", action="store_true", help="measure AsyncLLMEngine alone on --model")
    target.add_argument("--model", help="checkpoint folder (--serve/--engine), or the served model name "
                                        "(--base-url; default: the first listed)")
    target.add_argument("--label", default="", help="row name in the table (default: the target kind)")
    row = parser.add_argument_group("row shape (--serve / --engine)")
    row.add_argument("--quantization", default="", choices=["", "wint8", "wint4", "w4a8"])
    row.add_argument("--quantize-lm-head", action="store_true", help="the LM head too (as llama.cpp's q8_0)")
    row.add_argument("--dtype", default="", help="EngineConfig dtype (default: auto)")
    row.add_argument("--max-model-len", type=int, default=2048)
    row.add_argument("--max-num-seqs", type=int, default=128)
    row.add_argument("--max-num-batched-tokens", type=int, default=0, help="tokens per step (default: the "
                     "engine's)")
    row.add_argument("--load-timeout", type=positive_float, default=600, help="seconds for the row to load")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=positive_ints, default="1,4,16,32",
                      help="comma-separated levels (a level of 0 would wait forever)")
    load.add_argument("--num-requests", type=positive_int, default=32)
    load.add_argument("--prompt-len", type=positive_int, default=128)
    load.add_argument("--max-tokens", type=positive_int, default=64)
    load.add_argument("--token-range", type=int, nargs=2, default=[10, 3000], metavar=("LOW", "HIGH"))
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=positive_float, default=900,
                      help="seconds per level before it is cut short")
    parser.add_argument("--json", type=Path, help="append the results as JSON lines to this file")
    args = parser.parse_args(argv)
    if not (args.base_url or args.serve or args.engine):
        parser.error("give --base-url, --serve and/or --engine")
    if (args.serve or args.engine) and not (args.model and Path(args.model).is_dir()):
        parser.error("--serve / --engine need --model CHECKPOINT_FOLDER")
    if not 0 <= args.token_range[0] < args.token_range[1]:
        parser.error(f"--token-range needs 0 <= LOW < HIGH, got {args.token_range}")
    if args.serve or args.engine:
        args.model = Path(args.model)
    return args


def run(args: argparse.Namespace) -> list[Result]:
    load = Load(args.num_requests, args.prompt_len, args.max_tokens, tuple(args.token_range), args.seed)
    levels = args.concurrency
    results: dict[str, list[Result]] = {}
    if args.engine:
        label = f"{args.label}-engine" if args.label else "engine"
        params = engine_parameters(args)
        results["engine"] = asyncio.run(measure_engine(label, params, load, levels, args.timeout))
    if args.serve:
        log_dir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
        with serve_stack(engine_parameters(args), args.load_timeout, log_dir) as (url, steps, cpu):
            label = args.label or "stack"
            results["stack"] = asyncio.run(
                measure_openai(label, url, SERVED_NAME, load, levels, args.timeout, steps, cpu))
    if args.base_url:
        results["server"] = asyncio.run(
            measure_openai(args.label or "server", args.base_url, args.model or "", load, levels,
                           args.timeout))
    flat = [r for rs in results.values() for r in rs]
    print_table(flat, load)
    if "engine" in results and "stack" in results:
        print_ratio(results["engine"], results["stack"])
    return flat


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM (`timeout`, a cancelled job) unwinds like Ctrl-C: `serve_stack` stops the servers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    for noisy in ("httpx", "ernie_engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    results = run(args)
    if args.json:
        with args.json.open("a") as out:
            for r in results:
                out.write(json.dumps({**asdict(r), "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    return 0 if all(r.completed == r.requests for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
