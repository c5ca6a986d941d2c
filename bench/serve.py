"""Serving throughput: `fastinfer serve` under N concurrent streaming clients against offline `LLM.generate`.

    python bench/serve.py                          # 1, 8 and 32 clients, 3 rounds, bf16, 2 threads
    python bench/serve.py --quick                  # 1 and 8 clients, 1 round, 1 request per client: a smoke test
    python bench/serve.py --concurrency 32 --rounds 5

Workload (as ../shared/anchors.md's serving line): prompts of 64 random token ids, 48 new tokens each,
EOS ignored, greedy. For each concurrency C, C clients each send --requests-per-client requests back to
back to a `fastinfer serve` subprocess on 127.0.0.1 (streaming POST /v1/completions, stream_options
include_usage); offline, `LLM.generate` runs the same C x R prompts with max_num_seqs = C (same dtype,
KV-cache size, threads). Rounds alternate the two (and which goes first); each (round, C) gets fresh
prompts, so neither engine's prefix cache hits. Reported per C, medians over rounds:

- output tok/s of the server (completion tokens / time from the first request sent to the last [DONE])
  and of offline generate, and their ratio (median of the per-round ratios; the issue's target: >= 0.9
  at 32 clients);
- client-side TTFT (request sent -> first content chunk) and inter-token latency (gaps between
  consecutive content chunks of one stream), p50 / p99 over all requests of a round;
- offline TTFT (first_token_time - first_scheduled_time) and time per output token, p50;
- CPU seconds used by the server process and by this (client) process during the server's turn.

At 1 client, the server's own overhead per request: mean e2e seen by the client (sent -> [DONE]) minus
the offline time per request (wall / requests: at max_num_seqs = 1 they run one after another), split by
the server's own e2e histogram (/metrics, fastinfer:e2e_request_latency_seconds: engine arrival -> last
output) into HTTP + client (client e2e - server e2e) and the server's engine path (server e2e - offline);
and client TTFT p50 minus offline TTFT p50. Per round, then the median over rounds.

Both sides share the machine's cores with this process's HTTP client, as a real client on the same host
would. Results: bench/results/serve-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine_info, write_result  # noqa: E402

TARGETS = {32: 0.9}  # server tok/s / offline tok/s the issue asks for
LISTEN_RE = re.compile(r"fastinfer serve: listening on (http://\S+)")
PROMPT_LEN = 64
SERVER_START_TIMEOUT_S = 600.0  # listening line + model load
REQUEST_TIMEOUT_S = 300.0  # one streamed request
ROUND_TIMEOUT_S = 1800.0  # one concurrency level's requests on the server


@dataclass(slots=True)
class Request:
    """One streamed request as the client saw it (perf_counter seconds)."""

    sent: float
    first: float | None = None  # first chunk carrying a choice
    done: float | None = None  # [DONE] received
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk carrying a choice
    completion_tokens: int | None = None  # from the usage chunk
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def e2e(self) -> float:
        return self.done - self.sent

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def make_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, PROMPT_LEN).tolist() for _ in range(n)]  # clear of the special tokens


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# -- the server subprocess --------------------------------------------------------------------------------------------

class Server:
    """`python -m fastinfer serve` on 127.0.0.1, port chosen by the OS; stderr kept (last 200 lines)."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.url: str | None = None
        self._listening = threading.Event()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            m = LISTEN_RE.search(line)
            if m and self.url is None:
                self.url = m.group(1).rstrip("/")
                self._listening.set()
        self._listening.set()  # exited: wake the waiter

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        if not self._listening.wait(timeout_s) or self.url is None:
            raise RuntimeError(f"server did not print its listening line; exit {self.proc.poll()}\n" + self.tail())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while loading\n" + self.tail())
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not healthy after {timeout_s:.0f} s\n" + self.tail())

    def cpu_s(self) -> float | None:
        """utime + stime of the server process so far (all its threads)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._reader.join(5)
        return self.proc.returncode

    def tail(self, n: int = 30) -> str:
        return "\n".join(list(self.log)[-n:])


def scrape_metrics(url: str) -> dict[str, float]:
    """The server's /metrics as {series name with labels: value} (Prometheus text format)."""
    import httpx

    out: dict[str, float] = {}
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            pass
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], base: str) -> float | None:
    """after - before of the series named base (summed over its label sets)."""
    def total(m: dict[str, float]) -> float | None:
        vals = [v for k, v in m.items() if k == base or k.startswith(base + "{")]
        return sum(vals) if vals else None

    a, b = total(after), total(before)
    return None if a is None or b is None else a - b


# -- the clients ----------------------------------------------------------------------------------------------------

async def stream_one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> Request:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    req = Request(sent=time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                req.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return req
            async for line in r.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    req.done = now
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    req.error = f"error chunk: {chunk['error']}"
                    continue
                if chunk.get("choices"):
                    if req.first is None:
                        req.first = now
                    req.chunk_times.append(now)
                if chunk.get("usage"):
                    req.completion_tokens = chunk["usage"].get("completion_tokens")
    except Exception as e:  # noqa: BLE001 - every failure is recorded on the request and reported
        req.error = f"{type(e).__name__}: {e}"
    if req.error is None and (req.done is None or req.first is None):
        req.error = "stream ended without a first chunk or [DONE]"
    if req.error is None and req.completion_tokens != max_tokens:
        req.error = f"usage.completion_tokens {req.completion_tokens} != max_tokens {max_tokens}"
    return req


async def run_clients(url: str, model: str, per_client: list[list[list[int]]], max_tokens: int
                      ) -> tuple[list[Request], float]:
    """Each client sends its prompts one after another; returns every request and the wall time."""
    import httpx

    n = len(per_client)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        async def one_client(prompts: list[list[int]]) -> list[Request]:
            done = []
            for p in prompts:
                done.append(await stream_one(client, url, model, p, max_tokens))
            return done

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(one_client(ps) for ps in per_client)), ROUND_TIMEOUT_S)
        wall = time.perf_counter() - t0
    return [r for rs in results for r in rs], wall


def server_round(server: Server, model: str, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    per_client = [prompts[i::clients] for i in range(clients)]
    load = os.getloadavg()[0]  # other work on the machine shows here
    before = scrape_metrics(server.url)
    cpu0, my0 = server.cpu_s(), time.process_time()
    reqs, wall = asyncio.run(run_clients(server.url, model, per_client, max_tokens))
    cpu1, my1 = server.cpu_s(), time.process_time()
    after = scrape_metrics(server.url)
    errors = [r.error for r in reqs if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(reqs)} requests failed, first: {errors[0]}\n" + server.tail())
    tokens = sum(r.completion_tokens for r in reqs)
    itl = [x for r in reqs for x in r.itls()]
    n_e2e = metric_delta(before, after, "fastinfer:e2e_request_latency_seconds_count")
    s_e2e = metric_delta(before, after, "fastinfer:e2e_request_latency_seconds_sum")
    n_ttft = metric_delta(before, after, "fastinfer:time_to_first_token_seconds_count")
    s_ttft = metric_delta(before, after, "fastinfer:time_to_first_token_seconds_sum")
    return {
        "wall_s": wall, "requests": len(reqs), "output_tokens": tokens, "tok_per_s": tokens / wall,
        "chunks": sum(len(r.chunk_times) for r in reqs),
        "ttft_p50_s": pct([r.ttft for r in reqs], 50), "ttft_p99_s": pct([r.ttft for r in reqs], 99),
        "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "e2e_p50_s": pct([r.e2e for r in reqs], 50), "e2e_mean_s": statistics.fmean(r.e2e for r in reqs),
        "server_e2e_mean_s": s_e2e / n_e2e if n_e2e else None,  # the server's own histogram
        "server_ttft_mean_s": s_ttft / n_ttft if n_ttft else None,
        "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        "client_cpu_s": my1 - my0, "load_1m_before": load,
    }


# -- offline ------------------------------------------------------------------------------------------------------

def offline_round(llm, prompts: list[list[int]], max_tokens: int) -> dict:
    from fastinfer import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    load = os.getloadavg()[0]
    my0 = time.process_time()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - my0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == max_tokens * len(prompts), (tokens, max_tokens * len(prompts))
    m = [o.metrics for o in outs]
    ttft = [x.first_token_time - x.first_scheduled_time for x in m]
    tpot = [(x.finished_time - x.first_token_time) / max(max_tokens - 1, 1) for x in m]
    return {"wall_s": wall, "requests": len(prompts), "output_tokens": tokens, "tok_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50),
            "cpu_s": cpu,
            "load_1m_before": load}


# -- main ---------------------------------------------------------------------------------------------------------

def overhead_at_one(rounds: list[dict]) -> dict | None:
    """Server's own cost per request at 1 client: means per round, medians over rounds.

    client e2e (sent -> [DONE]) - offline time per request (wall / requests: they run one after another) = the
    server's whole overhead; client e2e - the server's own e2e histogram (engine arrival -> last output) = HTTP and
    client; the rest is the server's engine path (loop thread, queues, SSE).
    """
    if not rounds:
        return None
    client = [r["server"]["e2e_mean_s"] for r in rounds]
    hist = [r["server"]["server_e2e_mean_s"] for r in rounds]
    offline = [r["offline"]["wall_s"] / r["offline"]["requests"] for r in rounds]
    out = {"client_e2e_mean_s": med(client), "server_e2e_mean_s": med(hist), "offline_request_mean_s": med(offline),
           "total_s": med([c - o for c, o in zip(client, offline)]),
           "ttft_client_p50_s": med([r["server"]["ttft_p50_s"] for r in rounds]),
           "ttft_offline_p50_s": med([r["offline"]["ttft_p50_s"] for r in rounds]),
           "ttft_extra_s": med([r["server"]["ttft_p50_s"] - r["offline"]["ttft_p50_s"] for r in rounds])}
    if None not in hist:
        out["http_and_client_s"] = med([c - h for c, h in zip(client, hist)])
        out["server_engine_path_s"] = med([h - o for h, o in zip(hist, offline)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or model folder (default: the built-in SmolLM2-135M)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2, help="threads of the server and of offline generate")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="client counts (default: 1 8 32)")
    ap.add_argument("--requests-per-client", type=int, default=None, help="sent back to back (default: 3)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating server/offline rounds (default: 3)")
    ap.add_argument("--max-tokens", type=int, default=48, help="new tokens per request (EOS ignored)")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20, help="both engines (default: 512 MiB)")
    ap.add_argument("--quick", action="store_true", help="1 round, 1 request per client, 1 and 8 clients")
    ap.add_argument("--no-write", action="store_true", help="print only; no JSON under bench/results")
    args = ap.parse_args()
    conc = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    per_client = args.requests_per_client or (1 if args.quick else 3)
    n_rounds = args.rounds or (1 if args.quick else 3)
    if min(conc) < 1 or per_client < 1 or n_rounds < 1 or args.max_tokens < 1:
        ap.error("--concurrency, --requests-per-client, --rounds and --max-tokens must be >= 1")

    import torch

    torch.set_num_threads(args.threads)
    import fastinfer
    from fastinfer import LLM
    from fastinfer.loading import default_model_path

    fastinfer.set_num_threads(args.threads)
    model = str(args.model or default_model_path())
    engine = {"dtype": args.dtype, "kv_cache_memory_bytes": args.kv_cache_memory_bytes}
    cmd = [sys.executable, "-m", "fastinfer", "serve", model, "--host", "127.0.0.1", "--port", "0",
           "--dtype", args.dtype, "--max-num-seqs", str(max(conc)),
           "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes), "--threads", str(args.threads)]
    print("server:", " ".join(cmd), flush=True)
    server = Server(cmd)  # loads while the offline engines load
    try:
        llms = {c: LLM(model, max_num_seqs=c, **engine) for c in conc}
        vocab = llms[conc[0]].get_tokenizer().vocab_size
        server.wait_ready(SERVER_START_TIMEOUT_S)
        import httpx

        served = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        print(f"server at {server.url}, model {served!r}", flush=True)
        # Warm-up: both sides, every concurrency, prompts used nowhere else (seed 10_000 + C).
        for c in conc:
            warm = make_prompts(vocab, c, seed=10_000 + c)
            server_round(server, served, warm, c, 8)
            offline_round(llms[c], warm, 8)

        rows = []
        per_round: dict[int, list[dict]] = {c: [] for c in conc}
        for r in range(n_rounds):
            for i, c in enumerate(conc):
                prompts = make_prompts(vocab, c * per_client, seed=1000 * r + c)
                order = ("server", "offline") if (r + i) % 2 == 0 else ("offline", "server")
                res = {}
                for side in order:
                    res[side] = (server_round(server, served, prompts, c, args.max_tokens) if side == "server"
                                 else offline_round(llms[c], prompts, args.max_tokens))
                res["ratio"] = res["server"]["tok_per_s"] / res["offline"]["tok_per_s"]
                res["order"] = list(order)
                per_round[c].append(res)
                s, o = res["server"], res["offline"]
                print(f"round {r} C={c:3d}: server {s['tok_per_s']:7.1f} tok/s  offline {o['tok_per_s']:7.1f} tok/s"
                      f"  x{res['ratio']:.3f}  (server cpu {s['server_cpu_s'] or 0:.1f} s, client cpu "
                      f"{s['client_cpu_s']:.1f} s, wall {s['wall_s']:.1f} s)", flush=True)

        print()
        print("| clients | server tok/s | offline tok/s | ratio (per round) | TTFT p50 / p99 | ITL p50 / p99 |"
              " offline TTFT p50 / TPOT p50 |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c in conc:
            rs = per_round[c]
            ratios = [x["ratio"] for x in rs]

            def m(side: str, key: str) -> float | None:
                return med([x[side][key] for x in rs])

            row = {"clients": c, "requests": c * per_client, "server_tok_per_s": m("server", "tok_per_s"),
                   "offline_tok_per_s": m("offline", "tok_per_s"), "ratio": statistics.median(ratios),
                   "round_ratios": ratios, "target": TARGETS.get(c),
                   **{f"server_{k}": m("server", k) for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
                                                               "e2e_p50_s", "server_e2e_mean_s", "server_cpu_s",
                                                               "client_cpu_s", "wall_s")},
                   **{f"offline_{k}": m("offline", k) for k in ("ttft_p50_s", "tpot_p50_s", "cpu_s", "wall_s")},
                   "rounds": rs}
            rows.append(row)
            tgt = row["target"]
            verdict = "" if tgt is None else (f" (target {tgt}: {'met' if row['ratio'] >= tgt else 'missed'})")
            print(f"| {c} | {row['server_tok_per_s']:.1f} | {row['offline_tok_per_s']:.1f} | {row['ratio']:.3f}"
                  f" ({', '.join(f'{x:.3f}' for x in ratios)}){verdict} |"
                  f" {row['server_ttft_p50_s'] * 1e3:.0f} / {row['server_ttft_p99_s'] * 1e3:.0f} ms |"
                  f" {row['server_itl_p50_s'] * 1e3:.1f} / {row['server_itl_p99_s'] * 1e3:.1f} ms |"
                  f" {row['offline_ttft_p50_s'] * 1e3:.0f} ms / {row['offline_tpot_p50_s'] * 1e3:.1f} ms |")
        overhead = overhead_at_one(per_round.get(1, []))
        if overhead:
            ms = {k: (v * 1e3 if v is not None else float("nan")) for k, v in overhead.items()}
            print(f"\nserver overhead per request at 1 client: client e2e - offline per request {ms['total_s']:.1f} ms"
                  f" (median of rounds; client {ms['client_e2e_mean_s']:.1f} ms, offline "
                  f"{ms['offline_request_mean_s']:.1f} ms)"
                  + (f" (HTTP + client {ms['http_and_client_s']:.1f} ms, server engine path "
                     f"{ms['server_engine_path_s']:.1f} ms)" if "http_and_client_s" in ms else "")
                  + f"; TTFT {ms['ttft_client_p50_s']:.1f} vs {ms['ttft_offline_p50_s']:.1f} ms offline"
                    f" (+{ms['ttft_extra_s']:.1f} ms)")
    finally:
        status = server.stop()
        print(f"server stopped (exit status {status})", flush=True)

    if not args.no_write:
        payload = {"model": model, "served_model": served, "dtype": args.dtype, "threads": args.threads,
                   "max_tokens": args.max_tokens, "prompt_tokens": PROMPT_LEN, "requests_per_client": per_client,
                   "rounds": n_rounds, "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                   "server_cmd": cmd, "server_exit_status": status, "machine": machine_info(),
                   "overhead_at_1_client": overhead, "results": rows}
        print(f"wrote {write_result('serve', payload)}")


if __name__ == "__main__":
    main()
