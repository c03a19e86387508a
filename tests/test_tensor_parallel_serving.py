"""A TP=2 row in the real tritonserver: streamed greedy output equals TP=1, and a killed worker fails the
request in flight within seconds and takes the model out of service (backend/model.py's HealthMonitor).

The worker processes are found as descendants of this test process (tritonserver -> stub -> workers) whose
command line runs `ernie_engine.distributed.worker`; the rank comes from their PADDLE_TRAINER_ID.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from ernie_engine import EngineConfig, LLMEngine, SamplingParams
from ernie_engine.outputs import merge_outputs

from tests.fixtures.triton import TritonServer, running_server, triton_env, write_row
from tests.process_utils import wait_for
from tests.test_tensor_parallel import DENSE, make_checkpoint

pytestmark = pytest.mark.server

ROW = "ernie-tp2"
ROW_PARAMS = {"tensor_parallel_size": "2", "max_model_len": "512", "max_num_seqs": "4", "block_size": "16",
              "num_gpu_blocks_override": "64", "enable_prefix_caching": "false"}
PROMPT = [5, 77, 101, 12, 290, 41, 7, 250, 33, 64]  # token ids below the checkpoint's vocab of 302
GREEDY = {"temperature": 0, "max_tokens": 32, "ignore_eos": True}
LONG = {"temperature": 0, "max_tokens": 480, "ignore_eos": True}
FAIL_WITHIN_S = 10.0
UNLOAD_WITHIN_S = 20.0
WORKER_MODULE = b"ernie_engine.distributed.worker"


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp-serving") / "ckpt", DENSE, "paddle", seed=3)


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory: pytest.TempPathFactory, tp_checkpoint: Path) -> Iterator[TritonServer]:
    base = tmp_path_factory.mktemp("triton-tp")
    write_row(base / "models", ROW, {"model": str(tp_checkpoint), **ROW_PARAMS})
    workers: list[int] = []
    try:
        with running_server(base, base / "models", ROW) as server:
            workers.extend(worker_pids().values())
            yield server
    finally:  # the stub stops its workers; make sure of it even if the server died uncleanly
        for pid in workers:
            _kill(pid)


def tp1_greedy(model_dir: Path) -> tuple[str, list[int]]:
    params = {**ROW_PARAMS, "model": str(model_dir), "tensor_parallel_size": "1"}
    engine = LLMEngine(EngineConfig.from_parameters(params))
    engine.add_request("ref", prompt_token_ids=PROMPT, sampling_params=SamplingParams(**GREEDY))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    completion = merge_outputs(outputs).outputs[0]
    return completion.text, completion.token_ids


# Processes ---------------------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def worker_pids() -> dict[int, int]:
    """{rank: pid} of the live tensor-parallel workers below this process."""
    children, found, todo = _children(), {}, [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                if WORKER_MODULE not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            found[int(env[b"PADDLE_TRAINER_ID"])] = pid
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


# HTTP --------------------------------------------------------------------------------------------------

def stream_events(server: TritonServer, sampling: dict) -> Iterator[dict]:
    payload = {"prompt_token_ids": PROMPT, "stream": True, "return_token_ids": True,
               "sampling_parameters": json.dumps(sampling)}
    url = f"{server.http_url}/v2/models/{server.model}/generate_stream"
    with httpx.stream("POST", url, json=payload, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line.removeprefix("data: "))


def output_token_ids(events: list[dict]) -> list[int]:
    """The streamed ids in order (a one-element tensor comes back as a JSON scalar)."""
    return [int(t) for e in events if "output_token_ids" in e for t in np.atleast_1d(e["output_token_ids"])]


# Tests (in order: the second one takes the model down) -------------------------------------------------

def test_tp2_row_streams_the_tp1_greedy_text(tp_server: TritonServer, tp_checkpoint: Path):
    assert sorted(worker_pids()) == [0, 1]
    events = list(stream_events(tp_server, GREEDY))
    assert all("error" not in e for e in events), events
    assert len(events) > 1  # streamed, one response per step
    text, token_ids = tp1_greedy(tp_checkpoint)
    assert output_token_ids(events) == token_ids
    assert "".join(e["text_output"] for e in events) == text
    assert len(set(token_ids)) > 3


def test_killed_worker_fails_the_request_and_unloads_the_model(tp_server: TritonServer):
    pids = worker_pids()
    events = stream_events(tp_server, LONG)
    first = next(events)
    assert "error" not in first, first
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    rest = list(events)
    assert time.monotonic() - killed < FAIL_WITHIN_S
    assert rest and "rank 1" in rest[-1].get("error", ""), rest[-1:]
    assert len(output_token_ids([first, *rest])) < LONG["max_tokens"]
    # The model leaves service: not ready, UNAVAILABLE in the index; its surviving worker is stopped.
    unavailable = lambda: triton_env.model_state(tp_server.http_url, ROW)[0] == "UNAVAILABLE"  # noqa: E731
    assert wait_for(unavailable, UNLOAD_WITHIN_S), triton_env.model_state(tp_server.http_url, ROW)
    ready = httpx.get(f"{tp_server.http_url}/v2/models/{ROW}/ready", timeout=10)
    assert ready.status_code == 400
    assert wait_for(lambda: not any(_alive(pid) for pid in pids.values()), 10)
    assert "the engine cannot serve any more" in tp_server.log_tail(400)
    url = f"{tp_server.http_url}/v2/models/{ROW}/generate"
    late = httpx.post(url, json={"prompt_token_ids": PROMPT}, timeout=10)
    assert late.status_code >= 400 and "error" in late.json()
