"""The router's Prometheus metrics, per model group and deployment (prefix ``fastinfer:router_``), in the registry it
shares with the local engines' ``fastinfer:`` metrics."""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            600.0)
_D = ["model_group", "deployment"]


class _DeploymentGauges:
    """In flight and health of every deployment, read at scrape time."""

    def __init__(self, deployments: Callable[[], list[Any]]) -> None:
        self.deployments = deployments

    def collect(self):
        now = time.monotonic()
        in_flight = GaugeMetricFamily("fastinfer:router_in_flight", "Attempts running now.", labels=_D)
        healthy = GaugeMetricFamily("fastinfer:router_deployment_healthy",
                                    "1 when the deployment takes traffic, 0 while it is cooled down.", labels=_D)
        latency = GaugeMetricFamily("fastinfer:router_latency_estimate_seconds",
                                    "Recent answer time the latency-based strategy uses.", labels=_D)
        for d in self.deployments():
            labels = [d.spec.group, d.id]
            in_flight.add_metric(labels, d.in_flight)
            healthy.add_metric(labels, 0 if d.cooled_down(now) else 1)
            if d.latency is not None:
                latency.add_metric(labels, d.latency)
        yield from (in_flight, healthy, latency)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, deployments: Callable[[], list[Any]]) -> None:
        r = registry
        self.responses = Counter("fastinfer:router_responses", "Client requests answered, by the group that "
                                 "answered (or was asked first) and HTTP status.", ["model_group", "status"],
                                 registry=r)
        self.attempts = Counter("fastinfer:router_requests", "Attempts at deployments, by outcome: an HTTP status, "
                                "timeout, connection_error or stream_error.", _D + ["status"], registry=r)
        self.retries = Counter("fastinfer:router_retries", "Attempts after the first within a group.", _D,
                               registry=r)
        self.fallbacks = Counter("fastinfer:router_fallbacks", "Moves from one group to the next.",
                                 ["model_group", "fallback_group", "reason"], registry=r)
        self.cooldowns = Counter("fastinfer:router_cooldowns", "Times a deployment was cooled down.", _D,
                                 registry=r)
        self.latency = Histogram("fastinfer:router_request_latency_seconds", "Successful attempt, start to the "
                                 "last byte.", _D, buckets=_BUCKETS, registry=r)
        self.ttft = Histogram("fastinfer:router_time_to_first_token_seconds", "Streamed attempt, start to the "
                              "first event.", _D, buckets=_BUCKETS, registry=r)
        self.prompt_tokens = Counter("fastinfer:router_prompt_tokens", "Prompt tokens the deployments reported.",
                                     _D, registry=r)
        self.completion_tokens = Counter("fastinfer:router_completion_tokens", "Completion tokens the "
                                         "deployments reported.", _D, registry=r)
        self.cost = Counter("fastinfer:router_cost_dollars", "Cost of the answered requests, from model_info "
                            "prices.", _D, registry=r)
        r.register(_DeploymentGauges(deployments))

    def attempt(self, group: str, deployment: str, outcome: str) -> None:
        self.attempts.labels(group, deployment, outcome).inc()

    def success(self, group: str, deployment: str, seconds: float, prompt: int, completion: int,
                cost: float) -> None:
        self.latency.labels(group, deployment).observe(seconds)
        self.prompt_tokens.labels(group, deployment).inc(prompt)
        self.completion_tokens.labels(group, deployment).inc(completion)
        self.cost.labels(group, deployment).inc(cost)
