"""A remote OpenAI-compatible deployment (vLLM, SGLang, llama-server, another fastinfer, OpenRouter, ...) reached
with httpx: pooled keep-alive connections shared by every remote deployment, a timeout per call, streams read
event by event as they arrive."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .backend import Backend, UpstreamError, error_body
from .config import DeploymentSpec

# Connections kept open per upstream host; the router's concurrency beyond it opens (and then closes) more.
KEEPALIVE_CONNECTIONS = 256
_MAX_ERROR_BODY = 64 * 1024  # bytes of an error answer read (and kept) at most


def make_client() -> httpx.AsyncClient:
    """The one pooled client all remote deployments share. No environment proxies or netrc credentials: the
    router sends exactly the headers a deployment's config gives."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE_CONNECTIONS,
                          keepalive_expiry=30.0)
    return httpx.AsyncClient(limits=limits, trust_env=False, follow_redirects=False)


class RemoteBackend(Backend):
    """One ``openai/<model>`` deployment."""

    def __init__(self, spec: DeploymentSpec, client: httpx.AsyncClient, user_agent: str) -> None:
        self.spec = spec
        self.client = client
        # Built once from the config alone: nothing of the client's request (its Authorization above all) is
        # ever forwarded.
        headers = {"content-type": "application/json", "accept": "application/json", "user-agent": user_agent}
        headers.update({k.lower(): v for k, v in spec.extra_headers})
        if spec.api_key:
            headers["authorization"] = f"Bearer {spec.api_key}"
        self.headers = headers
        self.stream_headers = {**headers, "accept": "text/event-stream"}

    def _url(self, chat: bool) -> str:
        return f"{self.spec.api_base}/{'chat/completions' if chat else 'completions'}"

    async def complete(self, body: dict, chat: bool, timeout: float) -> dict:
        payload = json.dumps(body, ensure_ascii=False).encode()
        try:
            async with asyncio.timeout(timeout):
                resp = await self.client.post(self._url(chat), content=payload, headers=self.headers,
                                              timeout=timeout)
        except (TimeoutError, httpx.TimeoutException):
            raise _timeout(self.spec, timeout) from None
        except httpx.HTTPError as err:
            raise _connection(self.spec, err) from None
        if resp.status_code != 200:
            raise _status_error(self.spec, resp, resp.content)
        try:
            data = json.loads(resp.content)
        except ValueError:
            data = None
        if not isinstance(data, dict) or "choices" not in data:
            raise UpstreamError(502, error_body(f"deployment {self.spec.id} answered with something that is not a "
                                                "completion", "upstream_error", "bad_upstream_response"))
        return data

    async def stream(self, body: dict, chat: bool, timeout: float) -> AsyncIterator[list[dict]]:
        payload = json.dumps(body, ensure_ascii=False).encode()
        request = self.client.build_request("POST", self._url(chat), content=payload, headers=self.stream_headers,
                                            timeout=httpx.Timeout(timeout))
        try:
            async with asyncio.timeout(timeout):
                resp = await self.client.send(request, stream=True)
        except (TimeoutError, httpx.TimeoutException):
            raise _timeout(self.spec, timeout) from None
        except httpx.HTTPError as err:
            raise _connection(self.spec, err) from None
        try:
            if resp.status_code != 200:
                raw = await _read_some(resp)
                raise _status_error(self.spec, resp, raw)
            async for event in _events(self.spec, resp, timeout):
                yield event
        finally:
            await resp.aclose()


async def _events(spec: DeploymentSpec, resp: httpx.Response, timeout: float) -> AsyncIterator[list[dict]]:
    """The JSON payloads of a server-sent-event stream until ``[DONE]``, a list per network read; an event that
    carries an ``error`` object, a broken connection or an end without ``[DONE]`` raises UpstreamError (kind
    "stream"). httpx's read timeout (the request's) bounds the wait for each read."""
    chunks = resp.aiter_bytes()
    pending = b""
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            raise _broken(spec, "the stream ended without [DONE]") from None
        except httpx.TimeoutException:
            raise UpstreamError(504, error_body(f"deployment {spec.id} sent nothing for {timeout:g} s mid-stream",
                                                "timeout", "upstream_timeout"), kind="stream") from None
        except httpx.HTTPError as err:
            raise _broken(spec, f"the stream broke: {type(err).__name__}") from None
        pending += chunk
        if b"\r" in pending and not pending.endswith(b"\r"):  # CRLF line ends: one form for the split
            pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *blocks, pending = pending.split(b"\n\n")
        batch, done, failure = [], False, None
        for block in blocks:
            try:
                event = _parse_block(spec, block)
            except UpstreamError as err:  # relay what came before it first
                failure = err
                break
            if event is _DONE:
                done = True
                break
            if event is not None:
                batch.append(event)
        if batch:
            yield batch
        if failure is not None:
            raise failure
        if done:
            await _drain(chunks)
            return


_DONE = object()


def _parse_block(spec: DeploymentSpec, block: bytes) -> Any:
    """One SSE event block: its JSON payload, _DONE for ``[DONE]``, None for comments and keep-alives."""
    data = [line[6:] if line.startswith(b"data: ") else line[5:] for line in block.split(b"\n")
            if line.startswith(b"data:")]
    if not data:
        return None
    text = b"\n".join(data).strip()
    if text == b"[DONE]":
        return _DONE
    try:
        event = json.loads(text)
    except ValueError:
        raise _broken(spec, "the stream sent an event that is not JSON") from None
    if not isinstance(event, dict):
        return None
    if "error" in event:
        status = _int_code(event.get("error"))
        body = event if isinstance(event.get("error"), dict) else error_body(str(event["error"]), "upstream_error")
        raise UpstreamError(status, scrub(body, spec.api_key), kind="stream")
    return event


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` (normally just the end of the chunked body), so the connection goes back to
    the pool instead of being closed; a few reads at most, then give up on reuse."""
    try:
        async with asyncio.timeout(1.0):
            for _ in range(8):
                await anext(chunks)
    except (StopAsyncIteration, TimeoutError, httpx.HTTPError):
        pass


def _int_code(err: Any) -> int:
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, int) and 400 <= code < 600 else 502


async def _read_some(resp: httpx.Response) -> bytes:
    """At most _MAX_ERROR_BODY bytes of an error answer (an upstream cannot make us hold a huge one)."""
    out = bytearray()
    try:
        async for chunk in resp.aiter_raw():
            out += chunk
            if len(out) >= _MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    return bytes(out[:_MAX_ERROR_BODY])


def _status_error(spec: DeploymentSpec, resp: httpx.Response, raw: bytes) -> UpstreamError:
    """The deployment's own error answer, kept as it is when it is an OpenAI error body."""
    try:
        body = json.loads(raw[:_MAX_ERROR_BODY])
    except ValueError:
        body = None
    if not (isinstance(body, dict) and "error" in body):
        text = raw[:500].decode("utf-8", "replace").strip() or resp.reason_phrase
        body = error_body(f"deployment {spec.id} answered {resp.status_code}: {text}",
                          "upstream_error", resp.status_code)
    return UpstreamError(resp.status_code, scrub(body, spec.api_key), retry_after=retry_after_seconds(resp.headers))


def scrub(value: Any, secret: str | None) -> Any:
    """``value`` with every occurrence of ``secret`` replaced: an upstream that quotes the key it was sent in its
    error ("invalid key sk-...") must not pass it on to the client or the log."""
    if not secret:
        return value
    if isinstance(value, str):
        return value.replace(secret, "<redacted>")
    if isinstance(value, dict):
        return {k: scrub(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secret) for v in value]
    return value


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Retry-After (seconds or an HTTP date) or OpenAI's retry-after-ms, as seconds >= 0; None without them."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _timeout(spec: DeploymentSpec, timeout: float) -> UpstreamError:
    return UpstreamError(504, error_body(f"deployment {spec.id} did not answer within {timeout:g} s", "timeout",
                                         "upstream_timeout"), kind="timeout")


def _connection(spec: DeploymentSpec, err: Exception) -> UpstreamError:
    return UpstreamError(502, error_body(f"cannot reach deployment {spec.id}: {type(err).__name__}",
                                         "upstream_error", "upstream_unreachable"), kind="connection")


def _broken(spec: DeploymentSpec, why: str) -> UpstreamError:
    return UpstreamError(502, error_body(f"deployment {spec.id}: {why}", "upstream_error", "upstream_stream_broken"),
                         kind="stream")
