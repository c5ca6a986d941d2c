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
    """Values read from the engines at scrape time: queue sizes, KV-cache use, prefix-cache counters (one sample
    per loaded model; none while a model loads)."""

    def __init__(self) -> None:
        self.engines: dict[str, Any] = {}  # model name -> LLMEngine

    def collect(self):
        engines = list(self.engines.items())
        families = []
        for name, doc in (
            ("fastinfer:num_requests_running", "Requests in the running batch."),
            ("fastinfer:num_requests_waiting", "Requests waiting to be scheduled."),
            ("fastinfer:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."),
        ):
            families.append(GaugeMetricFamily(name, doc, labels=["model_name"]))
        for name, doc in (
            ("fastinfer:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            ("fastinfer:prefix_cache_hits", "Prompt tokens found in the prefix cache."),
        ):
            families.append(CounterMetricFamily(name, doc, labels=["model_name"]))
        if not engines:
            return
        for model, e in engines:
            stats = e.prefix_cache_stats
            values = (e.num_running, e.num_waiting, e.kv_cache_usage, stats.queries, stats.hits)
            for family, value in zip(families, values):
                family.add_metric([model], value)
        yield from families


class ServerMetrics:
    """Counters and histograms the request handlers update, plus the engines' own numbers, in ``registry`` (a new
    one unless given: the router shares its registry with the local engines it serves)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
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
        self._engines = _EngineCollector()
        r.register(self._engines)

    def attach_engine(self, model_name: str, engine: Any) -> None:
        """Report the engine's gauges and prefix-cache counters from now on (once the model has loaded)."""
        self._engines.engines[model_name] = engine

    def detach_engine(self, model_name: str) -> None:
        """Stop reporting an engine (it was unloaded) and drop the reference to it."""
        self._engines.engines.pop(model_name, None)

    def request_done(self, model_name: str, prompt_tokens: int, generation_tokens: int, finished_reason: str) -> None:
        m = model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generation_tokens)
        self.request_success.labels(m, finished_reason).inc()
