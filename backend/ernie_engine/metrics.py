"""Engine metrics: gauges, counters and fixed-bucket histograms, as a thread-safe snapshot dict.

Names follow FastDeploy's (`fastdeploy:` prefix dropped); the Triton adapter exports them. Nothing here
imports Triton or prometheus.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

# vLLM's buckets per histogram (FastDeploy's request latency ones are the same): each spans its quantity's
# range, e.g. e2e latency up to the longest generations (minutes on CPU): quantiles stop at the last bound.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = TTFT_BUCKETS  # upper bounds; one more bucket for +Inf
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """Prometheus style: cumulative counts per upper bound (the last is +Inf)."""
        cumulative, running = [], 0
        for c in self.counts:
            running += c
            cumulative.append(running)
        return {"buckets": list(self.buckets), "cumulative_counts": cumulative, "sum": self.sum,
                "count": self.count}


GAUGES = ("num_requests_running", "num_requests_waiting", "gpu_cache_usage_perc", "num_kv_blocks_total",
          "num_kv_blocks_used", "num_kv_blocks_free")
COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "request_preempted_total",
            "prefix_cache_token_num", "request_success_total", "request_failure_total", "request_abort_total",
            "num_steps_total")
HISTOGRAM_BUCKETS = {
    "time_to_first_token_seconds": TTFT_BUCKETS,
    "time_per_output_token_seconds": TPOT_BUCKETS,
    "e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
    "request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
}
HISTOGRAMS = tuple(HISTOGRAM_BUCKETS)


class EngineMetrics:
    """Updated by the step thread, read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(GAUGES + COUNTERS, 0)
        self._histograms = {name: Histogram(buckets) for name, buckets in HISTOGRAM_BUCKETS.items()}

    def set(self, **gauges: float) -> None:
        with self._lock:
            self._values.update(gauges)

    def inc(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            snap: dict[str, Any] = dict(self._values)
            snap.update({name: h.snapshot() for name, h in self._histograms.items()})
        return snap
