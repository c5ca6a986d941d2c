"""The OpenAI-compatible HTTP server: the app factory (routes, API key, errors, access log) and ``run_server``,
which listens first, loads the model in the background (/health answers 503 until it is ready) and drains on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol
from .engine_client import EngineClient, RequestAborted
from .metrics import ServerMetrics
from .serving import ApiError, ServerSettings, Serving

log = logging.getLogger("fastinfer.serve")
OPEN_PATHS = {"/health", "/metrics", "/version"}  # answered without the API key


@dataclass(slots=True)
class AppState:
    """Everything the routes share; ``serving`` is None until the model has loaded."""

    model_name: str
    api_key: str | None
    metrics: ServerMetrics
    version: str
    serving: Serving | None = None
    load_error: str | None = None
    in_flight: set = field(default_factory=set)  # asyncio tasks of the completion requests being answered


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def build_app(state: AppState) -> FastAPI:
    """The FastAPI app over ``state`` (no global state: two apps in one process are independent)."""
    app = FastAPI(title="fastinfer", version=state.version, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fastinfer = state
    app.add_middleware(ApiKeyGate, api_key=state.api_key, model_name=state.model_name)

    def serving() -> Serving:
        if state.serving is None:
            raise ApiError(503, "the model is loading", "service_unavailable", headers={"Retry-After": "1"})
        return state.serving

    async def json_body(request: Request) -> Any:
        try:
            body = protocol.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON: {protocol.short(str(err))}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestAborted)
    async def aborted(request: Request, err: RequestAborted) -> JSONResponse:
        return _error(ApiError(503, str(err), "service_unavailable"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(ApiError(err.status_code, str(err.detail), "invalid_request_error" if err.status_code < 500
                               else "internal_error", headers=dict(err.headers or {})))

    def health() -> str | None:
        if state.serving is None:
            return "loading" if state.load_error is None else "failed"
        return "draining" if state.serving.draining else None

    add_common_routes(app, state.version, state.metrics.registry, health)

    @app.get("/v1/models")
    async def models() -> dict:
        s = serving()
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "fastinfer",
            "root": state.model_name, "parent": None, "max_model_len": s.max_len}]}

    async def complete(request: Request, chat: bool) -> Response:
        body = await json_body(request)
        s = serving()
        job = await s.submit(body, chat)
        access = request.state.access
        access.update(id=job.id, prompt_tokens=sum(len(ids) for _, ids in job.prompts))
        if job.req.stream:
            async def events():
                state.in_flight.add(job)
                try:
                    async for event in s.stream(job):
                        yield event
                finally:
                    state.in_flight.discard(job)
                    access["output_tokens"] = job.output_tokens

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        state.in_flight.add(job)
        try:
            result = await until_disconnect(request, s.respond(job))
        finally:
            state.in_flight.discard(job)
            access["output_tokens"] = job.output_tokens
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await json_body(request)
        s = serving()
        s.check_model(body.get("model"))
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise ApiError(400, "add_special_tokens must be a boolean", param="add_special_tokens")
        tok = s.tokenizer
        if tok is None:
            raise ApiError(400, "the model has no tokenizer")
        if "messages" in body:
            try:
                messages = protocol.parse_messages(body["messages"])
            except protocol.ProtocolError as err:
                raise ApiError(400, err.message, param="messages") from None
            add_gen = body.get("add_generation_prompt", True)
            if not isinstance(add_gen, bool):
                raise ApiError(400, "add_generation_prompt must be a boolean", param="add_generation_prompt")
            if not getattr(tok, "chat_template", None):
                raise ApiError(400, "the model has no chat template")
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=add_gen)
            except Exception as err:
                raise ApiError(400, f"chat template: {protocol.short(str(err))}", param="messages") from None
            ids = tok.encode(text, add_special_tokens=False)
        elif isinstance(body.get("prompt"), str):
            ids = tok.encode(body["prompt"], add_special_tokens=add_special)
        else:
            raise ApiError(400, 'tokenize needs "prompt" (a string) or "messages"', param="prompt")
        ids = list(ids)
        return {"tokens": ids, "count": len(ids), "max_model_len": s.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await json_body(request)
        s = serving()
        s.check_model(body.get("model"))
        ids = body.get("tokens")
        vocab = s.client.engine.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, '"tokens" must be a list of token ids', param="tokens")
        bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is out of the vocabulary [0, {vocab})", param="tokens")
        if s.tokenizer is None:
            raise ApiError(400, "the model has no tokenizer")
        return {"prompt": s.tokenizer.decode(ids, skip_special_tokens=False)}

    return app


def add_common_routes(app: FastAPI, version: str, registry: Any, not_ready: Callable[[], str | None]) -> None:
    """/health (200, or 503 with {"status": not_ready()} while that says why not), /version and /metrics (the
    Prometheus text of ``registry``): the routes every fastinfer server has, open without the API key."""

    @app.get("/health")
    async def health() -> Response:
        why = not_ready()
        return Response(status_code=200) if why is None else JSONResponse({"status": why}, status_code=503)

    @app.get("/version")
    async def version_route() -> dict:
        return {"version": version}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def until_disconnect(request: Request, work: Any) -> Any:
    """Await ``work``; if the client goes away first, cancel it (its engine requests are aborted) and raise."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "client disconnected", "client_closed_request")
    finally:
        if not task.done():
            task.cancel()


class ApiKeyGate:
    """ASGI middleware: the API key check (all but OPEN_PATHS) and one access-log line per request, written when
    its response (a stream too) has ended. Handlers add to the line through ``request.state.access``."""

    def __init__(self, app: Any, api_key: str | None, model_name: str) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.model_name = model_name  # logged unless the handler sets access["model"]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        access: dict = {}
        scope.setdefault("state", {})["access"] = access
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"] not in OPEN_PATHS:
                auth = dict(scope["headers"]).get(b"authorization", b"")
                given = auth[7:] if auth[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(given, self.key):
                    err = ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                   "authentication_error", code="invalid_api_key")
                    return await _error(err)(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            if log.isEnabledFor(logging.INFO):
                log.info("%s %s %s model=%s prompt_tokens=%s output_tokens=%s status=%d latency=%.3fs",
                         access.get("id", "-"), scope["method"], scope["path"], access.get("model", self.model_name),
                         access.get("prompt_tokens", "-"), access.get("output_tokens", "-"), status[0],
                         time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- running


@dataclass(slots=True)
class ServeConfig:
    """How ``run_server`` listens and what it serves (the CLI's flags, checked)."""

    host: str  # address to bind (127.0.0.1 by default: only this machine)
    port: int  # 0 = any free port
    model_name: str  # the served model's name
    api_key: str | None  # required as "Authorization: Bearer KEY" on every route but OPEN_PATHS
    max_waiting: int | None  # most requests waiting for the engine before 429
    shutdown_timeout: float  # seconds in-flight requests may take to finish after SIGTERM/SIGINT
    log_level: str  # uvicorn's and fastinfer.serve's log level
    version: str


@dataclass(slots=True)
class Loaded:
    """What the model load hands the server."""

    engine: Any  # LLMEngine, driven only by the EngineClient from now on
    tokenizer: Any  # encode / decode / apply_chat_template / chat_template, or None
    sampling_defaults: dict  # from generation_config.json
    max_logprobs: int


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) (OSError when it is taken or the address is wrong)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP, and with it
    # on, small writes (a stream's events, a short answer) wait for the peer's delayed ACK, ~40 ms each.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@dataclass(slots=True)
class Lifecycle:
    """What DrainingServer asks of the app it serves."""

    begin_drain: Callable[[], None]  # refuse new requests from now on (/health says draining)
    busy: Callable[[], int]  # requests still being answered
    abort: Callable[[], None]  # end every request still running (each gets a final error)
    started: Callable[[], Any] | None = None  # a coroutine function run on the server's loop once it serves
    stopped: Callable[[], Any] | None = None  # a coroutine function run on that loop after it stopped serving


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM/SIGINT drains: stop accepting, let in-flight requests finish for up
    to shutdown_timeout, abort the rest (each gets a final error), exit. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, life: Lifecycle, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.life = life
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        starting = asyncio.ensure_future(self.life.started()) if self.life.started is not None else None
        try:
            await super().serve(sockets)
        finally:
            if starting is not None and not starting.done():
                starting.cancel()
            if self.life.stopped is not None:
                await self.life.stopped()

    def handle_exit(self, sig: int, frame: Any) -> None:  # a signal handler: no re-raise on exit, unlike uvicorn's
        if self._draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        life, loop = self.life, asyncio.get_running_loop()
        life.begin_drain()
        for server in getattr(self, "servers", []):
            server.close()
        log.info("shutting down: %d request(s) in flight, waiting up to %.1fs", life.busy(), self.shutdown_timeout)
        deadline = loop.time() + self.shutdown_timeout
        while life.busy() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if life.busy():
            log.info("aborting %d request(s) still running", life.busy())
            life.abort()
            deadline = loop.time() + 2.0
            while life.busy() and loop.time() < deadline:
                await asyncio.sleep(0.02)
        self.should_exit = True


def run_server(config: ServeConfig, load: Callable[[], Loaded]) -> int:
    """Listen, say where on stderr, load the model in the background, serve until SIGTERM/SIGINT; exit status."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(config.log_level.upper())
    sock = listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"fastinfer serve: listening on http://{shown}:{port}", file=sys.stderr, flush=True)
    metrics = ServerMetrics()
    state = AppState(config.model_name, config.api_key, metrics, config.version)
    uconfig = uvicorn.Config(build_app(state), log_level=config.log_level, access_log=False, lifespan="off",
                             timeout_graceful_shutdown=5, timeout_keep_alive=30)

    def begin_drain() -> None:
        if state.serving is not None:
            state.serving.draining = True

    def abort() -> None:
        if state.serving is not None:
            state.serving.client.fail_all(RequestAborted("the server is shutting down; the request was aborted"))

    life = Lifecycle(begin_drain, lambda: len(state.in_flight), abort)
    server = DrainingServer(uconfig, life, config.shutdown_timeout)
    clients: list[EngineClient] = []
    status = [0]

    def load_in_background() -> None:
        try:
            loaded = load()
            client = EngineClient(loaded.engine)
            client.start()
            clients.append(client)
            settings = ServerSettings(config.model_name, loaded.sampling_defaults, loaded.max_logprobs,
                                      config.max_waiting)
            metrics.attach_engine(config.model_name, loaded.engine)
            state.serving = Serving(client, loaded.tokenizer, settings, metrics)
            log.info("model %s loaded; ready", config.model_name)
        except BaseException as err:  # reported once; the server exits with status 1
            state.load_error = str(err)
            print(f"fastinfer serve: error: {err}", file=sys.stderr, flush=True)
            status[0] = 1
            server.should_exit = True

    loader = threading.Thread(target=load_in_background, name="fastinfer-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if loader.is_alive():  # stopped while loading: let the load end (exiting inside native code aborts)
            log.info("waiting for the model load to end before exiting")
            loader.join()
        for client in clients:
            client.stop()
    return status[0]
