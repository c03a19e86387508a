"""A tensor-parallel rank's process: `python -m ernie_engine.distributed.worker`, started by executor.py.

The executor passes one end of a socket pair (fd `ERNIE_TP_CONN_FD`) and a JSON spec (`ERNIE_TP_SPEC`);
the PADDLE_* variables for the process group, the device and thread counts are already in the environment.
Protocol: the worker answers ("ok", info) once loaded (or ("error", text)), then every (command, args)
with ("ok", result) or ("error", text). It exits on "stop" or when the engine's end of the pipe closes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..config import EngineConfig
from ..device import set_device
from ..loader import model_config
from . import parallel_state
from .shard_runner import ShardRunner, resident_bytes
from .sharding import ShardPlan

SPEC_ENV = "ERNIE_TP_SPEC"
CONN_FD_ENV = "ERNIE_TP_CONN_FD"

logger = logging.getLogger("ernie_engine.distributed.worker")


def _start(spec: dict[str, Any]) -> ShardRunner:
    """Join the group and load this rank's shard."""
    rank, world_size, model_dir = spec["rank"], spec["world_size"], Path(spec["model_dir"])
    set_device(spec["device"])
    parallel_state.init_process_group(rank, world_size)
    plan = ShardPlan(model_config(model_dir), rank, world_size)
    return ShardRunner(EngineConfig(**spec["engine_config"]), model_dir, plan, spec["vocab_limit"])


def serve(conn: Connection, handlers: dict[str, Callable[..., Any]], rank: int) -> None:
    while True:
        try:
            command, args = conn.recv()
        except (EOFError, OSError):
            logger.info("rank %d: the engine closed the connection", rank)
            return
        if command == "stop":
            conn.send(("ok", None))
            return
        try:
            reply = ("ok", handlers[command](*args))
        except Exception as err:  # reported to the engine, which decides whether the group is still usable
            logger.exception("rank %d: %s failed", rank, command)
            reply = ("error", f"rank {rank}: {command} failed: {err!r}")
        try:
            conn.send(reply)
        except OSError:
            return


def main() -> int:
    spec = json.loads(os.environ[SPEC_ENV])
    rank = spec["rank"]
    logging.basicConfig(
        level=spec["log_level"],
        format=f"%(asctime)s tp-rank{rank} %(name)s %(levelname)s: %(message)s",
        force=True,  # Paddle installs its own root handler at import
    )
    conn = Connection(int(os.environ[CONN_FD_ENV]))
    try:
        runner = _start(spec)
    except Exception as err:
        logger.exception("rank %d failed to start", rank)
        conn.send(("error", f"rank {rank} failed to start: {err!r}"))
        return 1
    info = {"resident_bytes": resident_bytes(runner.model), "vision_token_ids": runner.vision_token_ids}
    conn.send(("ok", info))
    handlers = {
        "step": runner.run,
        "num_kv_blocks": runner.num_kv_blocks,
        "allocate_kv_cache": runner.allocate_kv_cache,
    }
    serve(conn, handlers, rank)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
