"""Router overhead: `fastinfer serve --config` in front of a zero-delay fake OpenAI upstream, against calling the
fake directly.

    python bench/router.py                    # 5 rounds: 300 sequential requests and 2000 at 32 clients per phase
    python bench/router.py --quick            # 1 round, 30 sequential and 200 concurrent requests: a smoke test
    python bench/router.py --rounds 3 --requests 1000 --concurrency 16

Setup (everything on 127.0.0.1): one fake upstream (tests/fake_upstream.py, a raw ASGI app under uvicorn, in a
child process, no delay) and the router (`python -m fastinfer serve --config <tmp yaml> --port 0` in a child
process, one model group "bench" with one `openai/...` deployment on the fake, num_retries 0, its stderr in a
temporary file). The workload: POST /v1/chat/completions, one short user message, max_tokens 16 (a 16-word
reply; streamed: 20 server-sent events, [DONE] included), non-streaming and streaming ("stream": true, no
stream_options). "direct" sends the same body (its model the deployment's) straight to the fake.

Phases, each run on both sides, direct and router back to back (the first side alternates from round to round, so
that a slow spell of the machine hits both); every phase starts with untimed warm-up requests that open its
keep-alive connections:

- latency: one client sends --seq-requests requests one after another; per request the time from sending to the
  whole response read (for a stream: to its end, [DONE] included) and, streamed, to its first body bytes (the fake
  may send a whole short stream in one write, so direct first-byte and full times can be close). p50 and p99 per
  round. The
  router's added latency = median over rounds of the router's percentile - the same for direct (the median of the
  per-round differences is reported too);
- throughput: --concurrency clients share --requests requests (each sends its next one as soon as the previous has
  ended); requests/s = requests / wall time, latency p50/p99 under load, and the CPU seconds of the router, the
  fake and this client process per request (from /proc).

Every response must be HTTP 200 with the reply text the fake gives (tests/fake_upstream.reply_text), on both sides,
so the router's text equals the direct text; anything else stops the benchmark with an error.

The bench client (one process, one asyncio loop: uvloop when installed, one httpx.AsyncClient with one keep-alive
connection per concurrent client: a single AsyncClient shared by 32 tasks costs ~2 ms of CPU per request in
httpcore's connection-pool bookkeeping and made this process the bottleneck), the
router and the fake share the machine's cores (2 on the reference machine); a direct round has one server process
fewer competing for them. Targets from the issue: router p50 added latency <= 3 ms; router >= 300 requests/s at 32
clients; both modes. Results: bench/results/router-<machine>-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from timing import machine_info, write_result  # noqa: E402

TARGET_ADDED_P50_S = 0.003  # router p50 added latency
TARGET_RPS = 300.0  # router requests/s at 32 clients
TARGET_CONCURRENCY = 32
UPSTREAM_NAME = "bench"  # the fake's name: its replies start "bench says: "
UPSTREAM_MODEL = "fake-model"  # the deployment's model (what direct calls name)
GROUP = "bench"  # the router's model group
MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Say sixteen words, please."}]
KEY_ENV = "FASTINFER_BENCH_FAKE_KEY"
LISTEN_RE = re.compile(r"fastinfer serve: listening on (http://\S+)")
ROUTER_START_TIMEOUT_S = 60.0  # listening line, then /health 200
REQUEST_TIMEOUT = dict(timeout=10.0, connect=5.0)  # one request (httpx.Timeout)
PHASE_TIMEOUT_S = 300.0  # one phase of one side
MODES = ("nonstream", "stream")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cpu_s(pid: int) -> float | None:
    """utime + stime of a process so far (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def versions() -> dict:
    out = {}
    for name in ("httpx", "httpcore", "uvicorn", "fastapi", "starlette", "pydantic", "uvloop", "httptools", "h11",
                 "anyio", "prometheus_client", "PyYAML"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# -- the router subprocess --------------------------------------------------------------------------------------------

class RouterProcess:
    """`python -m fastinfer serve --config` on 127.0.0.1, port chosen by the OS, in its own session; its stderr goes
    to a temporary file."""

    def __init__(self, config_path: str, log_level: str | None) -> None:
        self.cmd = [sys.executable, "-m", "fastinfer", "serve", "--config", config_path,
                    "--host", "127.0.0.1", "--port", "0"]
        if log_level:
            self.cmd += ["--log-level", log_level]
        self.log_file = tempfile.NamedTemporaryFile(prefix="bench-router-", suffix=".log", delete=False)
        self.url: str | None = None
        env = {**os.environ, KEY_ENV: "sk-bench-not-a-secret", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.log_file, env=env, start_new_session=True, cwd=str(REPO))

    def log(self) -> str:
        try:
            with open(self.log_file.name, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait_ready(self, timeout_s: float) -> str:
        import httpx

        deadline = time.monotonic() + timeout_s
        while self.url is None:
            m = LISTEN_RE.search(self.log())
            if m:
                self.url = m.group(1).rstrip("/")
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode} before listening\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"router printed no listening line within {timeout_s:g} s\n{self.tail()}")
            time.sleep(0.05)
        with httpx.Client(timeout=5.0, trust_env=False) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"router exited with {self.proc.returncode} while starting\n{self.tail()}")
                try:
                    if c.get(self.url + "/health").status_code == 200:
                        return self.url
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"router /health not 200 within {timeout_s:g} s\n{self.tail()}")
                time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM to its process group, SIGKILL after timeout_s; the exit status (None if it would not die)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:  # anything left in its group (it should have none), or the router itself if it hung
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode

    def remove_log(self) -> None:
        self.log_file.close()
        try:
            os.unlink(self.log_file.name)
        except OSError:
            pass


def write_config(api_base: str) -> str:
    fd, path = tempfile.mkstemp(prefix="bench-router-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write("model_list:\n"
                f"  - model_name: {GROUP}\n"
                f"    litellm_params: {{model: openai/{UPSTREAM_MODEL}, api_base: '{api_base}', "
                f"api_key: os.environ/{KEY_ENV}}}\n"
                "router_settings: {num_retries: 0}\n")
    return path


# -- the client -------------------------------------------------------------------------------------------------------

class Side:
    """One target: its base URL, the body it gets (per mode, encoded once) and the processes serving it."""

    def __init__(self, name: str, url: str, model: str, pids: dict[str, int]) -> None:
        self.name, self.url, self.pids = name, url, pids
        self.payload = {mode: json.dumps({"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                                          **({"stream": True} if mode == "stream" else {})}).encode()
                        for mode in MODES}


class Failure(RuntimeError):
    pass


HEADERS = {"content-type": "application/json"}


async def nonstream_one(client, side: Side, expected: str) -> float:
    t0 = time.perf_counter()
    r = await client.post(side.url + "/v1/chat/completions", content=side.payload["nonstream"], headers=HEADERS)
    t1 = time.perf_counter()
    if r.status_code != 200:
        raise Failure(f"{side.name} non-streaming: HTTP {r.status_code}: {r.text[:300]}")
    try:
        text = r.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise Failure(f"{side.name} non-streaming: not a chat completion ({e!r}): {r.text[:300]}") from None
    if text != expected:
        raise Failure(f"{side.name} non-streaming: text {text!r} != expected {expected!r}")
    return t1 - t0


async def stream_one(client, side: Side, expected: str) -> tuple[float, float]:
    """(time to the first body bytes, time to the whole stream read). The events are parsed after the end, so
    that the client's per-chunk work stays small; they must hold the expected text and end with [DONE]."""
    t0 = time.perf_counter()
    first = None
    chunks: list[bytes] = []
    async with client.stream("POST", side.url + "/v1/chat/completions", content=side.payload["stream"],
                             headers=HEADERS) as r:
        if r.status_code != 200:
            raise Failure(f"{side.name} streaming: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for chunk in r.aiter_raw():
            if first is None:
                first = time.perf_counter()
            chunks.append(chunk)
    done = time.perf_counter()
    data = [line[5:].strip() for line in b"".join(chunks).decode().splitlines() if line.startswith("data:")]
    if not data or data[-1] != "[DONE]":
        raise Failure(f"{side.name} streaming: the stream did not end with [DONE]: {data[-1:]!r}")
    parts: list[str] = []
    for item in data[:-1]:
        event = json.loads(item)
        if "error" in event:
            raise Failure(f"{side.name} streaming: error event {item[:300]}")
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
    text = "".join(parts)
    if text != expected:
        raise Failure(f"{side.name} streaming: text {text!r} != expected {expected!r}")
    return first - t0, done - t0


async def one(client, side: Side, mode: str, expected: str) -> tuple[float | None, float]:
    if mode == "stream":
        return await stream_one(client, side, expected)
    return None, await nonstream_one(client, side, expected)


def make_client():
    """One client's httpx.AsyncClient: one keep-alive connection. (Each concurrent client has its own: one
    AsyncClient shared by 32 tasks spends ~2 ms of CPU per request in httpcore's pool bookkeeping, which scans
    every connection for every queued request, and would make this process the bottleneck.)"""
    import httpx

    return httpx.AsyncClient(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                                 keepalive_expiry=60.0),
                             timeout=httpx.Timeout(REQUEST_TIMEOUT["timeout"], connect=REQUEST_TIMEOUT["connect"]),
                             trust_env=False, follow_redirects=False)


async def run_requests(clients: list, side: Side, mode: str, expected: str, n: int
                       ) -> tuple[list[float], list[float], float]:
    """n requests shared by the clients, each sending its next request when its previous one has ended;
    (first-event times, full times, wall seconds)."""
    firsts: list[float] = []
    fulls: list[float] = []
    left = [n]

    async def worker(client) -> None:
        while left[0] > 0:
            left[0] -= 1
            f, t = await one(client, side, mode, expected)
            fulls.append(t)
            if f is not None:
                firsts.append(f)

    t0 = time.perf_counter()
    async with asyncio.timeout(PHASE_TIMEOUT_S):
        await asyncio.gather(*(worker(c) for c in clients[:n]))
    return firsts, fulls, time.perf_counter() - t0


async def phase(side: Side, mode: str, expected: str, n: int, concurrency: int, warmup: int) -> dict:
    """One measured phase on one side, with fresh clients whose connections the warm-up opens."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(make_client()) for _ in range(concurrency)]
        await run_requests(clients, side, mode, expected, warmup)
        cpu0 = {k: cpu_s(pid) for k, pid in side.pids.items()}
        my0 = time.process_time()
        load = os.getloadavg()[0]
        firsts, fulls, wall = await run_requests(clients, side, mode, expected, n)
        my1 = time.process_time()
        cpu1 = {k: cpu_s(pid) for k, pid in side.pids.items()}
    out = {"requests": n, "concurrency": concurrency, "wall_s": wall, "req_per_s": n / wall,
           "p50_s": pct(fulls, 50), "p99_s": pct(fulls, 99), "mean_s": statistics.fmean(fulls),
           "max_s": max(fulls), "load_1m_before": load,
           "client_cpu_ms_per_req": (my1 - my0) / n * 1e3}
    if firsts:
        out.update(first_byte_p50_s=pct(firsts, 50), first_byte_p99_s=pct(firsts, 99))
    for k in side.pids:
        a, b = cpu0[k], cpu1[k]
        out[f"{k}_cpu_ms_per_req"] = None if a is None or b is None else (b - a) / n * 1e3
    return out


async def bench(direct: Side, router: Side, expected: dict[str, str], args, log) -> list[dict]:
    rounds = []
    for r in range(args.rounds):
        order = (direct, router) if r % 2 == 0 else (router, direct)
        res: dict = {"round": r, "order": [s.name for s in order]}
        for mode in MODES:
            seq = {}
            for side in order:
                seq[side.name] = await phase(side, mode, expected[mode], args.seq_requests, 1, args.seq_warmup)
            load = {}
            for side in order:
                load[side.name] = await phase(side, mode, expected[mode], args.requests, args.concurrency,
                                              2 * args.concurrency)
            d, q = seq["direct"], seq["router"]
            added = {"p50_s": q["p50_s"] - d["p50_s"], "p99_s": q["p99_s"] - d["p99_s"]}
            if mode == "stream":
                added.update(first_byte_p50_s=q["first_byte_p50_s"] - d["first_byte_p50_s"],
                             first_byte_p99_s=q["first_byte_p99_s"] - d["first_byte_p99_s"])
            res[mode] = {"latency": seq, "added": added, "throughput": load,
                         "rps_ratio": load["router"]["req_per_s"] / load["direct"]["req_per_s"]}
            log(f"round {r} {mode:9s}: added p50 {added['p50_s'] * 1e3:6.2f} ms p99 {added['p99_s'] * 1e3:6.2f} ms"
                f" (direct p50 {d['p50_s'] * 1e3:.2f} ms, router {q['p50_s'] * 1e3:.2f} ms);"
                f" {args.concurrency} clients: router {load['router']['req_per_s']:6.0f} req/s,"
                f" direct {load['direct']['req_per_s']:6.0f} req/s (x{res[mode]['rps_ratio']:.2f});"
                f" router cpu {load['router'].get('router_cpu_ms_per_req') or float('nan'):.2f} ms/req")
        rounds.append(res)
    return rounds


def summarize(rounds: list[dict], concurrency: int) -> dict:
    out = {}
    for mode in MODES:
        rs = [r[mode] for r in rounds]

        def m(part: str, side: str, key: str) -> float | None:
            return med([r[part][side].get(key) for r in rs])

        lat = {side: {k: m("latency", side, k) for k in ("p50_s", "p99_s", "mean_s", "first_byte_p50_s",
                                                          "first_byte_p99_s") if rs[0]["latency"][side].get(k)
                      is not None} for side in ("direct", "router")}
        added = {k: lat["router"][k] - lat["direct"][k] for k in lat["router"]}
        added_per_round = {k: med([r["added"][k] for r in rs]) for k in rs[0]["added"]}
        tput = {side: {k: m("throughput", side, k) for k in rs[0]["throughput"][side]
                       if k not in ("requests", "concurrency")} for side in ("direct", "router")}
        ratio = med([r["rps_ratio"] for r in rs])
        row = {"latency": lat, "added_s": added, "added_median_of_round_differences_s": added_per_round,
               "throughput": tput, "rps_ratio_router_over_direct": ratio,
               "rps_ratio_per_round": [r["rps_ratio"] for r in rs],
               "targets": {"added_p50_s": TARGET_ADDED_P50_S, "added_p50_met": added["p50_s"] <= TARGET_ADDED_P50_S}}
        if concurrency == TARGET_CONCURRENCY:
            row["targets"].update(router_req_per_s=TARGET_RPS,
                                  router_req_per_s_met=tput["router"]["req_per_s"] >= TARGET_RPS)
        else:
            row["targets"].update(router_req_per_s=TARGET_RPS, router_req_per_s_met=None,
                                  note=f"the req/s target is for {TARGET_CONCURRENCY} clients; this run used "
                                       f"{concurrency}")
        out[mode] = row
    return out


def print_table(summary: dict, concurrency: int) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.2f}"

    print()
    print("| mode | direct p50 / p99 ms | router p50 / p99 ms | added p50 / p99 ms (target p50 <= 3) |"
          f" direct req/s @{concurrency} | router req/s @{concurrency} (target >= {TARGET_RPS:.0f}) | ratio |"
          " router CPU ms/req |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, row in summary.items():
        lat, add, tp, tg = row["latency"], row["added_s"], row["throughput"], row["targets"]
        met_l = "met" if tg["added_p50_met"] else "MISSED"
        met_r = {True: "met", False: "MISSED", None: "n/a"}[tg["router_req_per_s_met"]]
        print(f"| {mode} | {ms(lat['direct']['p50_s'])} / {ms(lat['direct']['p99_s'])} |"
              f" {ms(lat['router']['p50_s'])} / {ms(lat['router']['p99_s'])} |"
              f" {ms(add['p50_s'])} / {ms(add['p99_s'])} ({met_l}) |"
              f" {tp['direct']['req_per_s']:.0f} | {tp['router']['req_per_s']:.0f} ({met_r}) |"
              f" {row['rps_ratio_router_over_direct']:.2f} | {tp['router'].get('router_cpu_ms_per_req') or 0:.2f} |")
        if "first_byte_p50_s" in add:
            print(f"|   first byte | {ms(lat['direct']['first_byte_p50_s'])} /"
                  f" {ms(lat['direct']['first_byte_p99_s'])} | {ms(lat['router']['first_byte_p50_s'])} /"
                  f" {ms(lat['router']['first_byte_p99_s'])} | {ms(add['first_byte_p50_s'])} /"
                  f" {ms(add['first_byte_p99_s'])} | | | | |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="alternating direct/router rounds (default 5)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per throughput phase, shared by the concurrent clients (default 2000)")
    ap.add_argument("--concurrency", type=int, default=TARGET_CONCURRENCY, help="clients of the throughput phase")
    ap.add_argument("--seq-requests", type=int, default=None, help="requests per latency phase, one client "
                                                                    "(default 300)")
    ap.add_argument("--seq-warmup", type=int, default=20, help="untimed requests before each latency phase")
    ap.add_argument("--server-log-level", default=None, choices=("critical", "error", "warning", "info", "debug"),
                    help="the router's --log-level (default: the product's default, info: one access line per "
                         "request)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/router-<machine>-<date>.json)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--quick", action="store_true", help="1 round, 30 sequential and 200 concurrent requests")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.requests = args.requests or (200 if args.quick else 2000)
    args.seq_requests = args.seq_requests or (30 if args.quick else 300)
    if min(args.rounds, args.requests, args.seq_requests, args.concurrency) < 1 or args.seq_warmup < 0:
        ap.error("--rounds, --requests, --seq-requests and --concurrency must be >= 1")

    from fake_upstream import FakeUpstream, reply_text

    try:
        import uvloop
    except ImportError:
        uvloop = None

    def log(msg: str) -> None:
        print(msg, flush=True)

    expected = {mode: reply_text(UPSTREAM_NAME, MAX_TOKENS) for mode in MODES}
    fake = router = None
    config_path = None
    status = None
    t_start = time.perf_counter()
    try:
        fake = FakeUpstream(UPSTREAM_NAME, delay=0.0)
        config_path = write_config(fake.api_base)
        router = RouterProcess(config_path, args.server_log_level)
        router_url = router.wait_ready(ROUTER_START_TIMEOUT_S)
        log(f"fake upstream at {fake.url} (pid {fake.proc.pid}); router at {router_url} (pid {router.proc.pid})")
        pids = {"upstream": fake.proc.pid}
        direct = Side("direct", fake.url, UPSTREAM_MODEL, pids)
        routed = Side("router", router_url, GROUP, {**pids, "router": router.proc.pid})
        coro = bench(direct, routed, expected, args, log)
        rounds = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
        stats = fake.stats()
        if stats.get("failed"):
            raise Failure(f"the fake upstream counted {stats['failed']} failed requests: "
                          f"{ {k: v for k, v in stats.items() if k != 'requests'} }")
        router_log = router.log()
        if router.proc.poll() is not None:
            raise Failure(f"the router exited with {router.proc.returncode} during the run\n{router.tail()}")
    except BaseException:
        if router is not None:
            print("--- router stderr (tail) ---\n" + router.tail(), file=sys.stderr)
        raise
    finally:
        if router is not None:
            status = router.stop()
            router.remove_log()
        if fake is not None:
            fake.stop()
        if config_path is not None:
            os.unlink(config_path)
    wall = time.perf_counter() - t_start

    summary = summarize(rounds, args.concurrency)
    print_table(summary, args.concurrency)
    met = all(row["targets"]["added_p50_met"] and row["targets"]["router_req_per_s_met"] is not False
              for row in summary.values())
    print(f"\ntargets ({'all met' if met else 'NOT all met'}): " + "; ".join(
        f"{mode}: added p50 {row['added_s']['p50_s'] * 1e3:.2f} ms "
        f"{'<=' if row['targets']['added_p50_met'] else '>'} 3 ms, router "
        f"{row['throughput']['router']['req_per_s']:.0f} req/s "
        f"{'>=' if row['targets']['router_req_per_s_met'] else '<'} {TARGET_RPS:.0f}" for mode, row in summary.items()))
    print(f"router exit status {status}; {len(router_log.splitlines())} stderr lines; run took {wall:.0f} s")

    if args.no_write:
        return 0
    info = machine_info()
    payload = {
        "benchmark": "router", "quick": args.quick,
        "workload": {"endpoint": "/v1/chat/completions", "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                     "reply": expected["nonstream"], "stream_events": MAX_TOKENS + 4,
                     "upstream": "tests/fake_upstream.py, delay 0, its own process",
                     "router_config": {"model_name": GROUP, "model": f"openai/{UPSTREAM_MODEL}",
                                       "router_settings": {"num_retries": 0}},
                     "router_cmd": router.cmd[:4] + ["--config", "<tmp yaml>"] + router.cmd[6:],
                     "router_log_level": args.server_log_level or "info (default)"},
        "config": {"rounds": args.rounds, "seq_requests": args.seq_requests, "seq_warmup": args.seq_warmup,
                   "requests": args.requests, "concurrency": args.concurrency,
                   "warmup_per_throughput_phase": 2 * args.concurrency,
                   "request_timeout_s": REQUEST_TIMEOUT, "phase_timeout_s": PHASE_TIMEOUT_S,
                   "client": "one process, one asyncio loop (" + ("uvloop" if uvloop else "asyncio") +
                             "), one httpx.AsyncClient per concurrent client (one keep-alive connection each),"
                             " fresh clients per phase",
                   "order": "direct and router back to back per phase; the first side alternates by round"},
        "cores_note": (f"the bench client, the router and the fake upstream share this machine's "
                       f"{info.get('cpus_usable')} usable cores; direct runs have one process fewer"),
        "machine": {**info, "packages": versions(), "event_loop_client": "uvloop" if uvloop else "asyncio"},
        "targets": {"added_p50_s_max": TARGET_ADDED_P50_S, "router_req_per_s_min": TARGET_RPS,
                    "at_concurrency": TARGET_CONCURRENCY, "all_met": met},
        "summary": summary, "rounds": rounds, "router_exit_status": status,
        "router_stderr_lines": len(router_log.splitlines()), "wall_s": wall,
    }
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    else:
        path = write_result("router", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
