"""``fastinfer serve --config``: the router behind an OpenAI-compatible HTTP API. /v1/chat/completions and
/v1/completions (streaming too) are routed; /v1/models lists the model groups; /router/status is the router's state;
/health, /metrics, /version as for one model. The listening, API key, access log and draining are the server's
(entrypoints/openai/api_server.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastinfer.entrypoints.openai import protocol
from fastinfer.entrypoints.openai.api_server import (ApiKeyGate, DrainingServer, Lifecycle, add_common_routes, listen,
                                                     until_disconnect)
from fastinfer.entrypoints.openai.serving import ApiError

from .backend import UpstreamError, error_body
from .router import RelayedStream, Router

log = logging.getLogger("fastinfer.router")


@dataclass(slots=True)
class RouterState:
    """What the routes share."""

    router: Router
    api_key: str | None
    version: str
    ready: bool = False  # False until --preload finished (/health answers 503 until then)
    load_error: str | None = None
    draining: bool = False
    in_flight: set = field(default_factory=set)  # asyncio tasks answering requests (cancelled on abort)


def _json(body: dict, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _error_response(err: UpstreamError) -> JSONResponse:
    headers = {"x-fastinfer-attempts": str(getattr(err, "attempts", 0))}
    deployment = getattr(err, "deployment", None)
    if deployment is not None:
        headers["x-fastinfer-deployment"] = deployment
    if err.retry_after is not None and err.status in (429, 503):
        headers["retry-after"] = str(max(1, round(err.retry_after)))
    return _json(err.body, err.status, headers)


class _RelayResponse(Response):
    """Streams a RelayedStream's events as they come, and stops reading the upstream as soon as the client goes
    away (the upstream connection is closed, a local engine request aborted)."""

    def __init__(self, stream: RelayedStream, state: RouterState) -> None:
        super().__init__(media_type="text/event-stream")
        self.stream = stream
        self.state = state
        self.stream_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), (b"x-fastinfer-deployment", stream.deployment.encode()),
            (b"x-fastinfer-attempts", str(stream.attempts).encode())]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.stream_headers})
            async for chunk in self.stream.events():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(watch())
        self.state.in_flight.add(pumping)
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_gone = watching.done()
            watching.cancel()
            aborted = not pumping.done() or pumping.cancelled()
            pumping.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            self.state.in_flight.discard(pumping)
            await self.stream.aclose()
            if aborted and self.state.draining and not client_gone:  # shutdown, the client still there
                err = error_body("the server is shutting down; the request was aborted", "service_unavailable", 503)
                try:
                    await send({"type": "http.response.body", "body": _sse(err) + b"data: [DONE]\n\n",
                                "more_body": False})
                except Exception:  # the connection is gone after all
                    pass


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def build_router_app(state: RouterState) -> FastAPI:
    """The FastAPI app over ``state`` (no global state)."""
    app = FastAPI(title="fastinfer router", version=state.version, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fastinfer = state
    app.add_middleware(ApiKeyGate, api_key=state.api_key, model_name="-")
    router = state.router

    @app.exception_handler(UpstreamError)
    async def upstream_error(request: Request, err: UpstreamError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _json(err.body(), err.status, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "internal_error"
        return _json(error_body(str(err.detail), kind, err.status_code), err.status_code, dict(err.headers or {}))

    def not_ready() -> str | None:
        if state.draining:
            return "draining"
        if not state.ready:
            return "loading" if state.load_error is None else "failed"
        return None

    add_common_routes(app, state.version, router.registry, not_ready)

    @app.get("/router/status")
    async def status() -> dict:
        return router.status()

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(router.started)
        return {"object": "list", "data": [
            {"id": g, "object": "model", "created": created, "owned_by": "fastinfer-router", "root": g,
             "parent": None, "deployments": len(ds)} for g, ds in router.groups.items()]}

    async def complete(request: Request, chat: bool) -> Response:
        if state.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable", headers={"Retry-After": "5"})
        try:
            body = protocol.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON: {protocol.short(str(err))}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        access = request.state.access
        access["model"] = body.get("model")
        if body.get("stream") is True:
            stream = await until_disconnect(request, router.open_stream(body, chat))
            access["deployment"] = stream.deployment
            return _RelayResponse(stream, state)
        work = asyncio.ensure_future(router.complete(body, chat))
        state.in_flight.add(work)
        try:
            answer = await until_disconnect(request, work)
        except asyncio.CancelledError:
            if work.cancelled() and state.draining and not asyncio.current_task().cancelling():
                raise ApiError(503, "the server is shutting down; the request was aborted",
                               "service_unavailable") from None
            raise
        finally:
            state.in_flight.discard(work)
        usage = answer.body.get("usage") if isinstance(answer.body.get("usage"), dict) else {}
        access.update(id=answer.body.get("id", "-"), prompt_tokens=usage.get("prompt_tokens", "-"),
                      output_tokens=usage.get("completion_tokens", "-"))
        return _json(answer.body, headers={"x-fastinfer-deployment": answer.deployment,
                                           "x-fastinfer-attempts": str(answer.attempts)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app


@dataclass(slots=True)
class RouterServeConfig:
    """How run_router listens (the CLI's flags, checked)."""

    host: str
    port: int  # 0 = any free port
    api_key: str | None  # --api-key, else the config's general_settings.master_key
    preload: bool  # load every local engine before /health says ready
    shutdown_timeout: float
    log_level: str
    version: str


def run_router(config: RouterServeConfig, router: Router) -> int:
    """Listen, say where on stderr, serve the router until SIGTERM/SIGINT; exit status."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("fastinfer.serve", "fastinfer.router"):
        logging.getLogger(name).setLevel(config.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per upstream call is the access log's job
    sock = listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"fastinfer serve: listening on http://{shown}:{port}", file=sys.stderr, flush=True)
    state = RouterState(router, config.api_key, config.version)
    uconfig = uvicorn.Config(build_router_app(state), log_level=config.log_level, access_log=False,
                             lifespan="off", timeout_graceful_shutdown=5, timeout_keep_alive=30)
    status = [0]

    async def started() -> None:
        if config.preload:
            t0 = time.perf_counter()
            try:
                await router.preload()
            except UpstreamError as err:
                state.load_error = err.message
                print(f"fastinfer serve: error: {err.message}", file=sys.stderr, flush=True)
                status[0] = 1
                server.should_exit = True
                return
            log.info("local models loaded in %.1f s", time.perf_counter() - t0)
        state.ready = True
        log.info("router ready: %d group(s), %d deployment(s)", len(router.groups), len(router.deployments))

    def begin_drain() -> None:
        state.draining = True

    def abort() -> None:
        for task in list(state.in_flight):
            task.cancel()

    life = Lifecycle(begin_drain, lambda: len(state.in_flight), abort, started, router.aclose)
    server = DrainingServer(uconfig, life, config.shutdown_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return status[0]
