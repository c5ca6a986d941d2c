"""``GET /router/status``: the router's state as JSON. Upstream keys are never in it (only whether one is set), and
credentials in an api_base URL are masked."""

from __future__ import annotations

import re
import time
from typing import Any

from .strategy import estimate

REDACTED = "<redacted>"
_USERINFO = re.compile(r"^(\w+://)[^/@]*@")


def redact_url(url: str | None) -> str | None:
    """``https://user:pass@host/v1`` -> ``https://<redacted>@host/v1``."""
    return None if url is None else _USERINFO.sub(rf"\1{REDACTED}@", url)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def router_status(router: Any) -> dict:
    now, wall = time.monotonic(), time.time()
    s = router.settings
    deployments = []
    for d in router.deployments.values():
        spec = d.spec
        cooling = d.cooled_down(now)
        entry = {
            "id": d.id, "model_group": spec.group, "provider": spec.provider, "model": spec.model,
            "api_base": redact_url(spec.api_base), "api_key": REDACTED if spec.api_key else None,
            "healthy": not cooling,
            "cooldown_until": round(wall + d.cooldown_until - now, 3) if cooling else None,
            "cooldown_remaining_s": round(d.cooldown_until - now, 3) if cooling else 0.0,
            "retry_after_until": round(wall + d.not_before - now, 3) if d.not_before > now else None,
            "recent_failures": len(d.fail_times),
            "in_flight": d.in_flight,
            "latency_s": _round(d.latency), "ttft_s": _round(d.ttft),
            "latency_estimate_s": _round(estimate(d, stream=False)),
            "tokens_per_s": _round(d.tokens_per_s),
            "rpm": spec.rpm, "tpm": spec.tpm, "weight": spec.weight,
            "max_parallel_requests": spec.max_parallel_requests,
            "input_cost_per_token": spec.input_cost_per_token, "output_cost_per_token": spec.output_cost_per_token,
            "requests": d.requests, "successes": d.successes, "failures": d.failures, "cooldowns": d.cooldowns,
            "prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens, "cost": d.cost,
        }
        if spec.provider == "fastinfer":
            entry["engine"] = router.engines.state(spec)
        deployments.append(entry)
    return {
        "object": "router.status",
        "uptime_s": round(wall - router.started, 3),
        "config": router.config.path,
        "settings": {
            "routing_strategy": s.routing_strategy, "num_retries": s.num_retries, "allowed_fails": s.allowed_fails,
            "cooldown_time": s.cooldown_time, "timeout": s.timeout, "retry_after": s.retry_after,
            "max_fallbacks": s.max_fallbacks, "max_loaded_models": s.max_loaded_models,
        },
        "groups": {g: {"deployments": [d.id for d in ds], "fallbacks": list(s.fallbacks.get(g, ())),
                       "context_window_fallbacks": list(s.context_window_fallbacks.get(g, ()))}
                   for g, ds in router.groups.items()},
        "default_fallbacks": list(s.default_fallbacks),
        "loaded_models": router.engines.loaded(),
        "deployments": deployments,
        "totals": {**router.totals, "cost": sum(d.cost for d in router.deployments.values()),
                   "prompt_tokens": sum(d.prompt_tokens for d in router.deployments.values()),
                   "completion_tokens": sum(d.completion_tokens for d in router.deployments.values())},
    }
