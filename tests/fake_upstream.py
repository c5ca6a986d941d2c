#!/usr/bin/env python3
"""A fake OpenAI-compatible upstream server, for the router's tests and benchmarks.

As a script::

    python tests/fake_upstream.py --name NAME [--host 127.0.0.1] [--port 0] [--delay S] [--mode MODE] [--config JSON]

serves a raw ASGI app with uvicorn (no FastAPI, no pydantic: the per-request path is one ``json.loads`` and one
``json.dumps``) on a socket it binds itself, and prints one line ``fake upstream NAME listening on http://HOST:PORT``.

OpenAI endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``"stream": true`` as SSE and
``stream_options.include_usage``), ``GET /v1/models``. The reply text is deterministic, see :func:`reply_text`.

Control endpoints (no auth): ``POST /_fake/config`` (JSON: change the behaviour; a field set to null goes back to
its launch value), ``GET /_fake/stats``, ``POST /_fake/reset`` (counts and recorded requests cleared, behaviour
back to the launch values).

Behaviour fields (see ``DEFAULTS``):

* ``mode``: ``"ok"``; ``"status"`` (every completion request gets HTTP ``status`` with an OpenAI error body, and a
  ``Retry-After: retry_after`` header when that is set); ``"context"`` (400, ``code: "context_length_exceeded"``);
  ``"timeout"`` (wait ``hang`` seconds, or until the client goes away, then answer normally); ``"cut"`` (a stream
  sends ``cut_after`` content chunks, then the connection is closed mid-body, no ``[DONE]``; a non-streaming request
  gets its connection closed with no response); ``"drop"`` (the connection is closed with no response).
* ``delay``: seconds before the response (any outcome); ``chunk_delay``: seconds between stream chunks.
* ``fail_first``: the next N completion requests behave per ``mode``, later ones are answered "ok"; null: ``mode``
  applies to every request.
* ``models``: the ids ``GET /v1/models`` lists (null: ``[NAME]``).

Stats: ``hits`` (completion requests received) = ``ok`` (answered normally) + ``failed`` (an injected fault, a bad
body, or a client gone before the end; ``disconnects`` counts the last kind) + ``in_flight``; ``max_in_flight``;
``models_hits``; ``config``; ``requests`` (the last 50 completion requests: path, model, stream, headers with
lowercased names, parsed JSON body).

As a module, :class:`FakeUpstream` runs one such server in a child process (its own GIL) and :func:`start_fakes`
starts several at once. Only the standard library is imported at module level (httpx when a FakeUpstream starts,
uvicorn in the child).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

MODES = ("ok", "status", "context", "timeout", "cut", "drop")
DEFAULTS: dict = {
    "mode": "ok",
    "status": 500,  # mode "status": the HTTP status of every answer
    "retry_after": None,  # mode "status": the Retry-After header (seconds, or any string), none when null
    "hang": 30.0,  # mode "timeout": seconds to wait before answering
    "cut_after": 2,  # mode "cut": content chunks sent before the connection is closed
    "delay": 0.0,  # seconds before the response, every mode
    "chunk_delay": 0.0,  # seconds between stream chunks
    "fail_first": None,  # int: only the next N completion requests follow `mode`, then "ok"; null: all of them
    "models": None,  # GET /v1/models ids; null: [NAME]
}
MAX_RECORDED = 50
DEFAULT_TOKENS, MAX_TOKENS = 8, 64
CONTEXT_LIMIT = 4096
LISTENING = re.compile(r"^fake upstream (\S+) listening on (http://\S+)\s*$", re.M)
SCRIPT = os.path.abspath(__file__)
CONTROL_TIMEOUT = 10.0  # seconds, every control request FakeUpstream makes


def reply_text(name: str, k: int) -> str:
    """The reply of upstream `name` to a request for k tokens (k already clamped to [1, 64])."""
    return f"{name} says: " + " ".join(f"w{i}" for i in range(k))


def reply_pieces(name: str, k: int) -> list[str]:
    """The content chunks of a streamed reply: the prefix, then one per word; they join to reply_text(name, k)."""
    return [f"{name} says: ", "w0"] + [f" w{i}" for i in range(1, k)]


def completion_tokens(body: dict) -> int:
    """k: the body's max_tokens (or max_completion_tokens) clamped to [1, 64]; 8 when neither is an int."""
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return min(max(v, 1), MAX_TOKENS)
    return DEFAULT_TOKENS


def _count_words(x) -> int:
    if isinstance(x, str):
        return len(x.split())
    if isinstance(x, list):  # prompt strings, token ids, nested token ids, or chat content parts
        n = 0
        for item in x:
            if isinstance(item, str):
                n += len(item.split())
            elif isinstance(item, int):
                n += 1
            elif isinstance(item, list):
                n += _count_words(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                n += len(item["text"].split())
        return n
    return 0


def prompt_tokens(body: dict, chat: bool) -> int:
    """A word count of the messages' content (chat) or of the prompt (completions)."""
    if not chat:
        return _count_words(body.get("prompt"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(_count_words(m.get("content")) for m in messages if isinstance(m, dict))


def validate_config(update: dict) -> dict:
    """Check a config update; raises ValueError. None values are kept (they mean: back to the launch value)."""
    if not isinstance(update, dict):
        raise ValueError("the config must be a JSON object")
    unknown = sorted(set(update) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(DEFAULTS)}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v and v != float("inf")

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key, v in update.items():
        if v is None:
            continue
        if key == "mode" and v not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, not {v!r}")
        if key == "status" and not (integer(v) and 400 <= v <= 599):
            raise ValueError(f"status must be an int in [400, 599], not {v!r}")
        if key == "retry_after" and not (number(v) or isinstance(v, str)):
            raise ValueError(f"retry_after must be a number >= 0 or a string, not {v!r}")
        if key in ("hang", "delay", "chunk_delay") and not number(v):
            raise ValueError(f"{key} must be a number >= 0, not {v!r}")
        if key in ("cut_after", "fail_first") and not integer(v):
            raise ValueError(f"{key} must be an int >= 0, not {v!r}")
        if key == "models" and not (isinstance(v, list) and all(isinstance(m, str) for m in v)):
            raise ValueError(f"models must be a list of strings, not {v!r}")
    return dict(update)


# ============================================================================ the server


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"
_ERROR_KINDS = {  # status -> (type, code) of the OpenAI error body
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", None),
    429: ("requests", "rate_limit_exceeded"),
}


class _HangUp(Exception):
    """Raised when the server gives no way to close the connection: the server's own error handling closes it."""


def _error_body(message: str, type_: str, code, param=None) -> bytes:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


async def _send_json(send, status: int, body: bytes, extra_headers=()) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes | None:
    """The whole request body; None when the client went away first."""
    msg = await receive()
    if msg["type"] != "http.request":
        return None
    body = msg.get("body", b"")
    if not msg.get("more_body"):
        return body
    parts = [body]
    while msg.get("more_body"):
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        parts.append(msg.get("body", b""))
    return b"".join(parts)


def _connection(send):
    """The server's per-request object behind `send` (uvicorn's RequestResponseCycle: .transport, .disconnected)."""
    return getattr(send, "__self__", None)


async def _hang_up(send, before_close) -> None:
    """Close the connection now, with whatever was sent so far (nothing, or part of a chunked body).
    before_close() runs first, so that the stats are up to date by the time the client sees the close."""
    before_close()
    cycle = _connection(send)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise _HangUp("closing the connection")
    transport.close()  # flushes what was written, then FIN: the client sees no response / an incomplete body
    # Wait (bounded) for the server to see the connection gone, so that it does not add an error of its own.
    for _ in range(1000):
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0.001)


def _gone(send) -> bool:
    return bool(getattr(_connection(send), "disconnected", False))


class FakeApp:
    """The ASGI app: the OpenAI endpoints, the control endpoints, the state they share."""

    def __init__(self, name: str, launch: dict | None = None) -> None:
        self.name = name
        self.launch = {**DEFAULTS, **validate_config(launch or {})}
        self._texts = {k: reply_text(name, k) for k in range(1, MAX_TOKENS + 1)}
        self._pieces = {k: reply_pieces(name, k) for k in range(1, MAX_TOKENS + 1)}
        self.reset()

    def reset(self) -> None:
        self.config = dict(self.launch)
        self.hits = self.ok = self.failed = self.disconnects = 0
        self.in_flight = self.max_in_flight = self.models_hits = 0
        self.requests: collections.deque = collections.deque(maxlen=MAX_RECORDED)
        self.seq = 0

    def configure(self, update: dict) -> dict:
        update = validate_config(update)
        self.config = {**self.config, **{k: (self.launch[k] if v is None else v) for k, v in update.items()}}
        return self.config

    def stats(self) -> dict:
        return {
            "name": self.name, "hits": self.hits, "ok": self.ok, "failed": self.failed,
            "disconnects": self.disconnects, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
            "models_hits": self.models_hits, "config": self.config, "requests": list(self.requests),
        }

    # -- ASGI --------------------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        path, method = scope["path"], scope["method"]
        if path == "/v1/chat/completions" or path == "/v1/completions":
            if method != "POST":
                return await self._not_allowed(send, path, method)
            return await self._completion(scope, receive, send, path, path == "/v1/chat/completions")
        if path == "/v1/models":
            if method != "GET":
                return await self._not_allowed(send, path, method)
            self.models_hits += 1
            ids = self.config["models"] or [self.name]
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake-upstream"} for m in ids]
            return await _send_json(send, 200, _dumps({"object": "list", "data": data}))
        if path.startswith("/_fake/"):
            return await self._control(receive, send, path, method)
        msg = f"Invalid URL ({method} {path})"
        await _send_json(send, 404, _error_body(msg, "invalid_request_error", None))

    async def _not_allowed(self, send, path, method) -> None:
        body = _error_body(f"{method} is not allowed on {path}", "invalid_request_error", None)
        await _send_json(send, 405, body)

    async def _control(self, receive, send, path, method) -> None:
        if path == "/_fake/stats" and method == "GET":
            return await _send_json(send, 200, _dumps(self.stats()))
        if path == "/_fake/reset" and method == "POST":
            await _read_body(receive)
            self.reset()
            return await _send_json(send, 200, _dumps({"config": self.config}))
        if path == "/_fake/config" and method == "POST":
            raw = await _read_body(receive)
            try:
                config = self.configure(json.loads(raw or b"{}"))
            except ValueError as e:  # bad JSON (JSONDecodeError is a ValueError) or a bad field
                return await _send_json(send, 400, _error_body(str(e), "invalid_request_error", None))
            return await _send_json(send, 200, _dumps({"config": config}))
        await _send_json(send, 404, _error_body(f"no control endpoint {method} {path}", "invalid_request_error", None))

    async def _completion(self, scope, receive, send, path: str, chat: bool) -> None:
        self.hits += 1
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        outcome = "failed"
        counted = False

        def count() -> None:  # once per request: in_flight back down, one of ok / failed up
            nonlocal counted
            if counted:
                return
            counted = True
            self.in_flight -= 1
            if outcome == "ok":
                self.ok += 1
            else:
                self.failed += 1
                if outcome == "disconnect":
                    self.disconnects += 1

        try:
            raw = await _read_body(receive)
            if raw is None:
                outcome = "disconnect"
                return
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            headers: dict = {}
            for k, v in scope["headers"]:
                k = k.decode("latin-1").lower()
                v = v.decode("latin-1")
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
            ok_body = isinstance(body, dict)
            stream = ok_body and bool(body.get("stream"))
            model = body.get("model") if ok_body else None
            self.requests.append({"path": path, "model": model, "stream": stream, "headers": headers, "body": body})
            if not ok_body:
                msg = "We could not parse the JSON body of your request: it must be a JSON object."
                return await _send_json(send, 400, _error_body(msg, "invalid_request_error", None))

            cfg = self.config  # this request's snapshot (configure replaces the dict)
            mode = cfg["mode"]
            if mode != "ok" and cfg["fail_first"] is not None:
                if cfg["fail_first"] > 0:
                    cfg["fail_first"] -= 1
                else:
                    mode = "ok"
            if cfg["delay"]:
                await asyncio.sleep(cfg["delay"])
                if _gone(send):
                    outcome = "disconnect"
                    return

            if mode == "ok":
                delivered = await self._answer(send, cfg, body, chat, stream, model)
                outcome = "ok" if delivered else "disconnect"
            elif mode == "status":
                await self._status_error(send, cfg)
            elif mode == "context":
                await self._context_error(send, body, chat)
            elif mode == "timeout":
                watcher = asyncio.ensure_future(receive())  # returns http.disconnect when the client goes away
                done, _ = await asyncio.wait({watcher}, timeout=cfg["hang"])
                if done:
                    outcome = "disconnect"
                    return
                watcher.cancel()
                if not await self._answer(send, cfg, body, chat, stream, model):
                    outcome = "disconnect"
            elif mode == "cut":
                if stream:
                    await self._answer(send, cfg, body, chat, stream, model, cut_after=cfg["cut_after"])
                await _hang_up(send, count)
            else:  # drop
                await _hang_up(send, count)
        finally:
            count()

    async def _status_error(self, send, cfg) -> None:
        status = cfg["status"]
        type_, code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        body = _error_body(f"fake upstream {self.name}: injected HTTP {status} ({phrase})", type_, code)
        extra = ()
        ra = cfg["retry_after"]
        if ra is not None:
            if isinstance(ra, float) and ra.is_integer():
                ra = int(ra)
            extra = ((b"retry-after", str(ra).encode("latin-1")),)
        await _send_json(send, status, body, extra)

    async def _context_error(self, send, body: dict, chat: bool) -> None:
        k = completion_tokens(body)
        asked = max(prompt_tokens(body, chat), CONTEXT_LIMIT + 1)
        where = "messages" if chat else "prompt"
        msg = (f"This model's maximum context length is {CONTEXT_LIMIT} tokens. However, you requested {asked + k} "
               f"tokens ({asked} in the {where}, {k} in the completion). Please reduce the length of the {where} "
               f"or completion.")
        await _send_json(send, 400, _error_body(msg, "invalid_request_error", "context_length_exceeded", where))

    async def _answer(self, send, cfg, body: dict, chat: bool, stream: bool, model, cut_after: int | None = None):
        """The normal reply; False when the client went away before its end. With cut_after: a stream's first
        events and cut_after content chunks only (the caller then hangs up)."""
        k = completion_tokens(body)
        if not isinstance(model, str):
            model = self.name
        self.seq += 1
        created = int(time.time())
        p = prompt_tokens(body, chat)
        usage = {"prompt_tokens": p, "completion_tokens": k, "total_tokens": p + k}
        if not stream:
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": self._texts[k]},
                          "logprobs": None, "finish_reason": "stop"}
                rid, obj = f"chatcmpl-{self.name}-{self.seq}", "chat.completion"
            else:
                choice = {"index": 0, "text": self._texts[k], "logprobs": None, "finish_reason": "stop"}
                rid, obj = f"cmpl-{self.name}-{self.seq}", "text_completion"
            out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}
            await _send_json(send, 200, _dumps(out))
            return True

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        if chat:
            base = {"id": f"chatcmpl-{self.name}-{self.seq}", "object": "chat.completion.chunk", "created": created,
                    "model": model}
        else:
            base = {"id": f"cmpl-{self.name}-{self.seq}", "object": "text_completion", "created": created,
                    "model": model}

        def event(choices, usage_value=None) -> bytes:
            chunk = {**base, "choices": choices}
            if include_usage:
                chunk["usage"] = usage_value
            return b"data: " + _dumps(chunk) + b"\n\n"

        def piece(text, finish=None) -> bytes:
            if chat:
                delta = {"content": text} if text is not None else {}
                return event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
            return event([{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}])

        head = [event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}])] if chat else []
        pieces = self._pieces[k]
        if cut_after is not None:
            events = head + [piece(t) for t in pieces[:cut_after]]
        else:
            events = head + [piece(t) for t in pieces] + [piece(None, "stop")]
            if include_usage:
                events.append(event([], usage))
            events.append(_DONE)

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        chunk_delay = cfg["chunk_delay"]
        last = len(events) - 1
        for i, data in enumerate(events):
            if chunk_delay and i:
                await asyncio.sleep(chunk_delay)
            if _gone(send):
                return False
            more = cut_after is not None or i < last
            await send({"type": "http.response.body", "body": data, "more_body": more})
        return True


async def serve(name: str, host: str = "127.0.0.1", port: int = 0, launch: dict | None = None,
                exit_with_parent: bool = False) -> None:
    """Bind host:port (0: the OS picks), print the listening line once uvicorn serves, run until signalled."""
    import uvicorn

    app = FakeApp(name, launch)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when their proto says TCP; with the
    # default proto 0 the response's headers and body writes meet Nagle and delayed ACKs (~40 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, access_log=False, log_level="warning", lifespan="off", proxy_headers=False,
                            server_header=False, date_header=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # raises what stopped it
            raise RuntimeError("uvicorn exited before serving")
        await asyncio.sleep(0.005)
    shown = f"[{host}]" if ":" in host else host
    print(f"fake upstream {name} listening on http://{shown}:{sock.getsockname()[1]}", flush=True)
    if exit_with_parent:
        parent = os.getppid()

        async def watch_parent() -> None:  # the parent died (we were re-parented): do not outlive it
            while os.getppid() == parent:
                await asyncio.sleep(0.5)
            server.should_exit = True

        watcher = asyncio.ensure_future(watch_parent())
    await task
    if exit_with_parent:
        watcher.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A fake OpenAI-compatible upstream server (see the module docstring).")
    ap.add_argument("--name", required=True, help="this upstream's name: in its replies and its stats")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 (the default): the OS picks a free port")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before every response")
    ap.add_argument("--mode", default="ok", choices=MODES)
    ap.add_argument("--config", default=None, help="JSON object: more launch behaviour fields (as /_fake/config)")
    ap.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies")
    args = ap.parse_args(argv)
    launch = {"delay": args.delay, "mode": args.mode}
    try:
        if args.config:
            launch.update(json.loads(args.config))
        launch = validate_config(launch)
    except ValueError as e:
        ap.error(f"--config: {e}")
    asyncio.run(serve(args.name, args.host, args.port, launch, args.exit_with_parent))
    return 0


# ============================================================================ the test helper


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it is a session leader) if it still runs, and reap it (bounded)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            try:
                proc.kill()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _cleanup(proc: subprocess.Popen | None, log_path: str) -> None:
    try:
        if proc is not None:
            _kill(proc)
    finally:
        try:
            os.unlink(log_path)
        except OSError:
            pass


class FakeUpstream:
    """One fake upstream server in a child process (its own GIL).

    Extra keyword arguments are launch behaviour fields (``status=503``, ``chunk_delay=0.01``...), which ``reset``
    goes back to. The child's output goes to a temporary log file (``log()``), removed by ``stop()``.
    """

    def __init__(self, name: str, *, delay: float = 0.0, mode: str = "ok", start_timeout: float = 20.0,
                 host: str = "127.0.0.1", **behaviour) -> None:
        import httpx

        self.name = name
        self.url = self.api_base = ""
        self.proc: subprocess.Popen | None = None
        self._http = None
        args = [sys.executable, SCRIPT, "--name", name, "--host", host, "--port", "0", "--delay", repr(float(delay)),
                "--mode", mode, "--exit-with-parent"]
        if behaviour:
            args += ["--config", json.dumps(behaviour)]
        self.args = args
        fd, self.log_path = tempfile.mkstemp(prefix="fake-upstream-", suffix=".log")
        self._finalizer = weakref.finalize(self, _cleanup, None, self.log_path)
        try:
            with os.fdopen(fd, "wb") as log:
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             env=env, start_new_session=True)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _cleanup, self.proc, self.log_path)  # also at exit
            self.url = self._wait_listening(start_timeout)
            self.api_base = self.url + "/v1"
            self._http = httpx.Client(base_url=self.url, timeout=CONTROL_TIMEOUT, trust_env=False)
        except BaseException:
            self.stop()
            raise

    def __repr__(self) -> str:
        return f"FakeUpstream({self.name!r}, url={self.url!r})"

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            m = LISTENING.search(self.log())
            if m:
                return m.group(2)
            why = None
            if self.proc.poll() is not None:
                why = f"exited with status {self.proc.returncode} before listening"
            elif time.monotonic() > deadline:
                why = f"printed no listening line within {timeout:g} s"
            if why:
                raise RuntimeError(f"fake upstream {self.name} {why}\n$ {' '.join(self.args)}\n"
                                   f"--- its output ---\n{self.log()[-4000:]}")
            time.sleep(0.01)

    # -- control ------------------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kw):
        if self._http is None:
            raise RuntimeError(f"fake upstream {self.name} is stopped")
        r = self._http.request(method, path, **kw)
        if r.status_code != 200:
            raise ValueError(f"fake upstream {self.name}: {method} {path} -> {r.status_code} {r.text}")
        return r.json()

    def configure(self, **behaviour) -> None:
        """Change the behaviour (see DEFAULTS); a field set to None goes back to its launch value."""
        self._call("POST", "/_fake/config", json=behaviour)

    def reset(self) -> None:
        self._call("POST", "/_fake/reset")

    def stats(self) -> dict:
        return self._call("GET", "/_fake/stats")

    def hits(self) -> int:
        return self.stats()["hits"]

    def wait_stats(self, predicate, timeout: float = 5.0) -> dict:
        """Poll the stats until predicate(stats) holds (e.g. a disconnect seen); AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"fake upstream {self.name}: stats never matched within {timeout:g} s: "
                                     f"{ {k: v for k, v in stats.items() if k != 'requests'} }")
            time.sleep(0.01)

    # -- lifetime -----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM, wait (bounded), SIGKILL if needed; idempotent."""
        if self._http is not None:
            self._http.close()
            self._http = None
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._finalizer()  # SIGKILL if still alive, remove the log; runs once

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_fakes(*names: str, **kw) -> list[FakeUpstream]:
    """Start one FakeUpstream per name (in parallel, same keyword arguments); if any fails, stop the others and
    raise its error."""
    if not names:
        return []
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = [pool.submit(FakeUpstream, name, **kw) for name in names]
    started, errors = [], []
    for f in futures:
        try:
            started.append(f.result())
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the cleanup
            errors.append(e)
    if errors:
        for fake in started:
            fake.stop()
        raise errors[0]
    return started


if __name__ == "__main__":
    sys.exit(main())
