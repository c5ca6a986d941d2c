"""The fake OpenAI-compatible upstream (tests/fake_upstream.py) that the router's tests and benchmark use: every
behaviour, seen through httpx and through the official openai client. Everything talks to 127.0.0.1 only; every
client has a timeout of a few seconds and every loop a bounded count."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import fake_upstream  # noqa: E402
from fake_upstream import DEFAULTS, FakeUpstream, reply_pieces, reply_text, start_fakes  # noqa: E402

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say something nice"}]
PROMPT_WORDS = 5  # the words in MESSAGES' contents
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def fakes():
    started = start_fakes("alpha", "beta")
    yield started
    for fake in started:
        fake.stop()


@pytest.fixture(scope="module")
def alpha(fakes) -> FakeUpstream:
    return fakes[0]


@pytest.fixture(scope="module")
def beta(fakes) -> FakeUpstream:
    return fakes[1]


@pytest.fixture(autouse=True)
def _reset_fakes(fakes):
    for fake in fakes:
        fake.reset()


@pytest.fixture(scope="module")
def http(alpha):
    with httpx.Client(base_url=alpha.api_base, timeout=TIMEOUT, trust_env=False) as client:
        yield client


def make_client(fake: FakeUpstream, timeout: float = TIMEOUT, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.api_base, api_key=api_key, max_retries=0, timeout=timeout,
                         http_client=httpx.Client(trust_env=False, timeout=timeout))


@pytest.fixture(scope="module")
def client(alpha):
    c = make_client(alpha)
    yield c
    c.close()


def chat_body(**kw) -> dict:
    return {"model": "my-model", "messages": MESSAGES, **kw}


def sse_payloads(response) -> list:
    """The data payloads of an SSE response, in order; '[DONE]' stays a string, the rest are parsed JSON."""
    import json

    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def read_until_error(http, path: str, body: dict) -> tuple[list, Exception | None]:
    """Stream a request, collecting the SSE payloads, until its end or a transport error (returned)."""
    import json

    got: list = []
    try:
        with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    got.append(data if data == "[DONE]" else json.loads(data))
    except httpx.TransportError as e:
        return got, e
    return got, None


def content_of(payload, chat: bool):
    if not isinstance(payload, dict) or not payload["choices"]:
        return None
    choice = payload["choices"][0]
    return choice["delta"].get("content") or None if chat else (choice["text"] or None)


# ------------------------------------------------------------------------------------------------ start, names


def test_two_fakes_listen_on_loopback_with_their_own_names(alpha, beta):
    for fake in (alpha, beta):
        assert fake.url.startswith("http://127.0.0.1:") and fake.api_base == fake.url + "/v1"
        assert fake.proc.poll() is None
    assert alpha.url != beta.url
    with make_client(beta) as c:
        r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    assert r.choices[0].message.content == "beta says: w0 w1"
    assert beta.hits() == 1 and alpha.hits() == 0


# ------------------------------------------------------------------------------------------------ ok: non-stream


def test_chat_completion_httpx(http):
    r = http.post("/chat/completions", json=chat_body())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    j = r.json()
    assert j["object"] == "chat.completion" and j["model"] == "my-model" and j["id"].startswith("chatcmpl-")
    assert isinstance(j["created"], int)
    (choice,) = j["choices"]
    assert choice["message"] == {"role": "assistant", "content": reply_text("alpha", 8)}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    assert j["usage"] == {"prompt_tokens": PROMPT_WORDS, "completion_tokens": 8, "total_tokens": PROMPT_WORDS + 8}


def test_chat_completion_openai(client):
    r = client.chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=3)
    assert r.choices[0].message.content == "alpha says: w0 w1 w2" == reply_text("alpha", 3)
    assert r.model == "gpt-x" and r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (PROMPT_WORDS, 3, 8)


@pytest.mark.parametrize("fields, k", [({}, 8), ({"max_tokens": 0}, 1), ({"max_tokens": 5}, 5),
                                       ({"max_tokens": 1000}, 64), ({"max_completion_tokens": 4}, 4),
                                       ({"max_tokens": None, "max_completion_tokens": 2}, 2)])
def test_reply_length_is_max_tokens_clamped(http, fields, k):
    j = http.post("/chat/completions", json=chat_body(**fields)).json()
    assert j["choices"][0]["message"]["content"] == reply_text("alpha", k)
    assert j["usage"]["completion_tokens"] == k


def test_completions_endpoint(client, http):
    r = client.completions.create(model="base", prompt="one two three", max_tokens=2)
    assert r.object == "text_completion" and r.model == "base"
    assert r.choices[0].text == "alpha says: w0 w1" and r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 2)
    j = http.post("/completions", json={"model": "base", "prompt": ["a b", "c"], "max_tokens": 1}).json()
    assert j["choices"][0]["text"] == "alpha says: w0" and j["usage"]["prompt_tokens"] == 3


def test_models_list(client, alpha):
    assert [m.id for m in client.models.list()] == ["alpha"]
    alpha.configure(models=["m1", "m2"])
    assert [m.id for m in client.models.list()] == ["m1", "m2"]
    stats = alpha.stats()
    assert stats["models_hits"] == 2 and stats["hits"] == 0 and stats["requests"] == []


def test_unknown_path_and_wrong_method(http, alpha):
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/chat/completions").status_code == 405
    assert alpha.hits() == 0


def test_malformed_body_is_a_400_counted_as_failed(http, alpha):
    r = http.post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    stats = alpha.stats()
    assert (stats["hits"], stats["ok"], stats["failed"]) == (1, 0, 1)
    assert stats["requests"][-1]["body"] is None


# ------------------------------------------------------------------------------------------------ ok: streaming


def test_chat_stream_openai(client):
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert pieces == reply_pieces("alpha", 3) == ["alpha says: ", "w0", " w1", " w2"]
    assert "".join(pieces) == reply_text("alpha", 3)
    assert chunks[-1].choices[0].finish_reason == "stop" and not chunks[-1].choices[0].delta.content
    assert all(c.object == "chat.completion.chunk" and c.model == "m" and c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_wire_format(http):
    with http.stream("POST", "/chat/completions", json=chat_body(max_tokens=2, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    assert all("usage" not in p for p in payloads[:-1])  # only with stream_options.include_usage
    assert [content_of(p, True) for p in payloads[1:-2]] == reply_pieces("alpha", 2)


def test_stream_include_usage(client, http):
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_WORDS, 3)
    assert last.usage.total_tokens == PROMPT_WORDS + 3
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "stop"
    body = chat_body(max_tokens=1, stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/chat/completions", json=body) as r:
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    assert all("usage" in p and p["usage"] is None for p in payloads[:-2])  # present, null
    assert payloads[-2]["choices"] == [] and payloads[-2]["usage"]["completion_tokens"] == 1


def test_completions_stream(client):
    chunks = list(client.completions.create(model="base", prompt="a b", max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    texts = [c.choices[0].text for c in chunks[:-2]]
    assert texts == reply_pieces("alpha", 2) and "".join(texts) == reply_text("alpha", 2)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 2


# ------------------------------------------------------------------------------------------------ failure modes


@pytest.mark.parametrize("status", [400, 401, 404, 408, 429, 500, 503])
def test_status_mode(http, alpha, status):
    alpha.configure(mode="status", status=status, retry_after=7)
    r = http.post("/chat/completions", json=chat_body())
    assert r.status_code == status and r.headers["retry-after"] == "7"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] is None
    assert "alpha" in err["message"] and str(status) in err["message"]
    assert err["type"] == ("server_error" if status >= 500 else err["type"])
    alpha.configure(retry_after=None)
    assert "retry-after" not in http.post("/completions", json={"model": "m", "prompt": "x"}).headers
    stats = alpha.stats()
    assert (stats["hits"], stats["ok"], stats["failed"]) == (2, 0, 2)


@pytest.mark.parametrize("status, error", [(400, "BadRequestError"), (401, "AuthenticationError"),
                                           (404, "NotFoundError"), (429, "RateLimitError"),
                                           (500, "InternalServerError"), (503, "InternalServerError")])
def test_status_mode_openai_errors(client, alpha, status, error):
    alpha.configure(mode="status", status=status, retry_after=2)
    with pytest.raises(getattr(openai, error)) as info:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == status and info.value.response.headers["retry-after"] == "2"
    if status == 429:
        assert info.value.code == "rate_limit_exceeded"


def test_context_mode(client, http, alpha):
    alpha.configure(mode="context")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
    assert info.value.code == "context_length_exceeded"
    assert "This model's maximum context length is 4096 tokens. However, you requested" in info.value.message
    r = http.post("/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_timeout_mode_trips_the_client_timeout(alpha):
    alpha.configure(mode="timeout", hang=10)
    t0 = time.monotonic()
    with make_client(alpha, timeout=1.0) as c, pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="m", messages=MESSAGES)
    assert time.monotonic() - t0 < 5
    # The client closed its connection: the fake stops hanging and counts a disconnect.
    stats = alpha.wait_stats(lambda s: s["in_flight"] == 0)
    assert (stats["hits"], stats["failed"], stats["disconnects"]) == (1, 1, 1)


def test_timeout_mode_answers_after_hang(http, alpha):
    alpha.configure(mode="timeout", hang=0.3)
    t0 = time.monotonic()
    r = http.post("/chat/completions", json=chat_body(max_tokens=1))
    assert time.monotonic() - t0 >= 0.3
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "alpha says: w0"
    stats = alpha.stats()
    assert (stats["ok"], stats["failed"], stats["disconnects"]) == (0, 1, 0)  # an injected fault all the same


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("cut_after", [0, 2, 5])
def test_cut_mode_stream_httpx(http, alpha, chat, cut_after):
    alpha.configure(mode="cut", cut_after=cut_after)
    path, body = ("/chat/completions", chat_body(stream=True)) if chat else \
        ("/completions", {"model": "m", "prompt": "p", "stream": True})
    got, error = read_until_error(http, path, body)
    assert isinstance(error, httpx.RemoteProtocolError)  # an incomplete chunked body
    assert "[DONE]" not in got
    contents = [content_of(p, chat) for p in got]
    assert [c for c in contents if c is not None] == reply_pieces("alpha", 8)[:cut_after]
    assert len(got) == cut_after + (1 if chat else 0)  # chat: the role chunk first
    assert alpha.stats()["failed"] == 1


def test_cut_mode_stream_openai(client, alpha):
    alpha.configure(mode="cut")  # cut_after: 2 by default
    pieces, raised = [], None
    try:
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    except (openai.APIConnectionError, httpx.TransportError) as e:
        raised = e
    assert raised is not None
    assert pieces == ["alpha says: ", "w0"]


def test_cut_mode_without_stream_closes_with_no_response(http, client, alpha):
    alpha.configure(mode="cut")
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/chat/completions", json=chat_body())
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=MESSAGES)


def test_drop_mode(http, client, alpha):
    alpha.configure(mode="drop")
    with pytest.raises(httpx.TransportError):
        http.post("/chat/completions", json=chat_body())
    with pytest.raises(openai.APIConnectionError):
        client.completions.create(model="m", prompt="x")
    with pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    stats = alpha.stats()
    assert (stats["hits"], stats["ok"], stats["failed"], stats["in_flight"]) == (3, 0, 3, 0)
    alpha.configure(mode="ok")  # the server is fine afterwards
    assert http.post("/chat/completions", json=chat_body()).status_code == 200


def test_fail_first_then_ok(http, alpha):
    alpha.configure(mode="status", status=503, fail_first=2)
    codes = [http.post("/chat/completions", json=chat_body()).status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    stats = alpha.stats()
    assert (stats["hits"], stats["ok"], stats["failed"]) == (4, 2, 2) and stats["config"]["fail_first"] == 0


def test_fail_first_with_drop_through_openai(client, alpha):
    alpha.configure(mode="drop", fail_first=1)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content


def test_delay_and_chunk_delay(http, alpha):
    alpha.configure(delay=0.3)
    t0 = time.monotonic()
    assert http.post("/chat/completions", json=chat_body()).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    alpha.configure(delay=0, chunk_delay=0.05)
    t0 = time.monotonic()
    with http.stream("POST", "/chat/completions", json=chat_body(max_tokens=2, stream=True)) as r:
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]" and time.monotonic() - t0 >= 0.05 * (len(payloads) - 1)


def test_delay_applies_to_failures_too(http, alpha):
    alpha.configure(mode="status", status=500, delay=0.2)
    t0 = time.monotonic()
    assert http.post("/chat/completions", json=chat_body()).status_code == 500
    assert time.monotonic() - t0 >= 0.2


# ------------------------------------------------------------------------------------------------ stats, reset


def test_stats_record_headers_and_body(alpha):
    with make_client(alpha, api_key="sk-upstream-key") as c:
        c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, extra_headers={"X-Trace": "t1"})
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as h:
        h.post(alpha.api_base + "/completions", json={"model": "base", "prompt": "hi", "stream": True},
               headers={"Authorization": "Bearer other"})
    stats = alpha.stats()
    assert (stats["name"], stats["hits"], stats["ok"], stats["failed"]) == ("alpha", 2, 2, 0)
    first, second = stats["requests"]
    assert first["path"] == "/v1/chat/completions" and first["model"] == "m" and first["stream"] is False
    assert first["headers"]["authorization"] == "Bearer sk-upstream-key" and first["headers"]["x-trace"] == "t1"
    assert first["body"]["messages"] == MESSAGES and first["body"]["max_tokens"] == 2
    assert all(k == k.lower() for k in first["headers"])
    assert second["path"] == "/v1/completions" and second["stream"] is True
    assert second["headers"]["authorization"] == "Bearer other" and second["body"]["prompt"] == "hi"


def test_in_flight_and_max_in_flight(alpha):
    alpha.configure(delay=0.5)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=alpha.api_base, timeout=TIMEOUT, trust_env=False) as c:
            rs = await asyncio.gather(*[c.post("/chat/completions", json=chat_body()) for _ in range(6)])
        return [r.status_code for r in rs]

    assert asyncio.run(asyncio.wait_for(burst(), 10)) == [200] * 6
    stats = alpha.stats()
    assert (stats["hits"], stats["ok"], stats["in_flight"], stats["max_in_flight"]) == (6, 6, 0, 6)


def test_reset_clears_counts_and_config(http, alpha):
    alpha.configure(mode="status", status=429, chunk_delay=0.5)
    http.post("/chat/completions", json=chat_body())
    assert alpha.hits() == 1
    alpha.reset()
    stats = alpha.stats()
    assert (stats["hits"], stats["ok"], stats["failed"], stats["max_in_flight"], stats["requests"]) == (0, 0, 0, 0, [])
    assert stats["config"] == DEFAULTS
    assert http.post("/chat/completions", json=chat_body()).status_code == 200


def test_config_is_validated(alpha):
    for bad in ({"mode": "nope"}, {"status": 200}, {"delay": -1}, {"cut_after": 1.5}, {"whatever": 1},
                {"fail_first": True}):
        with pytest.raises(ValueError):
            alpha.configure(**bad)
    assert alpha.stats()["config"] == DEFAULTS


def test_launch_defaults_survive_reset():
    with FakeUpstream("gamma", delay=0.0, mode="status", status=503, retry_after=1) as gamma:
        with httpx.Client(base_url=gamma.api_base, timeout=TIMEOUT, trust_env=False) as h:
            r = h.post("/chat/completions", json=chat_body())
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            gamma.configure(mode="ok")
            assert h.post("/chat/completions", json=chat_body()).status_code == 200
            gamma.configure(mode=None)  # null: back to the launch value
            assert h.post("/chat/completions", json=chat_body()).status_code == 503
            gamma.configure(mode="ok")
            gamma.reset()
            assert h.post("/chat/completions", json=chat_body()).status_code == 503
            assert gamma.stats()["hits"] == 1
        proc = gamma.proc
    assert proc.poll() is not None and not os.path.exists(gamma.log_path)
    gamma.stop()  # idempotent


def test_sequential_keep_alive_sanity(http, alpha):
    """Not a speed test (that is the benchmark's job): 200 sequential requests on one connection all succeed."""
    deadline = time.monotonic() + 15
    for i in range(200):
        assert time.monotonic() < deadline
        r = http.post("/chat/completions", json=chat_body(max_tokens=1, user=str(i)))
        assert r.status_code == 200
    stats = alpha.stats()
    assert (stats["hits"], stats["ok"], stats["max_in_flight"]) == (200, 200, 1)
    assert len(stats["requests"]) == 50 and stats["requests"][-1]["body"]["user"] == "199"


# ------------------------------------------------------------------------------------------------ the helper


def test_start_failure_reports_and_kills_the_child():
    with pytest.raises(RuntimeError, match="exited with status"):
        FakeUpstream("bad", status=99)  # the child rejects the launch config


def test_start_fakes_stops_the_started_ones_when_one_fails(monkeypatch):
    made = []

    class Spy(FakeUpstream):
        def __init__(self, name, **kw):
            if name == "boom":
                raise RuntimeError("boom")
            super().__init__(name, **kw)
            made.append(self)

    monkeypatch.setattr(fake_upstream, "FakeUpstream", Spy)
    with pytest.raises(RuntimeError, match="boom"):
        start_fakes("fine", "boom")
    assert len(made) == 1 and made[0].proc.poll() is not None


def test_child_exits_when_its_parent_dies():
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from fake_upstream import FakeUpstream; "
            "f = FakeUpstream('orphan'); print(f.proc.pid, f.log_path, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(fake_upstream.__file__)],
                         capture_output=True, text=True, timeout=30)
    pid, log_path = out.stdout.split()
    pid = int(pid)
    os.unlink(log_path)  # os._exit skipped the cleanup
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break  # exited; its new parent has not reaped it yet
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the orphaned fake upstream is still running")
    finally:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"fake_upstream.py" in f.read():
                    os.kill(pid, 9)
        except OSError:
            pass
