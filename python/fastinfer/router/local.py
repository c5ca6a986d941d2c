"""``fastinfer/<model>`` deployments: engines in this process, each driven by the server's EngineClient and answered by
the server's Serving (so a local group behaves exactly as ``fastinfer serve`` on that model). Engines load on first
use (or at start with --preload); with ``max_loaded_models`` the least recently used idle engine is unloaded to make
room for another."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Callable

from fastinfer.entrypoints.openai import protocol
from fastinfer.entrypoints.openai.engine_client import EngineClient, RequestAborted
from fastinfer.entrypoints.openai.metrics import ServerMetrics
from fastinfer.entrypoints.openai.serving import ApiError, ServerSettings, Serving

from .backend import Backend, UpstreamError, error_body
from .config import DeploymentSpec

log = logging.getLogger("fastinfer.router")
MAX_LOGPROBS = 20  # vLLM's default cap on logprobs per token


def engine_key(spec: DeploymentSpec) -> tuple:
    """Deployments naming the same model with the same engine settings share one engine."""
    return spec.model, spec.engine_args


@dataclass(slots=True, eq=False)
class _Engine:
    """One local engine: loading, loaded, or failed to load."""

    name: str  # the model as the config names it ("default", a path, an HF id)
    task: asyncio.Task | None = None  # the load, shared by every request waiting for it
    serving: Serving | None = None
    users: int = 0  # requests holding it (an engine in use is never unloaded)
    loads: int = 0  # times loaded (reported in /router/status)


@dataclass(slots=True)
class LocalEngines:
    """The local engines of one router. ``llm_factory(model_or_None, **engine_args)`` builds an LLM (tests pass
    their own); all bookkeeping runs on the router's event loop, loads and unloads in worker threads."""

    llm_factory: Callable[..., Any]
    metrics: ServerMetrics
    max_loaded: int | None = None  # most engines loaded at once; None = no limit
    _engines: OrderedDict = field(default_factory=OrderedDict)  # key -> _Engine, least recently used first
    _changed: asyncio.Event | None = None  # set when an engine is released or unloaded (waiters re-check)

    def loaded(self) -> list[str]:
        """The names of the engines loaded now."""
        return [e.name for e in self._engines.values() if e.serving is not None]

    def state(self, spec: DeploymentSpec) -> dict:
        e = self._engines.get(engine_key(spec))
        if e is None:
            return {"loaded": False, "loading": False, "in_use": 0}
        return {"loaded": e.serving is not None, "loading": e.serving is None, "in_use": e.users}

    async def acquire(self, spec: DeploymentSpec) -> Serving:
        """The deployment's Serving, loading it first if needed (after unloading the least recently used idle
        engine when ``max_loaded`` are loaded; waiting for one to become idle when none is). Pair with
        release()."""
        if self._changed is None:
            self._changed = asyncio.Event()
        key = engine_key(spec)
        while True:
            engine = self._engines.get(key)
            if engine is not None and engine.serving is not None:
                engine.users += 1
                self._engines.move_to_end(key)
                return engine.serving
            if engine is not None:  # loading: wait for that load
                await asyncio.shield(engine.task)
                continue
            if self.max_loaded is not None and len(self._engines) >= self.max_loaded:
                victim = next((k for k, e in self._engines.items() if e.serving is not None and e.users == 0), None)
                if victim is None:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                await self._unload(victim)
                continue
            engine = _Engine(spec.model)
            self._engines[key] = engine
            engine.task = asyncio.ensure_future(self._load(key, engine, spec))
            await asyncio.shield(engine.task)

    def release(self, spec: DeploymentSpec) -> None:
        engine = self._engines.get(engine_key(spec))
        if engine is not None and engine.users > 0:
            engine.users -= 1
            if engine.users == 0 and self._changed is not None:
                self._changed.set()

    async def preload(self, specs: list[DeploymentSpec]) -> None:
        """Load these deployments' engines now (up to ``max_loaded`` of them)."""
        for spec in specs:
            await self.acquire(spec)
            self.release(spec)

    async def close(self) -> None:
        for key in list(self._engines):
            engine = self._engines[key]
            if engine.task is not None and not engine.task.done():
                await asyncio.shield(engine.task)
            await self._unload(key)

    async def _load(self, key: tuple, engine: _Engine, spec: DeploymentSpec) -> None:
        """Load in a worker thread; on failure the entry goes away (the next request tries again) and every
        waiter gets the error."""
        try:
            engine.serving = await asyncio.to_thread(self._build, spec, engine.name)
            engine.loads += 1
            log.info("loaded local model %s", engine.name)
        except Exception as err:
            self._engines.pop(key, None)
            if self._changed is not None:
                self._changed.set()
            log.error("cannot load local model %s: %s", engine.name, err)
            raise UpstreamError(503, error_body(f"deployment {spec.id}: cannot load {engine.name}: "
                                                f"{protocol.short(str(err))}", "upstream_error",
                                                "model_load_failed")) from None

    def _build(self, spec: DeploymentSpec, name: str) -> Serving:
        model = None if spec.model == "default" else spec.model
        kwargs = dict(spec.engine_args)
        if kwargs.get("quantization") == "none":
            kwargs["quantization"] = None
        max_logprobs = kwargs.setdefault("max_logprobs", MAX_LOGPROBS)
        llm = self.llm_factory(model, **kwargs)
        defaults = protocol.model_sampling_defaults(getattr(llm, "generation_config", None) or {})
        client = EngineClient(llm.engine)
        client.start()
        self.metrics.attach_engine(name, llm.engine)
        return Serving(client, llm.get_tokenizer(), ServerSettings(name, defaults, max_logprobs, None), self.metrics)

    async def _unload(self, key: tuple) -> None:
        engine = self._engines.pop(key, None)
        if engine is None or engine.serving is None:
            return
        serving, engine.serving = engine.serving, None
        self.metrics.detach_engine(engine.name)
        await asyncio.to_thread(serving.client.stop)
        del serving
        await asyncio.to_thread(gc.collect)  # the weights and KV cache go now, before the next load
        log.info("unloaded local model %s", engine.name)
        if self._changed is not None:
            self._changed.set()


class LocalBackend(Backend):
    """One ``fastinfer/<model>`` deployment, answered by its engine's Serving."""

    def __init__(self, spec: DeploymentSpec, engines: LocalEngines) -> None:
        self.spec = spec
        self.engines = engines

    def _body(self, body: dict) -> dict:
        return {**body, "model": self.spec.model}

    async def complete(self, body: dict, chat: bool, timeout: float) -> dict:
        try:
            async with asyncio.timeout(timeout):
                serving = await self.engines.acquire(self.spec)
                try:
                    job = await serving.submit(self._body(body), chat)
                    return await serving.respond(job)
                finally:
                    self.engines.release(self.spec)
        except TimeoutError:
            raise UpstreamError(504, error_body(f"deployment {self.spec.id} did not answer within {timeout:g} s",
                                                "timeout", "upstream_timeout"), kind="timeout") from None
        except ApiError as err:
            raise _api_error(err) from None
        except RequestAborted as err:
            raise UpstreamError(503, error_body(str(err), "service_unavailable")) from None

    async def stream(self, body: dict, chat: bool, timeout: float) -> AsyncIterator[list[dict]]:
        try:
            async with asyncio.timeout(timeout):
                serving = await self.engines.acquire(self.spec)
        except TimeoutError:
            raise UpstreamError(504, error_body(f"deployment {self.spec.id} did not start within {timeout:g} s",
                                                "timeout", "upstream_timeout"), kind="timeout") from None
        try:
            try:
                job = await serving.submit(self._body(body), chat)
            except ApiError as err:
                raise _api_error(err) from None
            events = serving.stream(job)
            try:
                while True:
                    try:
                        async with asyncio.timeout(timeout):
                            sse = await anext(events)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise UpstreamError(504, error_body(f"deployment {self.spec.id} sent nothing for "
                                                            f"{timeout:g} s", "timeout", "upstream_timeout"),
                                            kind="stream") from None
                    payload = sse[6:].strip()
                    if payload == "[DONE]":
                        return
                    event = json.loads(payload)
                    if "error" in event:
                        err = event["error"]
                        code = err.get("code") if isinstance(err, dict) else None
                        raise UpstreamError(code if isinstance(code, int) and 400 <= code < 600 else 500, event,
                                            kind="stream")
                    yield [event]
            finally:
                await events.aclose()  # a stream closed early aborts its engine requests
        finally:
            self.engines.release(self.spec)


def _api_error(err: ApiError) -> UpstreamError:
    retry = err.headers.get("Retry-After")
    return UpstreamError(err.status, err.body(), retry_after=float(retry) if retry else None)
