"""The CPU process setup in device.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BACKEND = Path(__file__).resolve().parent.parent / "backend"

# Allocates and frees 40 MiB activations the way a prefill step does; prints the page faults that cost.
ALLOCATE_AND_FREE = """
import resource, sys
sys.path.insert(0, {backend!r})
import paddle
from ernie_engine.device import keep_freed_memory
if {keep}:
    keep_freed_memory()
x = paddle.ones([1024, 1024])
w = paddle.ones([1024, 10240])
for _ in range(4):
    y = paddle.matmul(x, w); del y
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    y = paddle.matmul(x, w); del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(keep: bool) -> int:
    code = ALLOCATE_AND_FREE.format(backend=str(BACKEND), keep=keep)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=True)
    return int(done.stdout.split()[-1])


def test_freed_activations_are_reused_without_page_faults():
    # glibc maps each 40 MiB block afresh: 10 blocks of 10240 pages fault ~100k times. Kept memory is reused
    # (the heap may still grow by a block once while the others come and go).
    assert _page_faults(keep=False) > 90_000
    assert _page_faults(keep=True) < 25_000
