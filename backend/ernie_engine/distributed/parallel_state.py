"""The tensor-parallel process group of a worker, and the collectives the sharded layers use.

The group is all ranks (one TP group per engine). Until `init_process_group` runs, the world is one rank
and every collective is the identity, so sharded layers also run in a plain single process.

Backends: gloo on CPU (PADDLE_DISTRI_BACKEND=gloo), BKCL on XPU (Paddle picks it from FLAGS_selected_xpus);
the launcher (executor.py) sets the PADDLE_* variables `paddle.distributed.init_parallel_env` reads.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import paddle
import paddle.distributed as dist
from paddle.base import core

logger = logging.getLogger(__name__)

STORE_TIMEOUT_S = 60.0
MEET_TIMEOUT_S = 900.0  # as the executor's start-up deadline
_world_size = 1


def init_process_group(rank: int, world_size: int) -> None:
    """Join the group described by the PADDLE_* environment (rank and size are checked against it)."""
    global _world_size
    started = time.monotonic()
    if rank > 0:
        _wait_for_store(os.environ["PADDLE_TRAINER_ENDPOINTS"].split(",")[0], STORE_TIMEOUT_S)
    dist.init_parallel_env()
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(
            f"process group says rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"expected {rank} of {world_size}"
        )
    _world_size = world_size
    logger.info("rank %d of %d joined the process group in %.1f s", rank, world_size,
                time.monotonic() - started)


def _wait_for_store(endpoint: str, timeout: float) -> None:
    """Wait until rank 0's TCP store listens: Paddle's own client sleeps 3 s after a refused connection."""
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    # Not up yet: init_parallel_env keeps retrying on its own.


def meet(tag: str, timeout: float = MEET_TIMEOUT_S) -> None:
    """Wait until every rank has reached `tag` (once per group), through the rendezvous store.

    gloo's collectives give up after 30 s: ranks that may drift further apart (loading their shards at
    different speeds) meet here before their first collective.
    """
    if _world_size == 1:
        return
    store = core.create_or_get_global_tcp_store()
    store.add(tag, 1)
    deadline = time.monotonic() + timeout
    while store.add(tag, 0) < _world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other ranks did not reach {tag!r} within {timeout:.0f} s")
        time.sleep(0.05)


def world_size() -> int:
    """Ranks in the group (1 until `init_process_group`)."""
    return _world_size


def all_reduce(x: paddle.Tensor) -> paddle.Tensor:
    """Sum over ranks, in place; returns `x`."""
    if _world_size > 1:
        dist.all_reduce(x)
    return x


def all_reduce_max(x: paddle.Tensor) -> paddle.Tensor:
    """Element-wise maximum over ranks, in place; returns `x`."""
    if _world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_last_axis(x: paddle.Tensor) -> paddle.Tensor:
    """Every rank's `x` [..., n] concatenated along the last axis in rank order ([..., world * n])."""
    if _world_size == 1:
        return x
    parts: list[paddle.Tensor] = []
    dist.all_gather(parts, x)
    return paddle.concat(parts, axis=-1)
