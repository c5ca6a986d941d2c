"""`fastinfer serve` over time (issue 16): /metrics counters match the requests sent (this module's server serves
nothing else meanwhile, so the counts' changes are exact); a client that disconnects mid-stream stops its request and
its KV blocks return; SIGTERM under load lets in-flight requests finish, aborts the rest with a final error chunk after
--shutdown-timeout, refuses new connections and exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from serve_fixtures import MODEL, Server, assert_openai_error, metric, start_server as start, wait_until  # noqa: E402

LONG_PROMPT = "Shared prefix for the prefix cache, several blocks long: " + "one two three four " * 10
METRICS = ["fastinfer:num_requests_running", "fastinfer:num_requests_waiting", "fastinfer:kv_cache_usage_perc",
           "fastinfer:prompt_tokens_total", "fastinfer:generation_tokens_total", "fastinfer:request_success_total",
           "fastinfer:prefix_cache_queries_total", "fastinfer:prefix_cache_hits_total",
           "fastinfer:time_to_first_token_seconds_count", "fastinfer:inter_token_latency_seconds_count",
           "fastinfer:e2e_request_latency_seconds_count"]


# -- /metrics -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    s = start()
    yield s
    s.kill()


def test_metrics_parse_and_counters_match_the_requests(server):
    counted = server
    before = counted.metrics()
    assert metric(before, "fastinfer:num_requests_running") == metric(before, "fastinfer:num_requests_waiting") == 0

    def added(after, name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    client = counted.client()
    usages, reasons = [], []
    for _ in range(3):  # the same prompt three times: the second and third hit the prefix cache
        r = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=5, temperature=0.0,
                                      extra_body={"ignore_eos": True})
        usages.append(r.usage)
        reasons.append(r.choices[0].finish_reason)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=40, temperature=0.0)
    usages.append(chat.usage)
    reasons.append(chat.choices[0].finish_reason)
    chunks = list(client.completions.create(model=MODEL, prompt="Streamed", max_tokens=4, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usages.append(chunks[-1].usage)
    reasons.append(next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason))
    # Refused requests count nowhere.
    assert_openai_error(counted.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}), 400)
    assert_openai_error(counted.post("/v1/completions", {"model": "other", "prompt": "x"}), 404)
    assert reasons == ["length"] * 3 + ["stop", "length"]

    after = wait_until(lambda: (m := counted.metrics()) and added(m, "fastinfer:request_success_total") >= 5 and m,
                       10, "request_success_total grows by 5")
    names = {key.partition("{")[0] for key in after}
    assert set(METRICS) <= names, f"missing from /metrics: {set(METRICS) - names}"
    assert added(after, "fastinfer:request_success_total") == 5
    assert added(after, "fastinfer:request_success_total", finished_reason="length") == 4
    assert added(after, "fastinfer:request_success_total", finished_reason="stop") == 1
    assert added(after, "fastinfer:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert added(after, "fastinfer:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert added(after, "fastinfer:e2e_request_latency_seconds_count") == 5
    assert added(after, "fastinfer:time_to_first_token_seconds_count") == 5
    assert added(after, "fastinfer:inter_token_latency_seconds_count") > 0
    hits = added(after, "fastinfer:prefix_cache_hits_total")
    queries = added(after, "fastinfer:prefix_cache_queries_total")
    assert usages[2].prompt_tokens_details.cached_tokens > 0
    assert 0 < hits <= queries and hits >= sum(u.prompt_tokens_details.cached_tokens for u in usages[:3])
    assert metric(after, "fastinfer:num_requests_running") == 0 and metric(after, "fastinfer:num_requests_waiting") == 0
    assert metric(after, "fastinfer:kv_cache_usage_perc") == metric(before, "fastinfer:kv_cache_usage_perc")


def test_one_access_log_line_per_request(server):
    counted = server

    def lines(path):
        return [ln for ln in counted.log().splitlines() if path in ln]

    before = len(lines("GET /v1/models"))
    for _ in range(3):
        assert counted.http.get("/v1/models").status_code == 200
    assert counted.http.get("/v1/no-such-route").status_code == 404
    wait_until(lambda: len(lines("GET /v1/models")) >= before + 3, 5, "three access-log lines")
    time.sleep(0.3)
    new = lines("GET /v1/models")[before:]
    assert len(new) == 3 and all("200" in ln for ln in new), new
    assert len(lines("/v1/no-such-route")) == 1 and "404" in lines("/v1/no-such-route")[0]
    assert "Traceback" not in counted.log()


# -- a client that goes away --------------------------------------------------------------------------------------


def idle_again(server: Server, baseline: float):
    m = server.metrics()
    ok = (metric(m, "fastinfer:num_requests_running") == 0 and metric(m, "fastinfer:num_requests_waiting") == 0
          and metric(m, "fastinfer:kv_cache_usage_perc") == baseline)
    return m if ok else None


def test_disconnect_mid_stream_stops_the_request(server):
    idle = server
    baseline = idle.metrics()
    kv0 = metric(baseline, "fastinfer:kv_cache_usage_perc")
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 450, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=idle.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        break
            assert got == 3
            running = idle.metrics()
            assert metric(running, "fastinfer:num_requests_running") == 1
            assert metric(running, "fastinfer:kv_cache_usage_perc") > kv0
        # Leaving the block closes the connection with the stream unfinished.
    after = wait_until(lambda: idle_again(idle, kv0), 20, "running 0 and KV usage back to its baseline")
    tokens = "fastinfer:generation_tokens_total"
    assert metric(after, tokens) - metric(baseline, tokens) < 450  # stopped, not run to max_tokens
    aborted = "fastinfer:request_success_total"
    assert metric(after, aborted, finished_reason="abort") - metric(baseline, aborted, finished_reason="abort") == 1
    time.sleep(1.0)  # nothing keeps generating for it
    assert metric(idle.metrics(), tokens) == metric(after, tokens)


def test_openai_client_closing_a_chat_stream_stops_it(server):
    idle = server
    kv0 = metric(idle.metrics(), "fastinfer:kv_cache_usage_perc")
    client = idle.client()
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Write an essay."}],
                                            max_tokens=450, temperature=0.0, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    wait_until(lambda: idle_again(idle, kv0), 20, "running 0 and KV usage back to its baseline")
    r = client.completions.create(model=MODEL, prompt="Still there?", max_tokens=3, temperature=0.0)
    assert r.usage.completion_tokens >= 1
    assert "Traceback" not in idle.log()


def test_timed_out_non_streamed_request_stops(server):
    """A client that gives up on a non-streamed request (its read timeout) disconnects: the request is aborted."""
    kv0 = metric(server.metrics(), "fastinfer:kv_cache_usage_perc")
    body = {"model": MODEL, "prompt": "An endless story:", "max_tokens": 450, "temperature": 0.0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    wait_until(lambda: idle_again(server, kv0), 20, "running 0 and KV usage back to its baseline")


def test_sigint_when_idle_exits_0(server):
    """Last in this module: it stops the module's server."""
    idle = server
    idle.proc.send_signal(signal.SIGINT)
    assert idle.proc.wait(timeout=30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{idle.url}/health", timeout=5)
    assert "Traceback" not in idle.log()


# -- SIGTERM under load -------------------------------------------------------------------------------------------


def test_sigterm_under_load_drains_then_exits_0():
    # 2 s: the short requests finish well within it, the 450-token one cannot (even at 200 tok/s)
    server = start("--shutdown-timeout", "2")
    try:
        short = [{"prompt": f"Short request {i}:", "max_tokens": 12} for i in range(3)]
        jobs = short + [{"prompt": "A long request:", "max_tokens": 450}]
        events: list[list] = [[] for _ in jobs]
        started = [threading.Event() for _ in jobs]
        failures: list = []

        def stream(i):
            body = {"model": MODEL, "temperature": 0.0, "ignore_eos": True, "stream": True, **jobs[i]}
            try:
                with httpx.Client(base_url=server.url, timeout=60) as c:
                    with c.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200, r.read()
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                data = line[len("data: "):]
                                events[i].append(data if data == "[DONE]" else json.loads(data))
                                started[i].set()
            except Exception as err:  # reported below, with the stream it happened in
                failures.append((i, repr(err)))
            finally:
                started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(timeout=60)
        assert not failures, failures
        sigterm_at = time.monotonic()
        server.terminate()

        # New work is refused while the server drains: the listening socket is closed, or a 503.
        time.sleep(0.5)
        try:
            r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "late", "max_tokens": 2},
                           timeout=10)
        except httpx.TransportError:
            pass
        else:
            assert_openai_error(r, 503)

        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures
        for i in range(len(short)):  # finished normally
            finishes = [ch["finish_reason"] for e in events[i] if isinstance(e, dict) for ch in e.get("choices", [])
                        if ch.get("finish_reason")]
            assert finishes == ["length"], (i, events[i][-3:])
            assert events[i][-1] == "[DONE]"
        long_events = [e for e in events[-1] if isinstance(e, dict)]
        errors = [e["error"] for e in long_events if "error" in e]
        assert len(errors) == 1 and errors[0]["message"], long_events[-3:]
        assert "error" in long_events[-1], long_events[-3:]  # the error is the final chunk
        assert not any(ch.get("finish_reason") == "length" for e in long_events for ch in e.get("choices", []))

        assert server.proc.wait(timeout=30) == 0
        assert time.monotonic() - sigterm_at >= 1.8  # the long request had its --shutdown-timeout
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)
        assert "Traceback" not in server.log(), server.log()[-4000:]
    finally:
        server.kill()
