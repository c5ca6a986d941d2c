"""The server's engine loop: one thread drives LLMEngine.step(); requests are added and aborted through it, and
each request's outputs go to its own asyncio queue (loop.call_soon_threadsafe)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Union

from fastinfer.engine.llm_engine import LLMEngine
from fastinfer.engine.outputs import RequestOutput
from fastinfer.engine.sampling_params import SamplingParams

log = logging.getLogger("fastinfer.serve")

# What a request's queue receives: its outputs (the last one has ``finished``), or the error that ended it.
QueueItem = Union[RequestOutput, BaseException]


class RequestAborted(Exception):
    """The server stopped the request (shutdown); its queue gets this instead of a final output."""


@dataclass(slots=True)
class _Route:
    """Where one request's outputs go."""

    loop: asyncio.AbstractEventLoop  # the event loop of the HTTP handler waiting for them
    queue: asyncio.Queue  # of QueueItem


@dataclass(slots=True)
class _Add:
    """A request to queue at the next turn of the loop (already checked by the handler)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_text: str | None
    arrival_time: float


class EngineClient:
    """Owns the engine once started: only the loop thread calls add_request / discard / step. Other threads use
    add() and abort(), which queue commands for it, and read the engine's monitoring properties."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # guards _commands, _routes, _pending
        self._commands: deque[_Add | str] = deque()  # _Add, or a request id to discard
        self._routes: dict[str, _Route] = {}
        self._pending = 0  # adds queued for the loop and not yet in the engine
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fastinfer-engine", daemon=True)

    # -- any thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop (after failing every request still routed) and wait for the thread."""
        self.fail_all(RequestAborted("the server is shutting down"))
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for the engine: in its waiting queue or about to be added."""
        return self.engine.num_waiting + self._pending

    @property
    def num_in_flight(self) -> int:
        """Requests whose outputs are still owed to a handler."""
        return len(self._routes)

    def add(self, request: _Add, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        with self._lock:
            self._routes[request.request_id] = _Route(loop, queue)
            self._commands.append(request)
            self._pending += 1
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; nothing more goes to its queue."""
        with self._lock:
            if self._routes.pop(request_id, None) is None:
                return  # finished already
            self._commands.append(request_id)
        self._wake.set()

    def fail_all(self, error: BaseException) -> None:
        """End every routed request with ``error`` in its queue (their engine requests are discarded)."""
        with self._lock:
            routes, self._routes = self._routes, {}
            self._commands.extend(routes)
        self._wake.set()
        _deliver([(r, error) for r in routes.values()])

    # -- the loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wake.clear()
            self._apply_commands()
            if not engine.has_unfinished():
                self._wake.wait()
                continue
            try:
                outputs = engine.step()
            except Exception as err:  # a failed step: its requests end with the error, the engine stays usable
                log.exception("engine step failed")
                self.fail_all(RuntimeError(f"engine step failed: {err}"))
                continue
            items = []
            with self._lock:
                for out in outputs:
                    route = self._routes.pop(out.request_id) if out.finished else self._routes.get(out.request_id)
                    if route is not None:
                        items.append((route, out))
            _deliver(items)

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, deque()
        for cmd in commands:
            if isinstance(cmd, str):
                self.engine.discard(cmd)
                continue
            with self._lock:
                self._pending -= 1
                routed = cmd.request_id in self._routes
            if not routed:  # aborted before it reached the engine
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params,
                                        arrival_time=cmd.arrival_time, prompt_text=cmd.prompt_text)
            except (ValueError, TypeError) as err:  # checked by the handler first: should not happen
                with self._lock:
                    route = self._routes.pop(cmd.request_id, None)
                if route is not None:
                    _deliver([(route, err)])


def make_add(request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt_text: str | None) -> _Add:
    return _Add(request_id, prompt_token_ids, params, prompt_text, time.time())


def _deliver(items: list[tuple[_Route, Any]]) -> None:
    """Put each item on its route's queue: one call_soon_threadsafe per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = defaultdict(list)
    for route, item in items:
        by_loop[route.loop].append((route.queue, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
