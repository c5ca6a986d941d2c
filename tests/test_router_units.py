"""The router's pieces on their own: error classification, Retry-After parsing, key scrubbing, the cooldown clock
and the strategies' orders (no servers)."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

for _mod in ("httpx", "yaml", "pydantic", "prometheus_client"):
    pytest.importorskip(_mod)

import httpx  # noqa: E402

from fastinfer.router.backend import UpstreamError, error_body  # noqa: E402
from fastinfer.router.config import DeploymentSpec  # noqa: E402
from fastinfer.router.deployment import Deployment  # noqa: E402
from fastinfer.router.request import parse_route  # noqa: E402
from fastinfer.router.strategy import rank, sort_by  # noqa: E402
from fastinfer.router.upstream import retry_after_seconds, scrub  # noqa: E402


def _dep(id: str, **kw) -> Deployment:
    spec = DeploymentSpec(group="g", id=id, index=0, provider="openai", model="m", api_base="http://127.0.0.1:1/v1",
                          **kw)
    return Deployment(spec, backend=None)


@pytest.mark.parametrize("status,retryable", [(400, False), (401, False), (403, False), (404, False),
                                              (422, False), (408, True), (429, True), (500, True), (502, True),
                                              (503, True), (504, True)])
def test_status_classification(status, retryable):
    err = UpstreamError(status, error_body("x", "t"))
    assert err.retryable is retryable
    assert err.context_window is False


@pytest.mark.parametrize("kind", ["timeout", "connection", "stream"])
def test_transport_failures_are_retryable(kind):
    assert UpstreamError(502, error_body("x", "t"), kind=kind).retryable


@pytest.mark.parametrize("body", [
    error_body("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens", "x"),
    error_body("bad", "invalid_request_error", "context_length_exceeded"),
    error_body("the request exceeds the available context size", "exceed_context_size_error"),
])
def test_context_window_errors(body):
    err = UpstreamError(400, body)
    assert err.context_window and not err.retryable


def test_retry_after_forms():
    assert retry_after_seconds(httpx.Headers({"retry-after": "3"})) == 3.0
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(httpx.Headers({"retry-after": when})) <= 31
    assert retry_after_seconds(httpx.Headers({})) is None
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({"retry-after": "-5"})) == 0.0


def test_scrub_removes_the_key_everywhere():
    body = {"error": {"message": "Incorrect API key provided: sk-secret-1", "param": ["sk-secret-1"], "code": 401}}
    out = scrub(body, "sk-secret-1")
    assert "sk-secret-1" not in repr(out) and out["error"]["code"] == 401
    assert scrub(body, None) is body


def test_cooldown_after_allowed_fails_within_a_minute():
    d = _dep("a")
    t = 1000.0
    assert not d.failed(t, allowed_fails=3, cooldown_time=30, retry_after=None)
    assert not d.failed(t + 1, 3, 30, None)
    assert d.failed(t + 2, 3, 30, None)  # the third failure within the minute cools it down
    assert not d.available(t + 31) and d.available(t + 32.1)
    assert not d.available(t + 10)
    # failures spread over more than a minute do not add up
    e = _dep("e")
    assert not e.failed(t, 2, 30, None)
    assert not e.failed(t + 61, 2, 30, None)
    assert e.failed(t + 62, 2, 30, None)


def test_retry_after_holds_the_deployment_back():
    d = _dep("a")
    d.failed(100.0, allowed_fails=5, cooldown_time=30, retry_after=2.0)
    assert not d.available(101.0) and d.available(102.0)
    assert not d.cooled_down(101.0)


def test_cost_based_orders_by_price_then_load():
    cheap = _dep("cheap", input_cost_per_token=1e-7, output_cost_per_token=1e-7)
    dear = _dep("dear", input_cost_per_token=1e-6, output_cost_per_token=1e-6)
    rng = random.Random(0)
    for _ in range(20):
        assert rank("cost-based-routing", [dear, cheap], stream=False, now=0, tokens=0, rng=rng)[0] is cheap
    assert sort_by("price", [dear, cheap], stream=False)[0] is cheap


def test_least_busy_and_latency_orders():
    idle, busy = _dep("idle"), _dep("busy")
    busy.in_flight = 3
    rng = random.Random(0)
    assert rank("least-busy", [busy, idle], stream=False, now=0, tokens=0, rng=rng)[0] is idle
    fast, slow = _dep("fast"), _dep("slow")
    fast.latency, slow.latency = 0.01, 0.2
    picks = [rank("latency-based-routing", [slow, fast], stream=False, now=0, tokens=0, rng=rng)[0] for _ in range(400)]
    share = picks.count(fast) / len(picks)
    assert 0.9 <= share < 1.0  # mostly the fast one, with some exploration
    new = _dep("new")  # never measured: tried first
    assert rank("latency-based-routing", [fast, new], stream=False, now=0, tokens=0, rng=rng)[0] is new


def test_usage_based_respects_rpm():
    a, b = _dep("a", rpm=2), _dep("b", rpm=100)
    now = 120.0
    for _ in range(2):
        a.started(now)
        a.finished()
    order = rank("usage-based-routing", [a, b], stream=False, now=now, tokens=10, rng=random.Random(0))
    assert order == [b]
    assert rank("usage-based-routing", [a], stream=False, now=now, tokens=10, rng=random.Random(0)) == []
    assert rank("usage-based-routing", [a], stream=False, now=now + 60, tokens=10, rng=random.Random(0)) == [a]


def test_simple_shuffle_weights():
    heavy, light = _dep("heavy", weight=9.0), _dep("light", weight=1.0)
    rng = random.Random(1)
    picks = [rank("simple-shuffle", [heavy, light], stream=False, now=0, tokens=0, rng=rng)[0] for _ in range(2000)]
    assert 0.85 <= picks.count(heavy) / 2000 <= 0.95


@pytest.mark.parametrize("body,status,param", [
    ({"messages": []}, 400, "model"),
    ({"model": "nope"}, 404, "model"),
    ({"model": "g", "models": ["nope"]}, 404, "models"),
    ({"model": "g", "models": "g"}, 400, "models"),
    ({"model": "g", "provider": {"sort": "cheapest"}}, 400, "provider.sort"),
    ({"model": "g", "provider": {"zdr": True}}, 400, "provider.zdr"),
    ({"model": "g", "provider": {"bogus": 1}}, 400, "provider.bogus"),
    ({"model": "g", "provider": {"max_price": {"prompt": -1}}}, 400, "provider.max_price.prompt"),
    ({"model": "g", "provider": {"max_price": {"image": 1}}}, 400, "provider.max_price.image"),
    ({"model": "g", "provider": {"allow_fallbacks": "no"}}, 400, "provider.allow_fallbacks"),
    ({"model": "g", "stream": "yes"}, 400, "stream"),
])
def test_bad_routing_fields(body, status, param):
    with pytest.raises(UpstreamError) as info:
        parse_route(body, {"g"})
    assert info.value.status == status
    assert info.value.body["error"]["param"] == param


def test_routing_fields_are_not_forwarded():
    req = parse_route({"model": "g", "models": ["g"], "provider": {"sort": "price", "max_price": {"prompt": 1}},
                       "temperature": 0}, {"g"})
    assert req.forward == {"model": "g", "temperature": 0}
    assert req.sort == "price" and req.max_prompt_price == pytest.approx(1e-6)


def _sse_response(chunks: list[bytes]) -> httpx.Response:
    async def body():
        for c in chunks:
            yield c
    return httpx.Response(200, content=body())


def _collect(chunks: list[bytes]) -> tuple[list[list[dict]], Exception | None]:
    import asyncio

    from fastinfer.router.upstream import _events

    spec = DeploymentSpec(group="g", id="d", index=0, provider="openai", model="m", api_base="http://h/v1")
    out: list[list[dict]] = []

    async def run() -> Exception | None:
        try:
            async for batch in _events(spec, _sse_response(chunks), 5.0):
                out.append(batch)
        except UpstreamError as err:
            return err
        return None

    return out, asyncio.run(run())


def test_sse_parsing_batches_split_reads_crlf_and_comments():
    batches, err = _collect([b': keep-alive\n\ndata: {"a": 1}\n\ndata: {"a"', b': 2}\r\n\r\ndata:{"a": 3}\n\n',
                             b"event: x\ndata: [DONE]\n\n"])
    assert err is None
    assert batches == [[{"a": 1}], [{"a": 2}, {"a": 3}]]


def test_sse_error_event_after_events_of_the_same_read():
    batches, err = _collect([b'data: {"a": 1}\n\ndata: {"error": {"message": "boom", "code": 503}}\n\n'])
    assert batches == [[{"a": 1}]]
    assert err is not None and err.kind == "stream" and err.status == 503


def test_sse_end_without_done_is_broken():
    batches, err = _collect([b'data: {"a": 1}\n\n'])
    assert batches == [[{"a": 1}]] and err is not None and err.kind == "stream"


def test_a_deployment_refusing_stream_options_still_streams():
    import asyncio

    from fastinfer.router.backend import Backend
    from fastinfer.router.config import parse_config
    from fastinfer.router.router import Router

    class Strict(Backend):
        """An older OpenAI-compatible server: rejects stream_options."""

        def __init__(self) -> None:
            self.bodies: list[dict] = []

        async def complete(self, body, chat, timeout):
            raise AssertionError("not used")

        async def stream(self, body, chat, timeout):
            self.bodies.append(dict(body))
            if "stream_options" in body:
                raise UpstreamError(400, error_body("Unrecognized request argument supplied: stream_options",
                                                    "invalid_request_error"))
            yield [{"id": "x", "model": body["model"], "choices": [{"index": 0, "delta": {"content": "hi"}}]}]

    cfg = parse_config("model_list:\n  - model_name: g\n    litellm_params: {model: openai/m, "
                       "api_base: 'http://127.0.0.1:9/v1'}\n")

    async def run():
        router = Router(cfg)
        strict = Strict()
        router.deployments["g-0"].backend = strict
        texts = []
        for _ in range(2):
            stream = await router.open_stream({"model": "g", "messages": [], "stream": True}, True)
            texts.append(b"".join([c async for c in stream.events()]))
        await router.aclose()
        return strict.bodies, texts

    bodies, texts = asyncio.run(run())
    assert ["stream_options" in b for b in bodies] == [True, False, False]  # asked once, then never again
    assert all(b'"content": "hi"' in t and t.endswith(b"data: [DONE]\n\n") for t in texts)
