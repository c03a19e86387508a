"""Prometheus metrics of the frontend itself (Triton's and the engine's live on Triton's metrics port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class FrontendMetrics:
    """One registry per app, so several apps (tests) never clash."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("openai_frontend_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("openai_frontend_errors", "Failed requests and streams by endpoint and kind",
                              ["endpoint", "kind"], registry=self.registry)
        self.latency = Histogram("openai_frontend_request_duration_seconds",
                                 "Time until the whole response (stream included) was sent",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("openai_frontend_time_to_first_token_seconds",
                              "Time from request arrival to the first generated token of a stream",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("openai_frontend_requests_in_flight", "Generation requests being served",
                               registry=self.registry)
        self.prompt_tokens = Counter("openai_frontend_prompt_tokens", "Prompt tokens processed",
                                     ["endpoint"], registry=self.registry)
        self.completion_tokens = Counter("openai_frontend_completion_tokens", "Tokens generated",
                                         ["endpoint"], registry=self.registry)
