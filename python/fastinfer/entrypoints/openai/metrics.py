"""The server's Prometheus metrics (vLLM's names, prefix ``fastinfer:``) in one per-app CollectorRegistry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """Values read from the engine at scrape time: queue sizes, KV-cache use, prefix-cache counters."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name}

    def collect(self):
        e = self.engine
        if e is None:  # still loading
            return
        for name, doc, value in (
            ("fastinfer:num_requests_running", "Requests in the running batch.", e.num_running),
            ("fastinfer:num_requests_waiting", "Requests waiting to be scheduled.", e.num_waiting),
            ("fastinfer:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", e.kv_cache_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=list(self.labels))
            g.add_metric(list(self.labels.values()), value)
            yield g
        stats = e.prefix_cache_stats
        for name, doc, value in (
            ("fastinfer:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.queries),
            ("fastinfer:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.hits),
        ):
            c = CounterMetricFamily(name, doc, labels=list(self.labels))
            c.add_metric(list(self.labels.values()), value)
            yield c


class ServerMetrics:
    """Counters and histograms the request handlers update, plus the engine's own numbers, in ``registry``."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("fastinfer:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("fastinfer:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter("fastinfer:request_success", "Requests finished, by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("fastinfer:time_to_first_token_seconds", "Arrival to first output token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fastinfer:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("fastinfer:e2e_request_latency_seconds", "Arrival to last output token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._engine = _EngineCollector(None, model_name)
        r.register(self._engine)

    def attach_engine(self, engine: Any) -> None:
        """Report the engine's gauges and prefix-cache counters from now on (once the model has loaded)."""
        self._engine.engine = engine

    def request_done(self, prompt_tokens: int, generation_tokens: int, finished_reason: str) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generation_tokens)
        self.request_success.labels(m, finished_reason).inc()
