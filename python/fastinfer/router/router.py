"""The router: one completion request, many deployments. The core rule, once:

A request names groups to try (``model``, then ``models``). Within a group, each attempt goes to the best available
deployment by the strategy (another one than before when there is one); connection errors, timeouts, 408, 429 and
5xx are retried up to ``num_retries`` times, honouring Retry-After. A group that is exhausted (or has nothing
available) hands over to its ``fallbacks`` (context-length errors: to its ``context_window_fallbacks``). Client
errors are returned at once. A deployment with ``allowed_fails`` failures within a minute is cooled down for
``cooldown_time`` and gets nothing until then. A stream is committed at its first event: after that nothing is
retried and a broken upstream ends the client's stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from fastinfer.entrypoints.openai.metrics import ServerMetrics

from .backend import Backend, UpstreamError, error_body
from .config import RouterConfig
from .deployment import Deployment
from .local import LocalBackend, LocalEngines
from .metrics import RouterMetrics
from .request import RouteRequest, bad_request, parse_route
from .status import router_status
from .strategy import rank, sort_by
from .upstream import RemoteBackend, make_client

log = logging.getLogger("fastinfer.router")
MAX_RETRY_AFTER_WAIT = 60.0  # longest Retry-After the router waits out; a longer one moves on to fallbacks
_OUTCOMES = {"timeout": "timeout", "connection": "connection_error", "stream": "stream_error"}


def _default_llm_factory(model: str | None, **kwargs: Any) -> Any:
    from fastinfer.entrypoints.llm import LLM

    return LLM(model, **kwargs)


@dataclass(slots=True)
class Answer:
    """A non-streaming response and where it came from."""

    body: dict  # the deployment's response body, its "model" the group that answered
    group: str  # the group that answered
    deployment: str  # the deployment's id
    attempts: int  # attempts made, this one included


@dataclass(slots=True)
class _Attempt:
    """Where the current attempt of a request goes (the error path reads it for its headers)."""

    count: int = 0
    deployment: str | None = None


class Router:
    """All groups and deployments of one config; use from one event loop. ``llm_factory(model, **engine_args)``
    builds local engines (the LLM class unless given)."""

    def __init__(self, config: RouterConfig, *, llm_factory: Callable[..., Any] | None = None,
                 registry: CollectorRegistry | None = None, seed: int | None = None,
                 user_agent: str = "fastinfer-router") -> None:
        self.config = config
        self.settings = config.settings
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.engine_metrics = ServerMetrics(self.registry)
        self.engines = LocalEngines(llm_factory or _default_llm_factory, self.engine_metrics,
                                    self.settings.max_loaded_models)
        self.http = make_client()
        self.deployments: dict[str, Deployment] = {}
        self.groups: dict[str, list[Deployment]] = {g: [] for g in config.groups}
        for spec in config.deployments:
            backend: Backend = (LocalBackend(spec, self.engines) if spec.provider == "fastinfer"
                                else RemoteBackend(spec, self.http, user_agent))
            d = Deployment(spec, backend)
            self.deployments[spec.id] = d
            self.groups[spec.group].append(d)
        self.group_names = set(self.groups)
        self._count_tokens = self.settings.routing_strategy == "usage-based-routing"
        self._no_stream_options: set[str] = set()  # deployments that refused stream_options.include_usage
        self.metrics = RouterMetrics(self.registry, lambda: list(self.deployments.values()))
        self.rng = random.Random(seed)
        self.started = time.time()
        self.totals = {"requests": 0, "succeeded": 0, "failed": 0, "retries": 0, "fallbacks": 0}

    async def preload(self) -> None:
        """Load every local engine now (up to max_loaded_models of them)."""
        await self.engines.preload([d.spec for d in self.deployments.values() if d.spec.provider == "fastinfer"])

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.engines.close()

    def status(self) -> dict:
        """GET /router/status: settings, groups, deployments (keys redacted), totals."""
        return router_status(self)

    # -- requests --------------------------------------------------------------------------------

    async def complete(self, body: dict, chat: bool) -> Answer:
        """Answer a non-streaming completion body; raises UpstreamError (with ``attempts`` and ``deployment``
        attributes) when no deployment could."""
        req = parse_route(body, self.group_names, self._count_tokens)
        if req.stream:
            raise bad_request("this call does not stream; use open_stream", "stream")

        async def call(d: Deployment, group: str) -> dict:
            timeout = d.spec.timeout or self.settings.timeout
            t0 = self._start(d)
            try:
                data = await d.backend.complete(self._body_for(d, req), chat, timeout)
            except UpstreamError as err:
                self._failed(d, group, err)
                raise
            finally:
                d.finished()
            self._succeeded(d, group, time.perf_counter() - t0, None, data.get("usage"))
            data["model"] = group
            return data

        (data, d, group), attempt = await self._route(req, call)
        self._answered(group, "200")
        return Answer(data, group, d.id, attempt.count)

    async def open_stream(self, body: dict, chat: bool) -> "RelayedStream":
        """Start a streaming completion: every attempt up to the first upstream event is retried and falls back
        as a non-streaming one; the returned stream relays the rest as it arrives."""
        req = parse_route(body, self.group_names, self._count_tokens)

        async def call(d: Deployment, group: str) -> tuple:
            """(the first event, the rest of the stream, start time, time to the first event)."""
            fwd = self._body_for(d, req)
            fwd["stream"] = True
            asked = not req.include_usage and d.id not in self._no_stream_options
            if asked:  # the usage chunk, for the accounting; not relayed to a client that did not ask
                options = fwd.get("stream_options") if isinstance(fwd.get("stream_options"), dict) else {}
                fwd["stream_options"] = {**options, "include_usage": True}
            timeout = d.spec.stream_timeout or d.spec.timeout or self.settings.timeout
            t0 = self._start(d)
            events = d.backend.stream(fwd, chat, timeout)
            try:
                try:
                    first = await anext(events)  # the first batch of events
                except UpstreamError as err:
                    if not (asked and err.status in (400, 422) and "stream_options" in err.message):
                        raise
                    # A server that refuses stream_options: stream without it from now on (no token counts).
                    self._no_stream_options.add(d.id)
                    log.warning("deployment %s refuses stream_options; its streams are relayed without token "
                                "or cost accounting", d.id)
                    await events.aclose()
                    fwd.pop("stream_options", None)
                    events = d.backend.stream(fwd, chat, timeout)
                    first = await anext(events)
            except StopAsyncIteration:
                err = UpstreamError(502, error_body(f"deployment {d.id}: the stream ended before any event",
                                                    "upstream_error", "upstream_stream_broken"), kind="stream")
                self._failed(d, group, err)
                d.finished()
                raise err from None
            except UpstreamError as err:
                self._failed(d, group, err)
                d.finished()
                await events.aclose()
                raise
            except BaseException:
                d.finished()
                await events.aclose()
                raise
            ttft = time.perf_counter() - t0
            self.metrics.ttft.labels(group, d.id).observe(ttft)
            return first, events, t0, ttft

        ((first, events, t0, ttft), d, group), attempt = await self._route(req, call)
        return RelayedStream(self, req, d, group, attempt.count, first, events, t0, ttft)

    # -- the routing loop ------------------------------------------------------------------------

    async def _route(self, req: RouteRequest, call: Callable[[Deployment, str], Awaitable[Any]]) -> tuple:
        """Run ``call`` on deployments until one succeeds, by the rule in this module's docstring; returns
        (call's result plus its deployment and group, the attempt record). The caller counts the answer
        (_answered), a stream once it has ended."""
        self.totals["requests"] += 1
        attempt = _Attempt()
        queue = list(req.groups)
        tried: list[str] = []
        last: UpstreamError | None = None
        previous, reason = None, ""
        try:
            while queue:
                group = queue.pop(0)
                if group in tried:
                    continue
                if previous is not None:
                    if len(tried) - 1 >= self.settings.max_fallbacks:
                        break
                    self.totals["fallbacks"] += 1
                    self.metrics.fallbacks.labels(previous, group, reason).inc()
                    log.info("falling back from %s to %s (%s)", previous, group, reason)
                tried.append(group)
                fallbacks = self.settings.fallbacks.get(group) or self.settings.default_fallbacks
                # Waiting out a Retry-After is for a request with nowhere else to go.
                may_wait = not queue and not (req.allow_fallbacks and fallbacks)
                try:
                    return await self._try_group(group, req, call, attempt, may_wait), attempt
                except UpstreamError as err:
                    # The router's own "nothing to try here" never hides what a deployment answered.
                    if last is None or err.kind != "unavailable" or last.kind == "unavailable":
                        last = err
                    current = err
                if not current.retryable and not current.context_window:
                    break  # a client error: returned as it is, once
                if current.context_window:
                    reason = "context_window"
                    queue = list(self.settings.context_window_fallbacks.get(group, ())) + queue
                else:
                    reason = "error"
                    if req.allow_fallbacks:
                        queue += [g for g in fallbacks if g not in queue]
                previous = group
        except BaseException:
            self.totals["failed"] += 1
            raise
        err = last if last is not None else UpstreamError(
            503, error_body("no model group could be tried", "service_unavailable"), kind="unavailable")
        err.attempts, err.deployment = attempt.count, attempt.deployment
        self._answered(tried[-1] if tried else req.groups[0], str(err.status))
        raise err

    def _answered(self, group: str, status: str) -> None:
        """Count one client request's outcome: "200", an error status, or "stream_error" (a stream that broke
        after its first event)."""
        self.totals["succeeded" if status == "200" else "failed"] += 1
        self.metrics.responses.labels(group, status).inc()

    async def _try_group(self, group: str, req: RouteRequest, call: Callable, attempt: _Attempt,
                         may_wait: bool) -> tuple:
        ds = [d for d in self.groups[group] if req.allows(d)]
        if not ds:
            raise UpstreamError(404, error_body(f"no deployment of model group '{group}' matches the request's "
                                                "provider preferences", "invalid_request_error",
                                                "no_matching_deployment", "provider"), kind="unavailable")
        tried: set[str] = set()
        last: UpstreamError | None = None
        for n in range(1 + self.settings.num_retries):
            d = await self._pick(ds, req, tried, may_wait)
            if d is None:
                break
            if n > 0:
                self.totals["retries"] += 1
                self.metrics.retries.labels(group, d.id).inc()
                if self.settings.retry_after > 0:
                    await asyncio.sleep(self.settings.retry_after)
            attempt.count += 1
            attempt.deployment = d.id
            try:
                return await call(d, group), d, group
            except UpstreamError as err:
                last = err
                if not err.retryable:
                    raise
                tried.add(d.id)
        raise last if last is not None else self._unavailable(group, ds, req)

    async def _pick(self, ds: list[Deployment], req: RouteRequest, tried: set[str],
                    may_wait: bool) -> Deployment | None:
        """The deployment for the next attempt: the best available one not tried yet (a tried one when no other
        is left or has room). With ``may_wait``, waits out a short Retry-After when that is all that holds every
        deployment back."""
        usage_based = self.settings.routing_strategy == "usage-based-routing"
        while True:
            now = time.monotonic()
            available = [d for d in ds if d.available(now)]
            if available:
                fresh = [d for d in available if d.id not in tried]
                for pool in (fresh, available) if fresh and len(fresh) < len(available) else (fresh or available,):
                    if req.sort is not None:
                        order = sort_by(req.sort, pool, stream=req.stream)
                        if usage_based:  # a sort picks the order, never lifts rpm/tpm
                            order = [d for d in order if d.under_limits(now, req.tokens)]
                    else:
                        order = rank(self.settings.routing_strategy, pool, stream=req.stream, now=now,
                                     tokens=req.tokens, rng=self.rng)
                    order = req.ordered(order)
                    if order:
                        return order[0]
                return None
            waits = [d.not_before - now for d in ds if not d.cooled_down(now) and d.not_before > now]
            if not may_wait or not waits or min(waits) > MAX_RETRY_AFTER_WAIT:
                return None
            await asyncio.sleep(min(waits))

    def _unavailable(self, group: str, ds: list[Deployment], req: RouteRequest) -> UpstreamError:
        now = time.monotonic()
        cooled = [d for d in ds if d.cooled_down(now)]
        if len(cooled) == len(ds):
            wait = min(d.wait_s(now) for d in cooled)
            err = UpstreamError(503, error_body(f"every deployment of model group '{group}' is cooled down after "
                                                f"failures; the first is back in {wait:.1f} s",
                                                "service_unavailable", "deployments_cooled_down"),
                                kind="unavailable", retry_after=wait)
        else:
            err = UpstreamError(429, error_body(f"every deployment of model group '{group}' is at its limit "
                                                "(max_parallel_requests, rpm/tpm or Retry-After); retry later",
                                                "rate_limit_error", "deployments_busy"), kind="unavailable",
                                retry_after=1.0)
        return err

    # -- accounting ------------------------------------------------------------------------------

    def _body_for(self, d: Deployment, req: RouteRequest) -> dict:
        return {**req.forward, "model": d.spec.model}

    def _start(self, d: Deployment) -> float:
        d.started(time.monotonic())
        return time.perf_counter()

    def _failed(self, d: Deployment, group: str, err: UpstreamError) -> None:
        outcome = _OUTCOMES.get(err.kind, str(err.status))
        self.metrics.attempt(group, d.id, outcome)
        log.warning("deployment %s (%s): %s: %s", d.id, group, outcome, err.message[:200])
        if err.kind == "timeout":  # as slow as the timeout: latency-based routing must not keep trying it first
            d.slow(d.spec.timeout or self.settings.timeout)
        if err.counts_against_deployment:
            cooled = d.failed(time.monotonic(), self.settings.allowed_fails, self.settings.cooldown_time,
                              err.retry_after)
            if cooled:
                self.metrics.cooldowns.labels(group, d.id).inc()
                log.warning("deployment %s cooled down for %g s", d.id, self.settings.cooldown_time)

    def _succeeded(self, d: Deployment, group: str, seconds: float, ttft: float | None, usage: Any) -> None:
        prompt, completion = _usage_tokens(usage)
        cost = d.succeeded(seconds, ttft, prompt, completion)
        self.metrics.attempt(group, d.id, "200")
        self.metrics.success(group, d.id, seconds, prompt, completion, cost)


def _usage_tokens(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (p if isinstance(p, int) and p >= 0 else 0), (c if isinstance(c, int) and c >= 0 else 0)


class RelayedStream:
    """A started stream: ``events()`` yields the server-sent events to send (``model`` rewritten to the group,
    the usage chunk only when the client asked for it, ``data: [DONE]`` last, or an error event when the upstream
    breaks). ``aclose()`` releases the upstream whether or not the events were read."""

    def __init__(self, router: Router, req: RouteRequest, d: Deployment, group: str, attempts: int, first: list,
                 events: AsyncIterator[list[dict]], t0: float, ttft: float) -> None:
        self.router, self.req, self.d, self.group = router, req, d, group
        self.deployment, self.attempts = d.id, attempts
        self._first, self._events, self._t0, self._ttft = first, events, t0, ttft
        self._usage: Any = None
        self._closed = False

    def _encode(self, batch: list[dict]) -> bytes:
        out = []
        for event in batch:
            if "usage" in event:
                usage = event["usage"]
                if usage is not None:
                    self._usage = usage
                if not self.req.include_usage:
                    if not event.get("choices"):
                        continue  # the usage chunk the router asked for, not the client
                    event = {k: v for k, v in event.items() if k != "usage"}
            if "model" in event:
                event["model"] = self.group
            out.append(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")
        return b"".join(out)

    async def events(self) -> AsyncIterator[bytes]:
        """The stream's bytes: one piece per batch of upstream events, an error event if it breaks, then
        ``data: [DONE]``."""
        ok = False
        try:
            chunk = self._encode(self._first)
            if chunk:
                yield chunk
            async for batch in self._events:
                chunk = self._encode(batch)
                if chunk:
                    yield chunk
            ok = True
        except UpstreamError as err:
            self.router._failed(self.d, self.group, err)
            self.router._answered(self.group, "stream_error")
            yield b"data: " + json.dumps(err.body, ensure_ascii=False).encode() + b"\n\n"
        finally:
            if ok:
                self.router._succeeded(self.d, self.group, time.perf_counter() - self._t0, self._ttft, self._usage)
                self.router._answered(self.group, "200")
            await self.aclose()
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.d.finished()
        await self._events.aclose()
