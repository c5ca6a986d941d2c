"""The router's routing semantics, in process: a ``Router`` built from a YAML config whose deployments are fake
OpenAI-compatible upstreams (tests/fake_upstream.py, child processes on 127.0.0.1), driven with ``complete`` and
``open_stream`` inside ``asyncio.run``. What each deployment saw is read from its fake's stats (hits, recorded
requests), never guessed from the router's own bookkeeping.

The HTTP layer (status codes on the wire, the client's Authorization never forwarded) is another module's job; here
the Router API has no client headers at all.

Deterministic where it can be: ``seed=0``, requests one after another unless concurrency is the point, and
``provider.order`` to make a deployment the first choice when a test needs a known first attempt. Every loop is
bounded in count and every scenario in time (``TEST_TIMEOUT``); the only timed assertions are the Retry-After wait
and the cooldown expiry (both loose).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

httpx = pytest.importorskip("httpx")
yaml = pytest.importorskip("yaml")
pytest.importorskip("pydantic")
pytest.importorskip("uvicorn")
prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fake_upstream import reply_text, start_fakes  # noqa: E402
from fastinfer.router.backend import UpstreamError  # noqa: E402
from fastinfer.router.config import parse_config  # noqa: E402
from fastinfer.router.router import Answer, Router  # noqa: E402

SECRET = "sk-routing-TEST-s3cr3t-9F27C1"  # distinctive: must reach the upstream, and show nowhere else
MESSAGES = [{"role": "user", "content": "hello there friend"}]  # 3 prompt "tokens" for the fakes
MAX_TOKENS = 4  # completion tokens of every answer (the fakes honour max_tokens)
TEST_TIMEOUT = 20.0  # seconds, one scenario at most
HTTP_TIMEOUT = 5.0


# ------------------------------------------------------------------------------------------------ fixtures, helpers


@pytest.fixture(scope="module")
def fakes():
    started = start_fakes("a", "b", "c")
    yield dict(zip("abc", started))
    for fake in started:
        fake.stop()


@pytest.fixture(autouse=True)
def _reset_fakes(fakes):
    for fake in fakes.values():
        fake.reset()


@pytest.fixture
def a(fakes):
    return fakes["a"]


@pytest.fixture
def b(fakes):
    return fakes["b"]


@pytest.fixture
def c(fakes):
    return fakes["c"]


def dep(group: str, fake, id: str | None = None, *, info: dict | None = None, **params) -> dict:
    """One model_list entry: ``group`` served by ``fake`` as model ``m-<fake>``, id ``id`` (default: the fake's
    name), more litellm_params in ``params`` and model_info fields in ``info``."""
    return {"model_name": group,
            "litellm_params": {"model": f"openai/m-{fake.name}", "api_base": fake.api_base, **params},
            "model_info": {"id": id or fake.name, **(info or {})}}


def config(*entries: dict, **router_settings) -> str:
    data: dict = {"model_list": list(entries)}
    if router_settings:
        data["router_settings"] = router_settings
    return yaml.safe_dump(data, sort_keys=False)


def run(cfg: str, scenario, environ: dict | None = None, timeout: float = TEST_TIMEOUT):
    """``await scenario(router)`` with a fresh Router on ``cfg`` (seed 0), closed at the end; bounded in time."""

    async def main():
        router = Router(parse_config(cfg, environ=environ or {}), seed=0)
        try:
            return await scenario(router)
        finally:
            await router.aclose()

    return asyncio.run(asyncio.wait_for(main(), timeout))


def body(model: str | None = "g", **kw) -> dict:
    out = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, **kw}
    if model is not None:
        out["model"] = model
    return out


def first(*names: str) -> dict:
    """provider preferences that make these deployments the first choices, in this order."""
    return {"order": list(names)}


async def ask(router: Router, model: str | None = "g", **kw) -> Answer:
    return await router.complete(body(model, **kw), chat=True)


async def refused(router: Router, model: str | None = "g", **kw) -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        await router.complete(body(model, **kw), chat=True)
    return info.value


def answered_by(answer: Answer) -> str:
    """The fake that wrote the answer (its name opens the reply text)."""
    return answer.body["choices"][0]["message"]["content"].split(" says:")[0]


def sse(chunks: list[bytes]) -> list:
    """The payloads of the router's SSE chunks: parsed JSON, or the string "[DONE]"."""
    out = []
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n"), chunk
        data = chunk[len(b"data: "):-2].decode()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def stream(router: Router, model: str = "g", chat: bool = True, **kw):
    """(the RelayedStream, its payloads) of one streamed request read to its end."""
    req = body(model, stream=True, **kw) if chat else {"model": model, "prompt": "hello there friend",
                                                       "max_tokens": MAX_TOKENS, "stream": True, **kw}
    s = await router.open_stream(req, chat=chat)
    chunks = []
    async with contextlib.aclosing(s.events()) as events:
        async for chunk in events:
            chunks.append(chunk)
            assert len(chunks) < 200
    return s, sse(chunks)


def text_of(payloads: list, chat: bool = True) -> str:
    out = []
    for p in payloads:
        if isinstance(p, dict) and p.get("choices"):
            choice = p["choices"][0]
            out.append((choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or "")
    return "".join(out)


def direct_stream(fake, req: dict, chat: bool = True) -> list:
    """The payloads of the same stream asked of the fake directly (not through the router)."""
    path = "/chat/completions" if chat else "/completions"
    out = []
    with httpx.Client(base_url=fake.api_base, timeout=HTTP_TIMEOUT, trust_env=False) as http:
        with http.stream("POST", path, json=req) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    out.append(data if data == "[DONE]" else json.loads(data))
    return out


def direct_error(fake, status: int) -> dict:
    """The error body the fake answers with when told to answer ``status`` (asked directly; then back to ok)."""
    fake.configure(mode="status", status=status)
    with httpx.Client(base_url=fake.api_base, timeout=HTTP_TIMEOUT, trust_env=False) as http:
        r = http.post("/chat/completions", json=body("m"))
    assert r.status_code == status
    fake.reset()
    return r.json()


def hits(*fakes) -> tuple[int, ...]:
    return tuple(f.stats()["hits"] for f in fakes)


def deployment_status(router: Router, id: str) -> dict:
    (entry,) = [d for d in router.status()["deployments"] if d["id"] == id]
    return entry


def samples(router: Router) -> dict:
    """{(sample name, frozenset of label items): value} of everything in the router's registry."""
    text = prometheus_client.generate_latest(router.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(router: Router, name: str, **labels) -> float:
    return samples(router).get((name, frozenset(labels.items())), 0.0)


def away_from_minute_edge(margin: float = 5.0) -> None:
    """rpm counts reset when ``time.monotonic() // 60`` changes: start a short rpm test well inside a minute."""
    left = 60.0 - time.monotonic() % 60.0
    if left < margin:
        time.sleep(left + 0.05)


# ------------------------------------------------------------------------------------------------ retries


FAULTS = {
    "500": dict(mode="status", status=500),
    "502": dict(mode="status", status=502),
    "503": dict(mode="status", status=503),
    "504": dict(mode="status", status=504),
    "408": dict(mode="status", status=408),
    "429": dict(mode="status", status=429),
    "drop": dict(mode="drop"),
    "cut": dict(mode="cut"),  # a non-streaming request: the connection closed with no response
    "timeout": dict(mode="timeout"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_retryable_failure_is_retried_on_the_other_deployment(a, b, fault):
    a.configure(**FAULTS[fault])
    cfg = config(dep("g", a, timeout=0.5), dep("g", b))

    async def scenario(router):
        answer = await ask(router, provider=first("a"))
        assert (answer.group, answer.deployment, answer.attempts) == ("g", "b", 2)
        assert answered_by(answer) == "b" and answer.body["model"] == "g"
        outcome = {"timeout": "timeout", "drop": "connection_error", "cut": "connection_error"}.get(fault, fault)
        assert sample(router, "fastinfer:router_requests_total", model_group="g", deployment="a",
                      status=outcome) == 1
        assert sample(router, "fastinfer:router_retries_total", model_group="g", deployment="b") == 1

    run(cfg, scenario)
    assert hits(a, b) == (1, 1)


def test_a_lone_deployment_is_retried_up_to_num_retries(a):
    a.configure(mode="status", status=503, fail_first=2)
    cfg = config(dep("g", a), num_retries=2, allowed_fails=10)

    async def scenario(router):
        answer = await ask(router)
        assert (answer.deployment, answer.attempts) == ("a", 3)
        a.configure(mode="status", status=503, fail_first=None)  # every request fails from now on
        err = await refused(router)
        assert (err.status, err.attempts, err.deployment) == (503, 3, "a")

    run(cfg, scenario)
    assert hits(a) == (6,)


def test_retry_after_on_the_only_deployment_is_waited_out(a):
    a.configure(mode="status", status=429, retry_after=1, fail_first=1)
    cfg = config(dep("g", a), num_retries=2, allowed_fails=10)

    async def scenario(router):
        t0 = time.monotonic()
        answer = await ask(router)
        waited = time.monotonic() - t0
        assert (answer.deployment, answer.attempts) == ("a", 2)
        assert waited >= 0.9, f"the retry came {waited:.2f} s after a 429 with Retry-After: 1"

    run(cfg, scenario)
    assert hits(a) == (2,)


def test_retry_after_sends_the_retry_to_the_other_deployment_at_once(a, b):
    a.configure(mode="status", status=429, retry_after=1)
    cfg = config(dep("g", a), dep("g", b), num_retries=2, allowed_fails=10)

    async def scenario(router):
        t0 = time.monotonic()
        answer = await ask(router, provider=first("a"))
        assert (answer.deployment, answer.attempts) == ("b", 2)
        assert time.monotonic() - t0 < 0.9, "the retry waited for a's Retry-After although b was free"
        # a asked for a second's rest: the next requests do not go there, even when they prefer it
        for _ in range(3):
            assert (await ask(router, provider=first("a"))).deployment == "b"
        assert deployment_status(router, "a")["retry_after_until"] is not None

    run(cfg, scenario)
    assert hits(a, b) == (1, 4)


def test_a_group_held_back_by_retry_after_hands_over_to_its_fallback(a, b):
    a.configure(mode="status", status=429, retry_after=1, fail_first=1)
    cfg = config(dep("g", a), dep("h", b), num_retries=0, allowed_fails=10, fallbacks=[{"g": ["h"]}])

    async def scenario(router):
        answer = await ask(router)  # a: 429, Retry-After 1; no retries: the fallback answers
        assert (answer.group, answer.attempts) == ("h", 2)
        answer = await ask(router)  # a new request while a rests: nothing available in g
        assert (answer.group, answer.deployment, answer.attempts) == ("h", "b", 1)

    run(cfg, scenario)


def test_after_num_retries_the_next_group_in_fallbacks_answers(a, b, c):
    a.configure(mode="status", status=500)
    cfg = config(dep("g", a), dep("h", b), dep("k", c), num_retries=2, allowed_fails=10,
                 fallbacks=[{"g": ["h"]}, {"h": ["k"]}])

    async def scenario(router):
        answer = await ask(router)
        assert (answer.group, answer.deployment, answer.attempts) == ("h", "b", 4)
        assert answer.body["model"] == "h" and answered_by(answer) == "b"
        # h fails too: on to h's own fallback
        b.configure(mode="status", status=502)
        answer = await ask(router)
        assert (answer.group, answer.deployment, answer.attempts) == ("k", "c", 7)
        assert sample(router, "fastinfer:router_fallbacks_total", model_group="g", fallback_group="h",
                      reason="error") == 2
        assert sample(router, "fastinfer:router_fallbacks_total", model_group="h", fallback_group="k",
                      reason="error") == 1

    run(cfg, scenario)
    assert hits(a, b, c) == (6, 4, 1)


def test_default_fallbacks_catch_a_group_without_its_own(a, b):
    a.configure(mode="drop")
    cfg = config(dep("g", a), dep("h", b), num_retries=0, default_fallbacks=["h"])

    async def scenario(router):
        answer = await ask(router)
        assert (answer.group, answer.deployment, answer.attempts) == ("h", "b", 2)

    run(cfg, scenario)


def test_max_fallbacks_bounds_the_chain(a, b, c):
    for fake in (a, b):
        fake.configure(mode="status", status=500)
    cfg = config(dep("g", a), dep("h", b), dep("k", c), num_retries=0, max_fallbacks=1,
                 fallbacks=[{"g": ["h", "k"]}])

    async def scenario(router):
        err = await refused(router)
        assert (err.status, err.deployment, err.attempts) == (500, "b", 2)

    run(cfg, scenario)
    assert hits(a, b, c) == (1, 1, 0)


# ------------------------------------------------------------------------------------------------ context length


def test_context_length_error_goes_to_context_window_fallbacks_not_fallbacks(a, b, c):
    a.configure(mode="context")
    cfg = config(dep("g", a), dep("big", b), dep("other", c), num_retries=2,
                 fallbacks=[{"g": ["other"]}], context_window_fallbacks=[{"g": ["big"]}])

    async def scenario(router):
        answer = await ask(router)
        assert (answer.group, answer.deployment, answer.attempts) == ("big", "b", 2)
        assert answer.body["model"] == "big"
        assert sample(router, "fastinfer:router_fallbacks_total", model_group="g", fallback_group="big",
                      reason="context_window") == 1

    run(cfg, scenario)
    assert hits(a, b, c) == (1, 1, 0)  # not retried at a, and the error fallback not asked


def test_context_length_error_without_a_context_fallback_is_returned_as_is(a, b, c):
    a.configure(mode="context")
    cfg = config(dep("g", a), dep("g", b), dep("other", c), num_retries=2, allowed_fails=1,
                 fallbacks=[{"g": ["other"]}])

    async def scenario(router):
        err = await refused(router, provider=first("a"))
        assert err.status == 400
        assert err.body["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 4096 tokens" in err.body["error"]["message"]
        assert (err.attempts, err.deployment) == (1, "a")
        # the client's error says nothing about a's health
        assert deployment_status(router, "a")["healthy"] and deployment_status(router, "a")["failures"] == 0

    run(cfg, scenario)
    assert hits(a, b, c) == (1, 0, 0)
    upstream = a.stats()["requests"][-1]
    assert upstream["body"]["messages"] == MESSAGES


# ------------------------------------------------------------------------------------------------ client errors


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_returned_as_they_are_once(a, b, c, status):
    expected = direct_error(a, status)
    a.configure(mode="status", status=status)
    cfg = config(dep("g", a), dep("g", b), dep("other", c), num_retries=3, allowed_fails=1,
                 fallbacks=[{"g": ["other"]}])

    async def scenario(router):
        err = await refused(router, provider=first("a"))
        assert err.status == status
        assert err.body == expected
        assert (err.attempts, err.deployment) == (1, "a")
        entry = deployment_status(router, "a")
        assert entry["healthy"] and entry["failures"] == 0 and entry["recent_failures"] == 0
        assert router.status()["totals"]["retries"] == 0 and router.status()["totals"]["fallbacks"] == 0

    run(cfg, scenario)
    assert hits(a, b, c) == (1, 0, 0)


# ------------------------------------------------------------------------------------------------ cooldown


def test_a_cooled_down_deployment_gets_no_traffic_until_its_cooldown_ends(a, b, c):
    a.configure(mode="status", status=500)
    cooldown = 1.5
    cfg = config(dep("g", a), dep("g", b), dep("h", c), num_retries=1, allowed_fails=2, cooldown_time=cooldown,
                 fallbacks=[{"h": ["g"]}])

    async def scenario(router):
        for _ in range(2):  # two failures within the minute: cooled down
            answer = await ask(router, provider=first("a"))
            assert (answer.deployment, answer.attempts) == ("b", 2)
        cooled_at = time.monotonic()
        entry = deployment_status(router, "a")
        assert not entry["healthy"] and entry["cooldowns"] == 1 and 0 < entry["cooldown_remaining_s"] <= cooldown
        assert deployment_status(router, "b")["healthy"]
        assert sample(router, "fastinfer:router_cooldowns_total", model_group="g", deployment="a") == 1
        assert sample(router, "fastinfer:router_deployment_healthy", model_group="g", deployment="a") == 0
        assert hits(a) == (2,)

        a.reset()  # a is fine again, but the router does not know it before the cooldown ends
        for _ in range(5):
            assert (await ask(router, provider=first("a"))).deployment == "b"
        # retries: b fails once; the retry goes to b again, never to the cooled-down a
        b.configure(mode="status", status=500, fail_first=1)
        answer = await ask(router, provider=first("a"))
        assert (answer.deployment, answer.attempts) == ("b", 2)
        # fallbacks: h's only deployment fails; the fallback to g skips a
        c.configure(mode="status", status=500)
        answer = await ask(router, "h", provider=first("a"))
        assert (answer.group, answer.deployment) == ("g", "b")
        assert hits(a) == (0,)
        assert not deployment_status(router, "a")["healthy"], "the checks above outlasted the cooldown"

        deadline = time.monotonic() + cooldown + 5
        while not deployment_status(router, "a")["healthy"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert time.monotonic() - cooled_at >= cooldown - 0.2
        answer = await ask(router, provider=first("a"))
        assert (answer.deployment, answer.attempts) == ("a", 1)
        assert sample(router, "fastinfer:router_deployment_healthy", model_group="g", deployment="a") == 1

    run(cfg, scenario)
    assert hits(a) == (1,)


def test_fewer_failures_than_allowed_fails_do_not_cool_down(a, b):
    a.configure(mode="status", status=503)
    cfg = config(dep("g", a), dep("g", b), num_retries=1, allowed_fails=3, cooldown_time=30)

    async def scenario(router):
        for _ in range(2):
            assert (await ask(router, provider=first("a"))).deployment == "b"
        assert deployment_status(router, "a")["healthy"]
        assert deployment_status(router, "a")["recent_failures"] == 2
        assert (await ask(router, provider=first("a"))).deployment == "b"  # the third failure: cooled down
        assert not deployment_status(router, "a")["healthy"]
        for _ in range(3):
            assert (await ask(router, provider=first("a"))).deployment == "b"

    run(cfg, scenario)
    assert hits(a, b) == (3, 6)


def test_a_group_with_every_deployment_cooled_down_answers_503_or_falls_back(a, b):
    a.configure(mode="status", status=500)
    cfg = config(dep("g", a), dep("h", b), num_retries=0, allowed_fails=1, cooldown_time=30)

    async def scenario(router):
        err = await refused(router)
        assert err.status == 500
        err = await refused(router)
        assert err.status == 503 and err.body["error"]["code"] == "deployments_cooled_down"
        assert err.attempts == 0
        answer = await ask(router, models=["g", "h"])  # the next group of the request answers
        assert (answer.group, answer.deployment, answer.attempts) == ("h", "b", 1)

    run(cfg, scenario)
    assert hits(a, b) == (1, 1)


# ------------------------------------------------------------------------------------------------ availability


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_every_request_succeeds_while_a_deployment_of_the_group_is_healthy(a, b, c, fault):
    b.configure(**FAULTS[fault])
    cfg = config(dep("g", a), dep("g", b), dep("g", c))  # defaults: num_retries 2, allowed_fails 3

    async def scenario(router):
        answers = []
        for _ in range(3):
            answers += await asyncio.gather(*(ask(router) for _ in range(10)))
        assert len(answers) == 30
        assert {answered_by(x) for x in answers} <= {"a", "c"}
        assert {x.deployment for x in answers} <= {"a", "c"}
        assert all(x.group == "g" for x in answers)
        assert router.status()["totals"]["succeeded"] == 30 and router.status()["totals"]["failed"] == 0

    run(cfg, scenario)
    assert 1 <= hits(b)[0] <= 30


def test_every_request_succeeds_when_a_groups_only_deployment_is_down(a, b):
    a.configure(mode="drop")
    cfg = config(dep("g", a), dep("h", b), fallbacks=[{"g": ["h"]}])  # default allowed_fails 3, cooldown 5 s

    async def scenario(router):
        answers = [await ask(router) for _ in range(10)]
        assert all((x.group, x.deployment, x.body["model"]) == ("h", "b", "h") for x in answers)
        assert not deployment_status(router, "a")["healthy"]

    run(cfg, scenario)
    assert hits(a) == (3,)  # three failures (the first request: 1 + num_retries), then the cooldown
    assert hits(b) == (10,)


# ------------------------------------------------------------------------------------------------ streams


def test_a_stream_cut_after_its_first_events_ends_with_an_error_event_and_is_not_retried(a, b):
    a.configure(mode="cut", cut_after=2)
    cfg = config(dep("g", a), dep("g", b), num_retries=2)

    async def scenario(router):
        s, payloads = await stream(router, provider=first("a"))
        assert (s.deployment, s.attempts) == ("a", 1)
        assert payloads[-1] == "[DONE]"
        error = payloads[-2]
        assert set(error) == {"error"} and error["error"]["code"] == "upstream_stream_broken"
        chunks = payloads[:-2]
        assert text_of(chunks) == "a says: w0"
        assert all(p["model"] == "g" and "error" not in p for p in chunks)
        entry = deployment_status(router, "a")
        assert entry["failures"] == 1 and entry["in_flight"] == 0
        assert sample(router, "fastinfer:router_requests_total", model_group="g", deployment="a",
                      status="stream_error") == 1

    run(cfg, scenario)
    assert hits(a, b) == (1, 0)


@pytest.mark.parametrize("fault", ["500", "429", "drop", "timeout"])
def test_a_stream_failing_before_its_first_event_is_retried_and_clean(a, b, fault):
    a.configure(**FAULTS[fault])
    cfg = config(dep("g", a, timeout=0.5), dep("g", b))

    async def scenario(router):
        s, payloads = await stream(router, provider=first("a"))
        assert (s.deployment, s.attempts) == ("b", 2)
        assert payloads[-1] == "[DONE]"
        assert not any("error" in p for p in payloads[:-1])
        assert text_of(payloads) == reply_text("b", MAX_TOKENS)
        assert payloads[-2]["choices"][0]["finish_reason"] == "stop"

    run(cfg, scenario)
    assert hits(a, b) == (1, 1)


def test_a_stream_silent_mid_way_past_stream_timeout_ends_with_an_error_event(a, b):
    a.configure(chunk_delay=0.6)  # the first event at once, the next after 0.6 s
    cfg = config(dep("g", a, stream_timeout=0.3), dep("g", b))

    async def scenario(router):
        s, payloads = await stream(router, provider=first("a"))
        assert (s.deployment, s.attempts) == ("a", 1)
        assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
        assert payloads[-2]["error"]["code"] == "upstream_timeout" and payloads[-1] == "[DONE]"
        assert deployment_status(router, "a")["in_flight"] == 0

    run(cfg, scenario)
    assert hits(a, b) == (1, 0)


def test_a_stream_ending_before_any_event_is_retried(a, b):
    a.configure(mode="cut", cut_after=0)  # a text-completion stream: the connection closed before any event
    cfg = config(dep("g", a), dep("g", b))

    async def scenario(router):
        s, payloads = await stream(router, chat=False, provider=first("a"))
        assert (s.deployment, s.attempts) == ("b", 2)
        assert text_of(payloads, chat=False) == reply_text("b", MAX_TOKENS) and payloads[-1] == "[DONE]"

    run(cfg, scenario)
    assert hits(a, b) == (1, 1)


def test_a_stream_falls_back_to_the_next_group_before_its_first_event(a, b):
    a.configure(mode="status", status=503)
    cfg = config(dep("g", a), dep("h", b), num_retries=1, allowed_fails=10, fallbacks=[{"g": ["h"]}])

    async def scenario(router):
        s, payloads = await stream(router)
        assert (s.group, s.deployment, s.attempts) == ("h", "b", 3)
        assert all(p["model"] == "h" for p in payloads[:-1])
        assert text_of(payloads) == reply_text("b", MAX_TOKENS)

    run(cfg, scenario)
    assert hits(a, b) == (2, 1)


def _normal(payloads: list) -> list:
    """Payloads without what differs between two answers of the same fake (id, created) or the router's model."""
    drop = {"id", "created", "model"}
    return [p if isinstance(p, str) else {k: v for k, v in p.items() if k not in drop} for p in payloads]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_a_relayed_stream_equals_the_upstreams(b, chat, include_usage):
    cfg = config(dep("g", b))
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    expected = direct_stream(b, {**(body("m-b", stream=True) if chat else
                                    {"model": "m-b", "prompt": "hello there friend", "max_tokens": MAX_TOKENS,
                                     "stream": True}), **extra}, chat)

    async def scenario(router):
        s, payloads = await stream(router, chat=chat, **extra)
        assert (s.deployment, s.attempts) == ("b", 1)
        assert _normal(payloads) == _normal(expected)
        assert text_of(payloads, chat) == text_of(expected, chat) == reply_text("b", MAX_TOKENS)
        assert all(p["model"] == "g" for p in payloads[:-1])
        usage = [p for p in payloads[:-1] if "usage" in p]
        if include_usage:
            assert usage[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": MAX_TOKENS,
                                          "total_tokens": 3 + MAX_TOKENS}
            assert usage[-1]["choices"] == []
        else:
            assert usage == []
        # the router asked for the usage anyway, for its own accounting
        assert deployment_status(router, "b")["completion_tokens"] == MAX_TOKENS

    run(cfg, scenario)
    (req,) = b.stats()["requests"][-1:]
    assert req["path"] == ("/v1/chat/completions" if chat else "/v1/completions")
    assert req["body"]["stream"] is True and req["body"]["stream_options"]["include_usage"] is True


def test_a_stream_closed_early_releases_the_upstream(a):
    a.configure(chunk_delay=0.05)
    cfg = config(dep("g", a))

    async def scenario(router):
        s = await router.open_stream(body(stream=True, max_tokens=40), chat=True)
        got = []
        async with contextlib.aclosing(s.events()) as events:
            async for chunk in events:
                got.append(chunk)
                if len(got) == 2:
                    break
        await s.aclose()
        assert deployment_status(router, "a")["in_flight"] == 0
        a.wait_stats(lambda st: st["disconnects"] == 1 and st["in_flight"] == 0)

    run(cfg, scenario)


# ------------------------------------------------------------------------------------------------ strategies


def test_simple_shuffle_follows_weights(a, b):
    cfg = config(dep("g", a, weight=9), dep("g", b, weight=1), routing_strategy="simple-shuffle")

    async def scenario(router):
        for _ in range(10):
            await asyncio.gather(*(ask(router) for _ in range(20)))

    run(cfg, scenario)
    to_a, to_b = hits(a, b)
    assert to_a + to_b == 200
    assert 160 <= to_a <= 195, (to_a, to_b)


def test_simple_shuffle_without_weights_spreads_evenly(a, b, c):
    cfg = config(dep("g", a), dep("g", b), dep("g", c))

    async def scenario(router):
        for _ in range(5):
            await asyncio.gather(*(ask(router) for _ in range(18)))

    run(cfg, scenario)
    counts = hits(a, b, c)
    assert sum(counts) == 90 and min(counts) >= 15, counts


def test_least_busy_sends_to_the_deployment_with_fewest_in_flight(a, b):
    a.configure(delay=1.0)  # a holds each request a second; b answers at once
    cfg = config(dep("g", a), dep("g", b), routing_strategy="least-busy")

    async def scenario(router):
        tasks = []
        for _ in range(12):
            tasks.append(asyncio.ensure_future(ask(router)))
            await asyncio.sleep(0.04)
        answers = await asyncio.gather(*tasks)
        return [x.deployment for x in answers]

    picks = run(cfg, scenario)
    assert picks.count("a") <= 3, picks
    assert hits(a, b) == (picks.count("a"), picks.count("b"))


def test_latency_based_routing_prefers_the_faster_deployment(a, b):
    b.configure(delay=0.15)
    cfg = config(dep("g", a), dep("g", b), routing_strategy="latency-based-routing")

    async def scenario(router):
        for _ in range(4):  # warm-up: each deployment measured
            await ask(router)
        assert deployment_status(router, "a")["latency_s"] is not None
        assert deployment_status(router, "b")["latency_s"] is not None
        return [(await ask(router)).deployment for _ in range(40)]

    picks = run(cfg, scenario)
    assert picks.count("a") >= 36, picks


def test_cost_based_routing_picks_the_cheapest_healthy_deployment(a, b, c):
    cfg = config(dep("g", a, info={"input_cost_per_token": 3e-6, "output_cost_per_token": 3e-6}),
                 dep("g", b, info={"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}),
                 dep("g", c, info={"input_cost_per_token": 2e-6, "output_cost_per_token": 1e-6}),
                 routing_strategy="cost-based-routing", allowed_fails=1, cooldown_time=30)

    async def scenario(router):
        for _ in range(10):
            assert (await ask(router)).deployment == "b"
        b.configure(mode="status", status=500)
        answer = await ask(router)  # b fails (and cools down): the retry goes to the next cheapest
        assert (answer.deployment, answer.attempts) == ("c", 2)
        assert not deployment_status(router, "b")["healthy"]
        for _ in range(5):
            assert (await ask(router)).deployment == "c"

    run(cfg, scenario)
    assert hits(a, b, c) == (0, 11, 6)


def test_usage_based_routing_keeps_each_deployment_under_its_rpm(a, b):
    away_from_minute_edge()
    cfg = config(dep("g", a, rpm=3), dep("g", b), routing_strategy="usage-based-routing")

    async def scenario(router):
        picks = [(await ask(router, provider=first("a"))).deployment for _ in range(10)]
        assert picks == ["a"] * 3 + ["b"] * 7
        picks = await asyncio.gather(*(ask(router, provider=first("a")) for _ in range(10)))
        assert {x.deployment for x in picks} == {"b"}

    run(cfg, scenario)
    assert hits(a, b) == (3, 17)


def test_usage_based_routing_answers_429_when_every_deployment_is_at_its_limit(a, b):
    away_from_minute_edge()
    cfg = config(dep("g", a, rpm=3), dep("g", b, rpm=2), routing_strategy="usage-based-routing")

    async def scenario(router):
        answers = await asyncio.gather(*(ask(router) for _ in range(5)))
        assert sorted(x.deployment for x in answers) == ["a", "a", "a", "b", "b"]
        err = await refused(router)
        assert err.status == 429 and err.body["error"]["code"] == "deployments_busy"
        assert err.attempts == 0

    run(cfg, scenario)
    assert hits(a, b) == (3, 2)


def test_usage_based_routing_retries_on_the_deployment_with_room(a, b):
    away_from_minute_edge()
    cfg = config(dep("g", a), dep("g", b, rpm=1), routing_strategy="usage-based-routing", num_retries=2)

    async def scenario(router):
        assert (await ask(router, provider=first("b"))).deployment == "b"  # b's one request this minute
        a.configure(mode="status", status=500, fail_first=1)
        answer = await ask(router)  # a fails once; b has no room: the retry belongs to a
        assert (answer.deployment, answer.attempts) == ("a", 2)

    run(cfg, scenario)


def test_latency_based_routing_stops_trying_a_deployment_that_times_out(a, b):
    a.configure(mode="timeout")
    cfg = config(dep("g", a, timeout=0.2), dep("g", b), routing_strategy="latency-based-routing",
                 allowed_fails=100)  # no cooldown: the strategy alone must route around a

    async def scenario(router):
        for _ in range(8):
            assert (await ask(router)).deployment == "b"

    run(cfg, scenario)
    assert hits(a)[0] <= 2, hits(a, b)


def test_provider_sort_does_not_lift_a_deployments_rpm(a, b):
    away_from_minute_edge()
    cfg = config(dep("g", a, rpm=2, info={"input_cost_per_token": 1e-7}),
                 dep("g", b, info={"input_cost_per_token": 1e-6}), routing_strategy="usage-based-routing")

    async def scenario(router):
        picks = [(await ask(router, provider={"sort": "price"})).deployment for _ in range(6)]
        assert picks == ["a", "a"] + ["b"] * 4

    run(cfg, scenario)


# ------------------------------------------------------------------------------------------------ per request


def test_models_lists_the_groups_to_try_in_order(a, b, c):
    a.configure(mode="status", status=500)
    cfg = config(dep("g", a), dep("h", b), dep("k", c), num_retries=1, allowed_fails=10)

    async def scenario(router):
        answer = await ask(router, "g", models=["h", "k"])  # model first, then models
        assert (answer.group, answer.deployment, answer.attempts) == ("h", "b", 3)
        assert answer.body["model"] == "h"
        answer = await ask(router, None, models=["g", "k", "h"])  # no model: models alone
        assert (answer.group, answer.deployment, answer.attempts) == ("k", "c", 3)
        answer = await ask(router, None, models=["k", "g"])
        assert (answer.group, answer.deployment, answer.attempts) == ("k", "c", 1)

    run(cfg, scenario)
    assert hits(a, b, c) == (4, 1, 2)
    for req in a.stats()["requests"] + b.stats()["requests"]:
        assert "models" not in req["body"] and "provider" not in req["body"]


def test_unknown_model_is_404_and_unknown_group_in_models_too(a):
    cfg = config(dep("g", a))

    async def scenario(router):
        err = await refused(router, "nope")
        assert err.status == 404 and err.body["error"]["code"] == "model_not_found"
        assert "nope" in err.body["error"]["message"]
        err = await refused(router, "g", models=["nope"])
        assert err.status == 404 and err.body["error"]["param"] == "models"
        err = await refused(router, None)
        assert err.status == 400 and err.body["error"]["param"] == "model"
        with pytest.raises(UpstreamError) as info:
            await router.open_stream(body("nope", stream=True), chat=True)
        assert info.value.status == 404

    run(cfg, scenario)
    assert hits(a) == (0,)


@pytest.mark.parametrize("field", ["foo", "sort_by", "data_collection", "quantizations"])
def test_unknown_or_unsupported_provider_field_is_400_naming_it(a, field):
    cfg = config(dep("g", a))

    async def scenario(router):
        err = await refused(router, provider={"order": ["a"], field: "x"})
        assert err.status == 400
        assert err.body["error"]["param"] == f"provider.{field}"
        assert field in err.body["error"]["message"]
        err = await refused(router, provider={"max_price": {"prompt": 1, field: 2}})
        assert err.status == 400 and field in err.body["error"]["message"]

    run(cfg, scenario)
    assert hits(a) == (0,)


@pytest.mark.parametrize("value", [{"sort": "cheapest"}, {"order": "a"}, {"only": [""]}, {"ignore": [1]},
                                   {"allow_fallbacks": "no"}, {"max_price": 1}, {"max_price": {"prompt": -1}},
                                   "price"])
def test_bad_provider_values_are_400(a, value):
    cfg = config(dep("g", a))

    async def scenario(router):
        err = await refused(router, provider=value)
        assert err.status == 400 and err.body["error"]["param"].startswith("provider")

    run(cfg, scenario)
    assert hits(a) == (0,)


def three_prices(a, b, c, **settings) -> str:
    """g = a ($3/M in and out), b ($1/M), c ($2/M in, $1/M out); per-token prices in model_info."""
    return config(dep("g", a, info={"input_cost_per_token": 3e-6, "output_cost_per_token": 3e-6}),
                  dep("g", b, info={"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}),
                  dep("g", c, info={"input_cost_per_token": 2e-6, "output_cost_per_token": 1e-6}), **settings)


def test_provider_sort_price_tries_the_cheapest_first(a, b, c):
    cfg = three_prices(a, b, c, allowed_fails=10)

    async def scenario(router):
        for _ in range(8):
            assert (await ask(router, provider={"sort": "price"})).deployment == "b"
        b.configure(mode="status", status=500, fail_first=1)
        answer = await ask(router, provider={"sort": {"by": "price"}})
        assert (answer.deployment, answer.attempts) == ("c", 2)

    run(cfg, scenario)
    assert hits(a, b, c) == (0, 9, 1)


@pytest.mark.parametrize("key", ["latency", "throughput"])
def test_provider_sort_latency_and_throughput_prefer_the_faster(a, b, key):
    a.configure(delay=0.3)
    cfg = config(dep("g", a), dep("g", b))

    async def scenario(router):
        # nothing measured yet: config order
        assert (await ask(router, provider={"sort": key})).deployment == "a"
        assert (await ask(router, provider=first("b"))).deployment == "b"
        for _ in range(8):
            assert (await ask(router, provider={"sort": key})).deployment == "b"

    run(cfg, scenario)
    assert hits(a, b) == (1, 9)


@pytest.mark.parametrize("name", ["id", "model", "host:port"])
def test_provider_order_names_a_deployment_by_id_model_or_host_port(a, b, c, name):
    cfg = config(dep("g", a), dep("g", b, "b-id"), dep("g", c), num_retries=1)
    port = b.api_base.split("//")[1].split("/")[0]
    ref = {"id": "b-id", "model": "openai/m-b", "host:port": port}[name]

    async def scenario(router):
        for _ in range(6):
            assert (await ask(router, provider={"order": [ref]})).deployment == "b-id"
        for _ in range(6):  # only/ignore take the same names
            assert (await ask(router, provider={"only": [ref]})).deployment == "b-id"
            assert (await ask(router, provider={"ignore": [ref]})).deployment != "b-id"

    run(cfg, scenario)
    assert hits(b) == (12,)
    assert sum(hits(a, c)) == 6


def test_provider_order_is_followed_through_retries(a, b, c):
    a.configure(mode="status", status=500)
    b.configure(mode="status", status=502)
    cfg = config(dep("g", a), dep("g", b), dep("g", c), num_retries=2, allowed_fails=10)

    async def scenario(router):
        answer = await ask(router, provider=first("a", "b", "c"))
        assert (answer.deployment, answer.attempts) == ("c", 3)
        a_req, b_req = a.stats()["requests"][-1], b.stats()["requests"][-1]
        assert a_req["model"] == "m-a" and b_req["model"] == "m-b"

    run(cfg, scenario)
    assert hits(a, b, c) == (1, 1, 1)


def test_provider_only_never_leaves_its_deployments(a, b, c):
    b.configure(mode="status", status=500)
    cfg = config(dep("g", a), dep("g", b), dep("h", c), num_retries=2, allowed_fails=10, fallbacks=[{"g": ["h"]}])

    async def scenario(router):
        err = await refused(router, provider={"only": ["b"]})
        assert (err.deployment, err.attempts) == ("b", 3)
        for _ in range(4):
            assert (await ask(router, provider={"only": ["a", "c"]})).deployment == "a"

    run(cfg, scenario)
    assert hits(a, b, c) == (4, 3, 0)


def test_the_upstreams_error_is_returned_when_the_fallback_has_nothing_to_try(a, b, c):
    b.configure(mode="status", status=500)
    cfg = config(dep("g", a), dep("g", b), dep("h", c), num_retries=2, allowed_fails=10, fallbacks=[{"g": ["h"]}])

    async def scenario(router):
        err = await refused(router, provider={"only": ["b"]})
        assert (err.status, err.deployment, err.attempts) == (500, "b", 3)
        assert err.body == direct_body

    direct_body = direct_error(b, 500)
    b.configure(mode="status", status=500)
    run(cfg, scenario)


def test_provider_ignore_skips_deployments(a, b, c):
    cfg = config(dep("g", a), dep("g", b), dep("g", c))

    async def scenario(router):
        for _ in range(10):
            assert (await ask(router, provider={"ignore": ["a", "openai/m-c"]})).deployment == "b"
        err = await refused(router, provider={"ignore": ["a", "b", "c"]})
        assert err.status == 404 and err.body["error"]["code"] == "no_matching_deployment"

    run(cfg, scenario)
    assert hits(a, b, c) == (0, 10, 0)


def test_allow_fallbacks_false_keeps_to_order_and_to_the_group(a, b, c):
    a.configure(mode="status", status=500)
    cfg = config(dep("g", a), dep("g", b), dep("h", c), num_retries=2, allowed_fails=10, fallbacks=[{"g": ["h"]}])

    async def scenario(router):
        err = await refused(router, provider={"order": ["a"], "allow_fallbacks": False})
        assert (err.status, err.deployment) == (500, "a")
        b.configure(mode="status", status=500)
        err = await refused(router, provider={"allow_fallbacks": False})
        assert err.status == 500 and err.deployment in ("a", "b")
        answer = await ask(router)  # by default the configured fallback answers
        assert (answer.group, answer.deployment) == ("h", "c")

    run(cfg, scenario)
    assert hits(c) == (1,)
    assert hits(b)[0] >= 1


def test_max_price_is_in_dollars_per_million_tokens(a, b, c):
    cfg = three_prices(a, b, c)

    async def scenario(router):
        for _ in range(6):  # $1.5/M prompt: only b ($1/M)
            assert (await ask(router, provider={"max_price": {"prompt": 1.5}})).deployment == "b"
        for _ in range(6):  # $1.5/M completion: b and c ($1/M), not a ($3/M)
            assert (await ask(router, provider={"max_price": {"completion": 1.5}})).deployment in ("b", "c")
        for _ in range(6):  # both under $3/M: everyone
            await ask(router, provider={"max_price": {"prompt": 3, "completion": 3}})
        # a per-token number read as per million: nothing is that cheap
        err = await refused(router, provider={"max_price": {"prompt": 2e-6}})
        assert err.status == 404 and err.body["error"]["code"] == "no_matching_deployment"

    run(cfg, scenario)
    to_a, to_b, to_c = hits(a, b, c)
    assert to_a <= 6 and to_b >= 6 and to_a + to_b + to_c == 18


def test_max_price_excluding_a_group_moves_to_the_next_group(a, b):
    cfg = config(dep("g", a, info={"input_cost_per_token": 5e-6}), dep("h", b), fallbacks=[{"g": ["h"]}])

    async def scenario(router):
        answer = await ask(router, provider={"max_price": {"prompt": 1}})
        assert (answer.group, answer.deployment) == ("h", "b")

    run(cfg, scenario)
    assert hits(a, b) == (0, 1)


# ------------------------------------------------------------------------------------------------ headers, body


def test_the_upstream_gets_exactly_the_configured_key_and_headers(a, b):
    cfg = config(dep("g", a, api_key="os.environ/ROUTING_KEY", extra_headers={"X-Team": "blue", "X-Trace": "1"}),
                 dep("h", b))

    async def scenario(router):
        await ask(router, "g", temperature=0.5, user="u1")
        await stream(router, "g")
        await ask(router, "h")

    run(cfg, scenario, environ={"ROUTING_KEY": SECRET})
    for req in a.stats()["requests"]:
        headers = req["headers"]
        assert headers["authorization"] == f"Bearer {SECRET}"
        assert headers["x-team"] == "blue" and headers["x-trace"] == "1"
        assert req["model"] == "m-a"
        assert SECRET not in json.dumps(req["body"])
    non_stream = a.stats()["requests"][0]["body"]
    assert non_stream == {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0.5, "user": "u1",
                          "model": "m-a"}
    (req,) = b.stats()["requests"]
    assert "authorization" not in req["headers"] and "x-team" not in req["headers"]


# ------------------------------------------------------------------------------------------------ status, metrics


def test_status_redacts_the_key_and_follows_health_and_totals(a, b, c):
    a.configure(mode="status", status=500)
    cfg = config(dep("g", a, api_key="os.environ/ROUTING_KEY",
                     info={"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}),
                 dep("g", b, info={"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}),
                 dep("h", c),
                 # never asked: a password in an api_base URL is a secret too
                 dep("u", b, "u", api_base=b.api_base.replace("//", f"//user:{SECRET}-url@")),
                 num_retries=1, allowed_fails=2, cooldown_time=30, fallbacks=[{"h": ["g"]}])

    async def scenario(router):
        before = router.status()
        assert [d["healthy"] for d in before["deployments"]] == [True, True, True, True]
        assert before["groups"]["h"] == {"deployments": ["c"], "fallbacks": ["g"], "context_window_fallbacks": []}
        assert before["settings"]["allowed_fails"] == 2 and before["settings"]["num_retries"] == 1
        for _ in range(2):
            await ask(router, provider=first("a"))  # a fails, b answers: two retries, a cooled down
        c.configure(mode="status", status=503)
        answer = await ask(router, "h")  # c fails twice, then the fallback: b
        assert (answer.group, answer.deployment, answer.attempts) == ("g", "b", 3)
        c.reset()
        err = await refused(router, "h", provider={"only": ["c"], "allow_fallbacks": False})  # cooled: 503
        assert err.status == 503
        await stream(router, "g")
        return router.status()

    status = run(cfg, scenario, environ={"ROUTING_KEY": SECRET})
    assert SECRET not in json.dumps(status)
    by_id = {d["id"]: d for d in status["deployments"]}
    assert by_id["a"]["api_key"] == "<redacted>" and by_id["b"]["api_key"] is None
    assert by_id["u"]["api_base"] == b.api_base.replace("//", "//<redacted>@")
    assert not by_id["a"]["healthy"] and by_id["a"]["cooldown_remaining_s"] > 0 and by_id["a"]["cooldowns"] == 1
    assert by_id["a"]["cooldown_until"] is not None
    assert not by_id["c"]["healthy"] and by_id["b"]["healthy"] and by_id["b"]["cooldown_remaining_s"] == 0
    assert (by_id["a"]["requests"], by_id["a"]["successes"], by_id["a"]["failures"]) == (2, 0, 2)
    assert (by_id["b"]["requests"], by_id["b"]["successes"], by_id["b"]["failures"]) == (4, 4, 0)
    assert all(d["in_flight"] == 0 for d in status["deployments"])
    totals = status["totals"]
    assert {k: totals[k] for k in ("requests", "succeeded", "failed", "retries", "fallbacks")} == \
        {"requests": 5, "succeeded": 4, "failed": 1, "retries": 3, "fallbacks": 1}
    # four answers of 3 prompt + 4 completion tokens at $1/M and $2/M
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (12, 16)
    assert totals["cost"] == pytest.approx(4 * (3 * 1e-6 + 4 * 2e-6))


def test_metrics_count_attempts_retries_fallbacks_cooldowns_and_cost(a, b, c):
    a.configure(mode="status", status=500)
    cfg = config(dep("g", a), dep("g", b, info={"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}),
                 dep("h", c), num_retries=1, allowed_fails=2, cooldown_time=30, fallbacks=[{"h": ["g"]}])

    async def scenario(router):
        for _ in range(3):
            await ask(router, provider=first("a"))
        c.configure(mode="drop")
        await ask(router, "h")
        text = prometheus_client.generate_latest(router.registry).decode()
        assert "fastinfer:router_requests_total{" in text
        return samples(router)

    got = run(cfg, scenario)

    def value(name, **labels):
        return got.get((name, frozenset(labels.items())), 0.0)

    assert value("fastinfer:router_requests_total", model_group="g", deployment="a", status="500") == 2
    assert value("fastinfer:router_requests_total", model_group="g", deployment="b", status="200") == 4
    assert value("fastinfer:router_requests_total", model_group="h", deployment="c",
                 status="connection_error") == 2
    assert value("fastinfer:router_retries_total", model_group="g", deployment="b") == 2
    assert value("fastinfer:router_retries_total", model_group="h", deployment="c") == 1
    assert value("fastinfer:router_fallbacks_total", model_group="h", fallback_group="g", reason="error") == 1
    assert value("fastinfer:router_cooldowns_total", model_group="g", deployment="a") == 1
    assert value("fastinfer:router_cooldowns_total", model_group="h", deployment="c") == 1
    assert value("fastinfer:router_responses_total", model_group="g", status="200") == 4
    assert value("fastinfer:router_cost_dollars_total", model_group="g", deployment="b") == \
        pytest.approx(4 * (3 * 1e-6 + 4 * 2e-6))
    assert value("fastinfer:router_prompt_tokens_total", model_group="g", deployment="b") == 12
    assert value("fastinfer:router_completion_tokens_total", model_group="g", deployment="b") == 16
    assert value("fastinfer:router_request_latency_seconds_count", model_group="g", deployment="b") == 4
    assert value("fastinfer:router_deployment_healthy", model_group="g", deployment="a") == 0
    assert value("fastinfer:router_deployment_healthy", model_group="g", deployment="b") == 1
