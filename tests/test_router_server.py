"""`fastinfer serve --config` and `fastinfer generate --config` end to end: a real router process in front of fake
OpenAI-compatible upstreams (tests/fake_upstream.py, child processes on 127.0.0.1) and in-process fastinfer engines.
Nothing here talks to anything but 127.0.0.1; every request loop is bounded in count and time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

for _mod in ("fastapi", "uvicorn", "httpx", "openai", "yaml", "pydantic", "prometheus_client"):
    pytest.importorskip(_mod)

import httpx  # noqa: E402
import openai  # noqa: E402

from fake_upstream import FakeUpstream, start_fakes  # noqa: E402
from serve_fixtures import Server, metric, sse_events, wait_until  # noqa: E402

SECRET = "sk-upstream-9f3a61c2"  # the key the config reads from the environment; must never leak
ROUTER_KEY = "router-key-77"
LOCAL_ENGINE = "{dtype: float32, kv_cache_memory_bytes: 64MiB, max_model_len: 512}"


@pytest.fixture(scope="module")
def fakes():
    started = start_fakes("a", "b")
    yield started
    for f in started:
        f.stop()


@pytest.fixture(autouse=True)
def _reset(fakes):
    for f in fakes:
        f.reset()


def _write(tmp_path, text: str, name: str = "router.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _router(config_path: str, *flags: str, api_key: str | None = None, env: dict | None = None) -> Server:
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        s = Server("--config", config_path, *flags, *(["--api-key", api_key] if api_key else []), api_key=api_key)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        return s.wait_ready()
    except BaseException:
        s.kill()
        raise


def _chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, **extra}


def _remote_config(a: FakeUpstream, b: FakeUpstream) -> str:
    return f"""
model_list:
  - model_name: remote
    litellm_params: {{model: openai/up-a, api_base: {a.api_base}, api_key: os.environ/ROUTER_TEST_KEY}}
    model_info: {{id: dep-a}}
  - model_name: backup
    litellm_params: {{model: openai/up-b, api_base: {b.api_base}}}
    model_info: {{id: dep-b}}
router_settings:
  num_retries: 1
  fallbacks: [{{remote: [backup]}}]
  allowed_fails: 2
  cooldown_time: 30
"""


@pytest.fixture(scope="module")
def remote_router(fakes, tmp_path_factory):
    a, b = fakes
    path = _write(tmp_path_factory.mktemp("router"), _remote_config(a, b))
    s = _router(path, api_key=ROUTER_KEY, env={"ROUTER_TEST_KEY": SECRET})
    yield s
    s.kill()


def _all_header_values(fake: FakeUpstream) -> list[str]:
    return [v for r in fake.stats()["requests"] for v in r["headers"].values()]


def test_api_key_protects_the_router_and_never_travels_upstream(remote_router, fakes):
    a, _ = fakes
    s = remote_router
    assert httpx.post(f"{s.url}/v1/chat/completions", json=_chat("remote"), timeout=10).status_code == 401
    bad = httpx.post(f"{s.url}/v1/chat/completions", json=_chat("remote"), timeout=10,
                     headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401
    assert httpx.get(f"{s.url}/router/status", timeout=10).status_code == 401
    assert a.hits() == 0
    r = s.post("/v1/chat/completions", _chat("remote"))
    assert r.status_code == 200, r.text
    seen = a.stats()["requests"][-1]["headers"]
    assert seen.get("authorization") == f"Bearer {SECRET}"  # os.environ/ROUTER_TEST_KEY reached the upstream
    assert not any(ROUTER_KEY in v for v in _all_header_values(a))  # the client's key did not


def test_answer_names_group_and_deployment(remote_router, fakes):
    client = remote_router.client()
    raw = client.chat.completions.with_raw_response.create(**_chat("remote"))
    reply = raw.parse()
    assert reply.model == "remote"
    assert reply.choices[0].message.content == "a says: w0 w1 w2 w3"
    assert raw.headers["x-fastinfer-deployment"] == "dep-a"
    assert raw.headers["x-fastinfer-attempts"] == "1"
    models = {m.id for m in client.models.list().data}
    assert models == {"remote", "backup"}


def test_streaming_through_the_router_equals_the_upstream(remote_router, fakes):
    a, _ = fakes
    direct = openai.OpenAI(base_url=a.api_base, api_key="x", max_retries=0, timeout=20)
    want = "".join(c.choices[0].delta.content or "" for c in direct.chat.completions.create(
        **_chat("up-a", max_tokens=12), stream=True) if c.choices)
    got_chunks = list(remote_router.client().chat.completions.create(**_chat("remote", max_tokens=12), stream=True))
    got = "".join(c.choices[0].delta.content or "" for c in got_chunks if c.choices)
    assert got == want and got.startswith("a says: ")
    assert {c.model for c in got_chunks} == {"remote"}
    assert all(c.usage is None for c in got_chunks)  # not asked for: the router's own usage chunk stays inside
    with_usage = list(remote_router.client().chat.completions.create(
        **_chat("remote"), stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 4


def test_stream_broken_after_first_event_ends_with_error_event_no_retry(remote_router, fakes):
    a, b = fakes
    a.configure(mode="cut", cut_after=2)
    with remote_router.http.stream("POST", "/v1/chat/completions", json=_chat("remote", stream=True),
                                   headers=remote_router.headers()) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2], events[-2]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if e.get("choices"))
    assert text == "a says: w0"  # the two content chunks sent before the cut
    assert a.hits() == 1 and b.hits() == 0  # committed at the first event: no retry, no fallback
    # counted as a failed answer, not a success
    m = remote_router.metrics()
    assert metric(m, "fastinfer:router_responses_total", model_group="remote", status="stream_error") == 1


@pytest.fixture
def fresh_router(fakes, tmp_path):
    """A router of its own (health and counters start clean)."""
    s = _router(_write(tmp_path, _remote_config(*fakes)), api_key=ROUTER_KEY, env={"ROUTER_TEST_KEY": SECRET})
    yield s
    s.kill()


def test_failing_group_falls_back_and_status_and_metrics_say_so(fresh_router, fakes):
    remote_router = fresh_router
    a, b = fakes
    a.configure(mode="status", status=500)
    r = remote_router.post("/v1/chat/completions", _chat("remote"))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "backup"
    assert r.headers["x-fastinfer-deployment"] == "dep-b"
    assert r.headers["x-fastinfer-attempts"] == "3"  # two tries at dep-a (num_retries 1), one at dep-b
    assert a.hits() == 2 and b.hits() == 1
    status = remote_router.http.get("/router/status", headers=remote_router.headers()).json()
    assert SECRET not in json.dumps(status)
    dep = {d["id"]: d for d in status["deployments"]}
    assert dep["dep-a"]["api_key"] == "<redacted>" and dep["dep-b"]["api_key"] is None
    assert dep["dep-a"]["healthy"] is False and dep["dep-a"]["cooldown_remaining_s"] > 0  # allowed_fails 2
    # cooled down: the next request goes straight to the fallback, dep-a gets nothing
    r = remote_router.post("/v1/chat/completions", _chat("remote"))
    assert r.status_code == 200 and r.headers["x-fastinfer-attempts"] == "1" and a.hits() == 2
    m = remote_router.metrics()
    assert metric(m, "fastinfer:router_requests_total", model_group="remote", deployment="dep-a", status="500") >= 2
    assert metric(m, "fastinfer:router_fallbacks_total", model_group="remote", fallback_group="backup") >= 2
    assert metric(m, "fastinfer:router_cooldowns_total", deployment="dep-a") >= 1
    assert metric(m, "fastinfer:router_retries_total", deployment="dep-a") >= 1
    assert metric(m, "fastinfer:router_completion_tokens_total", deployment="dep-b") >= 8


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_error_returned_once(remote_router, fakes, status):
    a, b = fakes
    a.configure(mode="status", status=status)
    r = remote_router.post("/v1/chat/completions", _chat("remote"))
    assert r.status_code == status
    assert r.json()["error"]["message"].startswith("fake upstream a")
    assert r.headers["x-fastinfer-attempts"] == "1"
    assert a.hits() == 1 and b.hits() == 0


def test_config_errors_are_one_line(tmp_path):
    cases = {
        "model_list:\n  - model_name: x\n    litellm_params: {model: openai/m, api_base: http://127.0.0.1:9/v1, "
        "foo: 1}\n": "foo",
        "model_list:\n  - model_name: x\n    litellm_params: {model: anthropic/claude}\n": "anthropic",
        "model_list:\n  - model_name: x\n    litellm_params: {model: fastinfer/default}\n"
        "router_settings: {redis_host: localhost}\n": "redis_host",
    }
    for i, (text, key) in enumerate(cases.items()):
        path = _write(tmp_path, text, f"bad{i}.yaml")
        for argv in (["serve", "--config", path, "--port", "0"],
                     ["generate", "--config", path, "-m", "x", "hello"]):
            r = subprocess.run([sys.executable, "-m", "fastinfer", *argv], capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL)
            assert r.returncode == 2, (argv, r.stderr)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and path in lines[0] and key in lines[0], r.stderr


def test_engine_flags_with_config_are_refused(tmp_path):
    path = _write(tmp_path, "model_list:\n  - model_name: x\n    litellm_params: {model: fastinfer/default}\n")
    r = subprocess.run([sys.executable, "-m", "fastinfer", "serve", "--config", path, "--max-model-len", "64"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--max-model-len" in r.stderr and "engine_args" in r.stderr


# ----------------------------------------------------------------------------------------------- local engines


def _local_or_skip() -> None:
    from model_fixtures import default_model_or_skip

    default_model_or_skip()


def test_local_engine_and_fakes_in_one_group_and_as_fallback(fakes, tmp_path):
    _local_or_skip()
    a, b = fakes
    config = f"""
model_list:
  - model_name: mixed
    litellm_params: {{model: fastinfer/default, engine_args: {LOCAL_ENGINE}}}
    model_info: {{id: mixed-local}}
  - model_name: mixed
    litellm_params: {{model: openai/up-a, api_base: {a.api_base}}}
    model_info: {{id: mixed-a}}
  - model_name: remote
    litellm_params: {{model: openai/up-b, api_base: {b.api_base}}}
    model_info: {{id: remote-b}}
  - model_name: local
    litellm_params: {{model: fastinfer/default, engine_args: {LOCAL_ENGINE}}}
    model_info: {{id: local-0}}
router_settings:
  num_retries: 1
  fallbacks: [{{remote: [local]}}]
"""
    s = _router(_write(tmp_path, config))
    try:
        greedy = {"temperature": 0, "max_tokens": 6}
        # both deployments of the group answer (provider.only picks one per request)
        r_local = s.post("/v1/chat/completions", _chat("mixed", **greedy, provider={"only": ["mixed-local"]}))
        r_fake = s.post("/v1/chat/completions", _chat("mixed", **greedy, provider={"only": ["mixed-a"]}))
        assert r_local.status_code == 200 and r_fake.status_code == 200, (r_local.text, r_fake.text)
        assert r_local.headers["x-fastinfer-deployment"] == "mixed-local"
        assert r_fake.json()["choices"][0]["message"]["content"].startswith("a says:")
        local_text = r_local.json()["choices"][0]["message"]["content"]
        assert local_text and r_local.json()["model"] == "mixed"
        # the fake down: every request of the group is answered by the local engine
        a.configure(mode="status", status=503)
        for _ in range(4):
            r = s.post("/v1/chat/completions", _chat("mixed", **greedy))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == local_text  # the same engine, greedy
        # a remote group whose only deployment is down falls back to the local group
        b.configure(mode="drop")
        r = s.post("/v1/chat/completions", _chat("remote", **greedy))
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "local" and r.headers["x-fastinfer-deployment"] == "local-0"
        # a local stream through the router is a proper stream
        with s.http.stream("POST", "/v1/chat/completions", json=_chat("local", **greedy, stream=True)) as st:
            events = sse_events(st)
        assert events[-1] == "[DONE]"
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
        assert streamed == local_text
        assert metric(s.metrics(), "fastinfer:num_requests_running", model_name="default") == 0
    finally:
        s.kill()


def test_two_local_models_with_max_loaded_models_one(tmp_path):
    _local_or_skip()
    config = """
model_list:
  - model_name: one
    litellm_params: {model: fastinfer/default, engine_args: {dtype: float32, kv_cache_memory_bytes: 32MiB,
                     max_model_len: 256}}
  - model_name: two
    litellm_params: {model: fastinfer/default, engine_args: {dtype: float32, kv_cache_memory_bytes: 32MiB,
                     max_model_len: 384}}
router_settings: {max_loaded_models: 1}
"""
    s = _router(_write(tmp_path, config))
    try:
        def engines() -> dict:
            status = s.http.get("/router/status").json()
            return {d["model_group"]: d["engine"] for d in status["deployments"]}

        assert not engines()["one"]["loaded"] and not engines()["two"]["loaded"]  # loaded on first use
        for group, other in (("one", "two"), ("two", "one"), ("one", "two")):
            r = s.post("/v1/chat/completions", _chat(group, temperature=0))
            assert r.status_code == 200, r.text
            now = engines()
            assert now[group]["loaded"] and not now[other]["loaded"], now
        # max_model_len of the engine that answered: 300 prompt+output tokens fit "two" only
        long = {"model": "one", "prompt": "hi", "max_tokens": 300}
        r = s.post("/v1/completions", long)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        s.kill()


@pytest.fixture
def preload_config(tmp_path):
    _local_or_skip()
    return _write(tmp_path, f"model_list:\n  - model_name: local\n    litellm_params: {{model: fastinfer/default, "
                            f"engine_args: {LOCAL_ENGINE}}}\n")


def test_preload_loads_before_ready(preload_config):
    s = _router(preload_config, "--preload")
    try:
        status = s.http.get("/router/status").json()
        assert status["deployments"][0]["engine"]["loaded"] is True
    finally:
        s.kill()


# ----------------------------------------------------------------------------------------------- batch


def _batch_lines(n: int) -> list[dict]:
    lines = []
    for i in range(n):
        group = ("small", "big")[i % 2]
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": group, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 3}})
    return lines


def test_generate_config_batch_killed_and_resumed(fakes, tmp_path):
    a, b = fakes
    a.configure(delay=0.05)
    b.configure(delay=0.05)
    config = _write(tmp_path, f"""
model_list:
  - model_name: small
    litellm_params: {{model: openai/up-a, api_base: {a.api_base}}}
  - model_name: big
    litellm_params: {{model: openai/up-b, api_base: {b.api_base}}}
""")
    n = 60
    src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in _batch_lines(n)))
    argv = [sys.executable, "-m", "fastinfer", "generate", "--config", config, "-i", str(src), "-o", str(out),
            "--concurrency", "2", "--no-progress"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 8, 60, "8 output lines")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    first = out.read_bytes().count(b"\n")
    assert 8 <= first < n
    with open(out, "ab") as f:
        f.write(b'{"custom_id": "req-')  # what a kill in the middle of a write leaves
    r = subprocess.run(argv + ["--resume", "--concurrency", "8"], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [rec["custom_id"] for rec in records]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(n))  # every id exactly once
    for rec in records:
        i = int(rec["custom_id"].split("-")[1])
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        body = rec["response"]["body"]
        assert body["model"] == ("small", "big")[i % 2]
        assert body["choices"][0]["message"]["content"].startswith(("a says:", "b says:")[i % 2])
    assert a.hits() + b.hits() <= n + 2  # at most the requests in flight at the kill ran twice


def test_generate_config_line_without_group(fakes, tmp_path):
    a, _ = fakes
    config = _write(tmp_path, f"model_list:\n  - model_name: small\n    litellm_params: {{model: openai/up-a, "
                              f"api_base: {a.api_base}}}\n")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "x", "prompt": "hi"}\n{"id": "y", "prompt": "hi", "model": "small"}\n')
    r = subprocess.run([sys.executable, "-m", "fastinfer", "generate", "--config", config, "-i", str(src), "-o",
                        str(out), "--no-progress"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "line 1" in r.stderr and "--model" in r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [rec["id"] for rec in recs] == ["y"] and recs[0]["text"].startswith("a says:")
    # with --model the line without one goes to that group
    out.unlink()
    r = subprocess.run([sys.executable, "-m", "fastinfer", "generate", "--config", config, "-m", "small", "-i",
                        str(src), "-o", str(out), "--no-progress"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == ["x", "y"]


def test_sigterm_drains_then_aborts_a_stream_with_an_error_event(fakes, tmp_path):
    import threading

    a, _ = fakes
    a.configure(chunk_delay=0.2)
    s = _router(_write(tmp_path, _remote_config(*fakes)), "--shutdown-timeout", "1", env={"ROUTER_TEST_KEY": SECRET})
    events: list = []
    try:
        def read() -> None:
            with s.http.stream("POST", "/v1/chat/completions", json=_chat("remote", stream=True, max_tokens=40)) as r:
                events.extend(sse_events(r))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_until(lambda: a.stats()["in_flight"] == 1, 10, "the stream upstream")
        s.terminate()
        reader.join(20)
        assert not reader.is_alive()
        assert s.proc.wait(timeout=20) == 0
    finally:
        s.kill()
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 503 and "shutting down" in events[-2]["error"]["message"]
    assert len(events) > 3  # what came before the abort was relayed
