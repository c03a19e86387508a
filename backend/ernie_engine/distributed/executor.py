"""The engine side of tensor parallelism: N worker processes behind ModelRunner's interface.

`LLMEngine` uses this instead of ModelRunner when tensor_parallel_size > 1; the scheduler does not know.
Each step's batch goes to every rank as a few flat arrays (messages.py); rank 0 answers with the argmax of
plain greedy rows and the logits of the others, which the engine samples with its own Sampler.

Workers are separate processes (`python -m ernie_engine.distributed.worker`) so that each gets its own
environment before Paddle starts: the PADDLE_* process-group variables (gloo on 127.0.0.1 on CPU), its
device (the i-th of `devices` / XPU_VISIBLE_DEVICES) and its share of the CPU threads. Control messages go
over socket pairs, never the network.

Failure: a worker that dies (or a reply that does not come in time) fails the step with `WorkerFailure`,
every remaining worker is killed, and `check_health()` raises from then on: the engine fails the requests
in flight and reports not ready. Nothing waits without a deadline; process exits are noticed at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from contextlib import closing, suppress
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EngineConfig, ModelConfig, device_ids
from ..device import default_device, device_type
from ..layers.quant.config import QuantConfig
from ..sampler import PromptScoring, SampledToken, Sampler
from ..scheduler import SchedulerOutput
from .messages import StepBatch, StepResult, describe_step
from .sharding import check_quantized, check_supported
from .worker import CONN_FD_ENV, SPEC_ENV

logger = logging.getLogger(__name__)

BACKEND_DIR = Path(__file__).resolve().parents[2]  # holds the ernie_engine package
STARTUP_TIMEOUT_S = 900.0  # joining the group and loading a shard of a large checkpoint
STEP_TIMEOUT_S = 300.0  # one step; dead workers are noticed within POLL_S, this only bounds a stuck one
CALL_TIMEOUT_S = 60.0  # KV sizing / allocation / stats
STOP_TIMEOUT_S = 5.0
POLL_S = 0.2


class WorkerFailure(RuntimeError):
    """A tensor-parallel worker died or stopped answering; the executor cannot serve any more."""


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def rank_devices(config: EngineConfig, world_size: int) -> tuple[str, list[str]]:
    """(device kind, each rank's device id): the first `world_size` of `devices` / XPU_VISIBLE_DEVICES."""
    kind = device_type(default_device())
    if kind == "cpu":
        return kind, ["cpu"] * world_size
    listed = config.devices or os.environ.get("XPU_VISIBLE_DEVICES", "")
    ids = device_ids(listed) or [str(i) for i in range(world_size)]
    if len(ids) < world_size:
        raise ValueError(f"tensor_parallel_size {world_size} needs {world_size} devices; devices lists {ids}")
    return kind, ids[:world_size]


def worker_env(
    rank: int, world_size: int, endpoints: list[str], kind: str, devices: list[str]
) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BACKEND_DIR), env.get("PYTHONPATH")]))
    env.update(
        PADDLE_TRAINER_ID=str(rank),
        PADDLE_TRAINERS_NUM=str(world_size),
        PADDLE_TRAINER_ENDPOINTS=",".join(endpoints),
        PADDLE_CURRENT_ENDPOINT=endpoints[rank],
    )
    if kind == "cpu":
        # gloo's pairs on loopback. (Paddle's TCPStore on rank 0 binds every interface: docs/ARCHITECTURE.md.)
        env.update(PADDLE_DISTRI_BACKEND="gloo", GLOO_SOCKET_IFNAME="lo")
        # Ranks share the host's cores: each gets its part of what the engine process would have used.
        total = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        threads = str(max(1, total // world_size))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    else:  # Paddle's XPU convention: the visible list, and this rank's index in it (BKCL is then its backend)
        env.update(XPU_VISIBLE_DEVICES=",".join(devices), FLAGS_selected_xpus=str(rank))
    return env


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _describe_exit(code: int) -> str:
    return f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


class TensorParallelExecutor:
    """ModelRunner's interface (model_config, vocab_limit, num_kv_blocks, allocate_kv_cache, execute)."""

    def __init__(self, config: EngineConfig, model_dir: Path, vocab_limit: int | None = None) -> None:
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.model_config = ModelConfig.from_dir(model_dir)
        check_supported(self.model_config, self.world_size)
        # Bad quantization / kv_cache_dtype names fail here as on one device, not once per spawned rank.
        check_quantized(self.model_config, self.world_size, QuantConfig.of_engine(config, self.model_config))
        vocab = self.model_config.vocab_size
        self.vocab_limit = min(vocab, vocab_limit) if vocab_limit else vocab
        self.block_size = config.block_size
        self.sampler = Sampler(config.logprobs_mode)
        self._failure: str | None = None
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _kill, self._procs)  # also when the executor is dropped
        started = time.monotonic()
        self._spawn(model_dir)
        info = self._collect(STARTUP_TIMEOUT_S, "start")
        self.resident_bytes: list[int] = [item["resident_bytes"] for item in info]  # weights, per rank
        self.vision_token_ids: list[int] | None = info[0]["vision_token_ids"]  # ERNIE-4.5-VL's MoE mask
        logger.info("tensor parallel: %d workers ready in %.1f s (weights per rank: %s MiB)", self.world_size,
                    time.monotonic() - started, ", ".join(f"{b / 2**20:.1f}" for b in self.resident_bytes))

    def _spawn(self, model_dir: Path) -> None:
        kind, devices = rank_devices(self.config, self.world_size)
        endpoints = [f"127.0.0.1:{port}" for port in free_ports(self.world_size)]
        engine_config = dataclasses.asdict(self.config)
        for rank in range(self.world_size):
            spec = {
                "rank": rank, "world_size": self.world_size, "model_dir": str(model_dir),
                "engine_config": engine_config, "vocab_limit": self.vocab_limit,
                "device": "cpu" if kind == "cpu" else f"{kind}:{rank}",
                "log_level": logging.getLogger("ernie_engine").getEffectiveLevel(),
            }
            ours, theirs = Pipe(duplex=True)
            env = worker_env(rank, self.world_size, endpoints, kind, devices)
            env.update({SPEC_ENV: json.dumps(spec), CONN_FD_ENV: str(theirs.fileno())})
            with closing(theirs):
                proc = subprocess.Popen([sys.executable, "-m", "ernie_engine.distributed.worker"], env=env,
                                        pass_fds=[theirs.fileno()])
            self._procs.append(proc)
            self._conns.append(ours)
            logger.info("tensor parallel: rank %d is pid %d on %s", rank, proc.pid, devices[rank])

    # Calls ------------------------------------------------------------------------------------------

    def _fail(self, reason: str) -> WorkerFailure:
        """Mark the executor failed and kill every worker (a partial group cannot run another step).

        May run on a health-checking thread while the step thread waits on the pipes: those then see EOF.
        """
        if self._failure is None:
            self._failure = reason
            logger.error("tensor parallel executor failed: %s; stopping all workers", reason)
            _kill(self._procs)
        return WorkerFailure(self._failure)

    def _lost(self, rank: int) -> WorkerFailure:
        """Rank `rank`'s pipe broke: usually it is exiting; let it finish so the failure names the cause."""
        with suppress(subprocess.TimeoutExpired):
            self._procs[rank].wait(timeout=1.0)
        return self._fail(self._dead_worker() or f"tensor-parallel worker rank {rank} closed its connection")

    def _dead_worker(self) -> str | None:
        for rank, proc in enumerate(self._procs):
            code = proc.poll()
            if code is not None:
                return f"tensor-parallel worker rank {rank} (pid {proc.pid}) {_describe_exit(code)}"
        return None

    def _collect(self, timeout: float, what: str) -> list[Any]:
        """Every rank's reply to the last command, in rank order; raises if any rank failed."""
        deadline = time.monotonic() + timeout
        replies: dict[int, tuple[str, Any]] = {}
        pending = dict(enumerate(self._conns))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"no reply to {what} from rank(s) {sorted(pending)} within {timeout:.0f} s")
            for conn in wait(list(pending.values()), timeout=min(POLL_S, remaining)):
                rank = self._conns.index(conn)
                try:
                    replies[rank] = conn.recv()
                except (EOFError, OSError):
                    raise self._lost(rank) from None
                del pending[rank]
            if pending and (dead := self._dead_worker()):
                raise self._fail(dead)
        errors = [payload for status, payload in replies.values() if status != "ok"]
        # Only the same error on every rank leaves the group in step (each stopped at the same point), and
        # the engine may go on. Ranks that went on past a failed one wait in a collective until gloo gives
        # up (30 s), and their error differs: the group is then broken.
        same = len({error.split(": ", 1)[-1] for error in errors}) == 1  # "rank N: " differs
        if errors and (len(errors) < self.world_size or what == "start" or not same):
            raise self._fail("; ".join(errors))
        if errors:
            raise RuntimeError(errors[0])
        return [replies[rank][1] for rank in range(self.world_size)]

    def _call(self, command: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> list[Any]:
        self.check_health()
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((command, args))
            except OSError:
                raise self._lost(rank) from None
        return self._collect(timeout, command)

    # ModelRunner's interface ------------------------------------------------------------------------

    def num_kv_blocks(self, max_model_len: int) -> int:
        return min(self._call("num_kv_blocks", max_model_len))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._call("allocate_kv_cache", num_blocks)

    def execute(self, out: SchedulerOutput) -> list[SampledToken]:
        """Run the scheduled tokens on every rank; one sampled token per `out.sampling` sequence, in order."""
        seqs = list(out.scheduled)
        scoring = PromptScoring.of_step(seqs, [out.scheduled[seq] for seq in seqs])
        batch = describe_step(out, self.vision_token_ids, scoring)
        result = self.run(batch)
        if scoring is not None:
            scoring.deliver(result.prompt_logprobs)
        tokens: list[SampledToken | None] = [None] * len(out.sampling)
        for i, token_id in zip(np.flatnonzero(batch.greedy), result.token_ids, strict=True):
            tokens[i] = SampledToken(int(token_id))
        others = np.flatnonzero(~batch.greedy)
        if others.size:
            sampled = self.sampler(result.logits, [out.sampling[i] for i in others])
            for i, token in zip(others, sampled, strict=True):
                tokens[i] = token
        return tokens

    def run(self, batch: StepBatch) -> StepResult:
        """One forward step on every rank; rank 0's argmax / logits of the batch's sampling rows."""
        return self._call("step", batch, timeout=STEP_TIMEOUT_S)[0]

    # Health -----------------------------------------------------------------------------------------

    def check_health(self) -> None:
        """Raise WorkerFailure naming the cause once a worker has died or the group broke."""
        if self._failure is None and (dead := self._dead_worker()):
            self._fail(dead)
        if self._failure is not None:
            raise WorkerFailure(self._failure)

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def shutdown(self) -> None:
        """Stop the workers (politely, then by force); idempotent."""
        if self._failure is None:
            for conn in self._conns:
                with suppress(OSError):
                    conn.send(("stop", ()))
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in self._procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("tensor-parallel worker pid %d did not stop; killing it", proc.pid)
            self._failure = "the executor was shut down"
        self._finalizer()  # kills what is left, once
        for conn in self._conns:
            conn.close()
