"""The routing strategies (LiteLLM's names) and OpenRouter's per-request ``provider.sort``: each orders a group's
available deployments, best first. The router tries them in that order."""

from __future__ import annotations

import math
import random

from .deployment import Deployment

EXPLORE = 0.05  # latency-based routing sends this share to another deployment, so a recovered one is noticed


def estimate(d: Deployment, stream: bool) -> float | None:
    """The deployment's recent speed for this kind of request: time to first token for a stream, the whole
    answer's time otherwise (the other measure when this one has no sample yet)."""
    first, second = (d.ttft, d.latency) if stream else (d.latency, d.ttft)
    return first if first is not None else second


def _shuffled(ds: list[Deployment], rng: random.Random) -> list[Deployment]:
    out = list(ds)
    rng.shuffle(out)
    return out


def _weighted_order(ds: list[Deployment], rng: random.Random) -> list[Deployment]:
    """A weighted random order (sampling without replacement): by ``weight`` when any deployment sets one, else by
    ``rpm``, else by ``tpm``, else uniform, as LiteLLM's simple-shuffle."""
    if any(d.spec.weight != 1.0 for d in ds):
        weights = [d.spec.weight for d in ds]
    elif all(d.spec.rpm for d in ds):
        weights = [float(d.spec.rpm) for d in ds]
    elif all(d.spec.tpm for d in ds):
        weights = [float(d.spec.tpm) for d in ds]
    else:
        return _shuffled(ds, rng)
    keys = [math.log(rng.random() or 1e-300) / w for w in weights]  # Efraimidis-Spirakis keys
    return [d for _, d in sorted(zip(keys, ds), key=lambda kd: kd[0], reverse=True)]


def rank(strategy: str, ds: list[Deployment], *, stream: bool, now: float, tokens: int,
         rng: random.Random) -> list[Deployment]:
    """``ds`` (available deployments of one group) best first by ``strategy``; usage-based routing leaves out the
    ones at their rpm/tpm limit this minute (so the result may be empty)."""
    if len(ds) <= 1 and strategy != "usage-based-routing":
        return list(ds)
    if strategy == "simple-shuffle":
        return _weighted_order(ds, rng)
    if strategy == "least-busy":
        return sorted(_shuffled(ds, rng), key=lambda d: d.in_flight)
    if strategy == "cost-based-routing":
        return sorted(_shuffled(ds, rng), key=lambda d: (d.price, d.in_flight))
    if strategy == "usage-based-routing":
        room = [d for d in ds if d.under_limits(now, tokens)]
        return sorted(_shuffled(room, rng), key=lambda d: d.usage_fraction(now))
    if strategy == "latency-based-routing":
        untried = [d for d in ds if estimate(d, stream) is None]
        if untried:  # measure every deployment once before trusting the numbers
            rest = [d for d in ds if estimate(d, stream) is not None]
            return _shuffled(untried, rng) + sorted(rest, key=lambda d: estimate(d, stream))
        order = sorted(_shuffled(ds, rng), key=lambda d: estimate(d, stream))
        if rng.random() < EXPLORE:
            i = rng.randrange(1, len(order))
            order.insert(0, order.pop(i))
        return order
    raise ValueError(f"unknown routing strategy {strategy!r}")


def sort_by(key: str, ds: list[Deployment], *, stream: bool) -> list[Deployment]:
    """OpenRouter's ``provider.sort``: "price" (cheapest first), "latency" (fastest recent first), "throughput"
    (most tokens/s first); deployments without a measurement go last, in config order."""
    if key == "price":
        return sorted(ds, key=lambda d: d.price)
    if key == "latency":
        return sorted(ds, key=lambda d: (estimate(d, stream) is None, estimate(d, stream) or 0.0))
    if key == "throughput":
        return sorted(ds, key=lambda d: (d.tokens_per_s is None, -(d.tokens_per_s or 0.0)))
    raise ValueError(f"unknown provider.sort {key!r}")
