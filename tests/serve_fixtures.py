"""A real `fastinfer serve` process for the server tests: start it on 127.0.0.1 with port 0, wait (bounded) for its
listening line and for /health, talk to it with httpx or the official openai client, and always kill it.

The modules that use it importorskip fastapi, uvicorn, openai and httpx first, so the core suite runs without them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

LISTENING = re.compile(r"^fastinfer serve: listening on http://([^:\s]+):(\d+)\s*$", re.M)
START_TIMEOUT = 60.0  # seconds to the listening line (Python and the server imports; no model yet)
READY_TIMEOUT = 120.0  # seconds from the listening line to /health 200 (the model load)
REQUEST_TIMEOUT = 60.0  # every single request
# Engine flags every test server shares: a small float32 cache, a short model length (cheap KV, easy to overflow).
ENGINE_FLAGS = ["--dtype", "float32", "--kv-cache-memory-bytes", "64MiB", "--max-model-len", "512"]


class Server:
    """One `python -m fastinfer serve` child; its stderr goes to a file (no pipe to fill up)."""

    def __init__(self, *flags: str, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.args = [sys.executable, "-m", "fastinfer", "serve", "--host", "127.0.0.1", "--port", "0", *flags]
        self._log = tempfile.NamedTemporaryFile(prefix="fastinfer-serve-", suffix=".log", delete=False)
        env = {k: v for k, v in os.environ.items() if k != "FASTINFER_API_KEY"}  # only --api-key sets the key
        env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.host, self.port = self._wait_listening()
        self.url = f"http://{self.host}:{self.port}"
        self.first_health = self._health_status()  # right after the listening line: the model is still loading
        self.http = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT)

    # -- lifetime ---------------------------------------------------------------------------------------------

    def log(self) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _fail(self, why: str) -> None:
        self.kill()
        raise RuntimeError(f"{why}\n$ {' '.join(self.args)}\n--- server log ---\n{self.log()[-6000:]}")

    def _wait_listening(self) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            m = LISTENING.search(self.log())
            if m:
                return m.group(1), int(m.group(2))
            if self.proc.poll() is not None:
                self._fail(f"the server exited with status {self.proc.returncode} before listening")
            time.sleep(0.02)
        self._fail(f"no listening line within {START_TIMEOUT:.0f} s")

    def _health_status(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=10).status_code
        except httpx.HTTPError:
            return None

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._health_status() == 200:
                return self
            if self.proc.poll() is not None:
                self._fail(f"the server exited with status {self.proc.returncode} while loading")
            time.sleep(0.1)
        self._fail(f"/health not 200 within {READY_TIMEOUT:.0f} s")

    def terminate(self) -> None:
        """SIGTERM (what a process manager sends); the caller waits for the exit."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Always safe: kills the child's whole process group if it is still there."""
        if getattr(self, "http", None) is not None:
            self.http.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._log.close()

    # -- clients ----------------------------------------------------------------------------------------------

    def client(self, api_key: str | None = None):
        """The official openai client, unmodified: no retries (a 429 must reach the test), bounded timeout."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "unused",
                             max_retries=0, timeout=REQUEST_TIMEOUT)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                                  timeout=REQUEST_TIMEOUT)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body=None, *, content: bytes | None = None, **kw) -> httpx.Response:
        if content is not None:
            return self.http.post(path, content=content, headers={"Content-Type": "application/json",
                                                                  **self.headers()}, **kw)
        return self.http.post(path, json=body, headers=self.headers(), **kw)

    def metrics(self) -> dict[str, float]:
        """/metrics parsed by prometheus_client's parser: sample name plus sorted labels -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        r = self.http.get("/metrics")
        assert r.status_code == 200, r.text
        out = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        have = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if kv) if rest else {}
        if base == name and all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def sse_events(response: httpx.Response) -> list:
    """A streamed response's SSE ``data:`` payloads, JSON-decoded ("[DONE]" kept as the string)."""
    events = []
    for line in response.iter_lines():
        if not line.strip():
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    """r has ``status`` and OpenAI's error body {"error": {"message", "type", "param", "code"}}; returns it."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not None:
        assert err["param"] == param, err
        assert param in err["message"], err
    return err


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll predicate() until it is truthy (returned) or ``timeout`` seconds pass (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


MODEL = "smol"  # the served model name the tests use


def start_server(*flags: str, api_key: str | None = None) -> "Server":
    """A ready server of the default model served as MODEL (the test skips without the model), killed if it
    fails to become ready."""
    from model_fixtures import default_model_or_skip

    default_model_or_skip()
    s = Server(*ENGINE_FLAGS, "--served-model-name", MODEL, *flags, api_key=api_key)
    try:
        return s.wait_ready()
    except BaseException:
        s.kill()
        raise
