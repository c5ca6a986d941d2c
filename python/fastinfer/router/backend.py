"""What every deployment's backend (a remote OpenAI-compatible server, or an engine in this process) offers the
router, and the one error type its failures become, classified once for the retry rules."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

# 408 Request Timeout, 429 Too Many Requests and every 5xx are worth another try; other 4xx are the client's.
_RETRY_STATUSES = frozenset({408, 429})
# How context-length errors read across servers: OpenAI and vLLM ("maximum context length"), llama-server
# ("exceeds the available context size"), SGLang and others ("context length", "too many tokens").
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"})
_CONTEXT_TEXT = re.compile(r"context (length|window|size)|maximum context|too many tokens|prompt is too long",
                           re.IGNORECASE)


def error_body(message: str, type: str, code: Any = None, param: str | None = None) -> dict:
    """An OpenAI error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class UpstreamError(Exception):
    """One failed attempt at one deployment (or the router's own refusal), with what the client would get.

    ``kind``: "status" (the deployment answered with an HTTP error), "timeout", "connection" (could not connect or
    the connection broke before an answer), "stream" (a stream broke or ended without ``[DONE]``)."""

    def __init__(self, status: int, body: dict, kind: str = "status", retry_after: float | None = None) -> None:
        super().__init__(_message(body))
        self.status = status  # what the client gets when this is the last error
        self.body = body  # an OpenAI error body
        self.kind = kind
        self.retry_after = retry_after  # seconds the deployment asked us to wait (Retry-After), if it did

    @property
    def message(self) -> str:
        return _message(self.body)

    @property
    def retryable(self) -> bool:
        """Another attempt (here or at another deployment) may succeed: connection errors, timeouts, broken
        streams, 408, 429 and 5xx."""
        return self.kind != "status" or self.status in _RETRY_STATUSES or self.status >= 500

    @property
    def context_window(self) -> bool:
        """The prompt (plus max_tokens) does not fit the deployment's model: worth a bigger model, not a retry."""
        if self.kind != "status" or self.status not in (400, 413, 422):
            return False
        err = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(err, dict):
            if err.get("code") in _CONTEXT_CODES or err.get("type") in _CONTEXT_CODES:
                return True
        return bool(_CONTEXT_TEXT.search(self.message))

    @property
    def counts_against_deployment(self) -> bool:
        """Failures that say something about the deployment's health (the cooldown counts these)."""
        return self.retryable


def _message(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    if isinstance(err, str):
        return err
    return str(body)[:500]


class Backend(ABC):
    """One deployment's way to answer a completion body. ``body`` is what the client sent, already rewritten for
    the deployment (its ``model``, no router-only fields); ``timeout`` bounds the whole non-streaming call, or the
    wait for each streamed event."""

    @abstractmethod
    async def complete(self, body: dict, chat: bool, timeout: float) -> dict:
        """The response body (raises UpstreamError)."""

    @abstractmethod
    def stream(self, body: dict, chat: bool, timeout: float) -> AsyncIterator[list[dict]]:
        """An async generator of the stream's events (parsed ``data:`` payloads) up to, not including,
        ``[DONE]``, in batches: the events that arrived together (one network read) come as one list, so they
        are relayed with one write. Raises UpstreamError when the stream cannot start or breaks. Closing it
        early (aclose) releases the connection or aborts the engine request."""

    async def close(self) -> None:
        """Release what the backend holds (connections, a loaded engine)."""
