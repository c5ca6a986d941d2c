#!/usr/bin/env python
"""fastinfer's packed CPU linear vs torch.nn.functional.linear, at SmolLM2-135M's projection shapes.

    python bench/linear.py                    # full run (about 2 minutes on 2 cores)
    python bench/linear.py --quick            # fewer repeats: a smoke test
    python bench/linear.py --threads 2 --isa avx512 --out /tmp/results

Cases   y = x @ W.T, no bias, fp32 and bf16, (N, K) = (960, 576) q/k/v fused, (576, 576) o,
        (3072, 576) gate/up fused, (576, 1536) down, (49152, 576) LM head; m = 1 (decode),
        64 and 512 rows. fastinfer's weights are packed once (ops.pack_linear_weight), outside
        the timed region; both sides allocate their output in the call.
Cold    for m = 1 a call reads every weight once and does almost nothing else, so a weight left in
        the caches by the previous call would measure the cache, not memory. Each timed pass cycles
        through `copies` distinct weight copies totalling more than --cold-mb (64 MB, twice this
        machine's 32 MB L3) and the time per call is the pass time / copies. For m = 64 and 512 the
        same weight is reused call after call (as every row reuses it within a call).
Threads torch and fastinfer each run in their own phase, never interleaved call by call: two
        spinning thread pools taking turns distort both. Torch phase: torch.set_num_threads(T),
        fastinfer.set_num_threads(1); fastinfer phase: torch.set_num_threads(1),
        fastinfer.set_num_threads(T). Each case runs torch, fastinfer, torch, fastinfer (half the
        repeats each time) so drift on a shared machine hits both sides; medians over all repeats.
Rates   GB/s = weight bytes (N*K*element size) / time; GFLOP/s = 2*m*N*K / time.
        ratio = torch time / fastinfer time (> 1 means fastinfer is faster).
Load    the CPU time other processes used while a case ran (from /proc/stat minus this process's
        own CPU time), in cores, is printed ("other") and kept in the JSON: on a 2-core machine
        anything above ~0.1 means the case shared its cores and its numbers are suspect (torch's
        OpenMP barriers suffer more than fastinfer's work-stealing pool, in whole time slices).
Check   before timing, fastinfer's output must be within 2x F.linear's own error against a float64
        reference plus a few float32 roundings of sum|x w| (the rule of tests/test_linear.py), or
        the run fails (exit 1).

Results go to bench/results/ as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import resource
import statistics
import time
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastinfer
from fastinfer import ops
from timing import Timing, bench, gbps, gflops, machine_info, write_result

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = [  # (N, K) = (out_features, in_features) of SmolLM2-135M (hidden 576, intermediate 1536, vocab 49152)
    ("qkv", 960, 576),
    ("o_proj", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
]
MS = (1, 64, 512)
U32 = 2.0 ** -24


@dataclass(frozen=True)
class Reps:
    warmup: int
    repeat: int  # per side, split over the two phases
    min_time_s: float  # per side, split over the two phases


@contextmanager
def phase(side: str, threads: int):
    """Only one side's thread pool is active: the other gets one thread."""
    if side == "torch":
        fastinfer.set_num_threads(1)
        torch.set_num_threads(threads)
    else:
        torch.set_num_threads(1)
        fastinfer.set_num_threads(threads)
    yield


class LoadMeter:
    """CPU cores' worth of time that other processes used between start() and other_cores()."""

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy_s(), self._own_s()

    def other_cores(self) -> float | None:
        busy = self._busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return max(0.0, (busy - self.busy0) - (self._own_s() - self.own0)) / wall


def check_close(name: str, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> dict:
    ref = F.linear(x.double(), w.double())
    err = (out.double() - ref).abs().max().item()
    torch_err = (F.linear(x, w).double() - ref).abs().max().item()
    if out.dtype == torch.float32:
        floor = 8 * U32 * F.linear(x.double().abs(), w.double().abs()).max().item()
    else:
        floor = 1e-6
    allowed = 2 * torch_err + floor
    if not err <= allowed:
        raise AssertionError(f"{name}: fastinfer max error {err:.3g} vs F.linear's {torch_err:.3g} "
                             f"(allowed {allowed:.3g}); refusing to time a wrong kernel")
    return {"max_abs_err": err, "torch_max_abs_err": torch_err, "allowed": allowed}


def merge(parts: list[Timing], per_call: int) -> Timing:
    times = [t / per_call for p in parts for t in p.times_s]
    return Timing(statistics.median(times), min(times), times)


def run_case(tag: str, label: str, n: int, k: int, m: int, threads: int, reps: Reps, cold_bytes: int) -> dict:
    dtype = DTYPES[tag]
    gen = torch.Generator().manual_seed(n * 7 + k * 13 + m)
    wbytes = n * k * torch.empty((), dtype=dtype).element_size()
    copies = cold_bytes // wbytes + 1 if m == 1 else 1
    ws = [(torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype) for _ in range(copies)]
    packed = [ops.pack_linear_weight(w) for w in ws]
    x = torch.randn(m, k, generator=gen).to(dtype)

    def run_torch():
        for w in ws:
            F.linear(x, w)

    def run_fi():
        for p in packed:
            ops.linear(x, p, n)

    meter = LoadMeter()
    with phase("fastinfer", threads):
        acc = check_close(f"{tag} {label} ({n}, {k}) m={m}", ops.linear(x, packed[0], n), x, ws[0])
    # Two phases per side, alternating, each with half the repeats.
    half = Reps(reps.warmup, max(1, math.ceil(reps.repeat / 2)), reps.min_time_s / 2)
    parts: dict[str, list[Timing]] = {"torch": [], "fastinfer": []}
    for _ in range(2):
        for side, fn in (("torch", run_torch), ("fastinfer", run_fi)):
            with phase(side, threads):
                parts[side].append(bench(fn, half.warmup, half.repeat, half.min_time_s))
    t_torch, t_fi = merge(parts["torch"], copies), merge(parts["fastinfer"], copies)
    flop = 2 * m * n * k

    def rates(t: Timing) -> dict:
        return {**t.as_dict(), "gbps": gbps(wbytes, t.median_s), "gflops": gflops(flop, t.median_s)}

    return {"dtype": tag, "name": label, "N": n, "K": k, "m": m, "weight_bytes": wbytes, "copies": copies,
            "cold": m == 1, "flop": flop, "torch": rates(t_torch), "fastinfer": rates(t_fi),
            "ratio": t_torch.median_s / t_fi.median_s, "other_cpu_cores": meter.other_cores(), **acc}


QTYPES = ("q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")
QMS = (1, 64)


def quantized_weight(qtype: str, n: int, k: int, seed: int):
    """(raw GGUF blocks (n, bytes per row) uint8, float32 (n, k) dequantisation): gguf's own quantiser for the
    32-blocks; random valid blocks (any bytes, small finite f16 scales) for the K-quants it cannot quantise."""
    import gguf
    import numpy as np

    t = gguf.GGMLQuantizationType[qtype.upper()]
    rng = np.random.default_rng(seed)
    if not qtype.endswith("_k"):
        raw = gguf.quants.quantize((rng.standard_normal((n, k)) * k ** -0.5).astype(np.float32), t)
    else:
        block = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[qtype]
        raw = rng.integers(0, 256, (n, k // 256, block), dtype=np.uint8)
        scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        fields = [208] if qtype == "q6_k" else [0, 2]  # d (q6_k: last), d and dmin
        for f in fields:
            raw[..., f:f + 2] = scale
        raw = raw.reshape(n, -1)
    return raw, gguf.quants.dequantize(raw, t).reshape(n, k).astype(np.float32)


def run_quant_case(qtype: str, label: str, n: int, k: int, m: int, threads: int, reps: Reps, cold_bytes: int) -> dict:
    """fastinfer's quantised linear against its bf16 packed linear of the same (dequantised) weights, both on
    fastinfer's pool (bf16 activations): GB/s of weight bytes at m = 1, int8 GFLOP/s at m = 64."""
    raw, w = quantized_weight(qtype, n, k, n * 7 + k)
    wq = ops.pack_linear_weight(torch.from_numpy(raw), qtype=qtype)
    qbytes = wq.nbytes
    copies = cold_bytes // qbytes + 1 if m == 1 else 1
    packed_q = [wq] + [ops.pack_linear_weight(torch.from_numpy(raw.copy()), qtype=qtype) for _ in range(copies - 1)]
    wb = torch.from_numpy(w).bfloat16()
    bcopies = cold_bytes // (2 * n * k) + 1 if m == 1 else 1
    packed_b = [ops.pack_linear_weight(wb.clone()) for _ in range(bcopies)]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()

    def run_q():
        for p in packed_q:
            ops.linear(x, p, n)

    def run_b():
        for p in packed_b:
            ops.linear(x, p, n)

    meter = LoadMeter()
    half = Reps(reps.warmup, max(1, math.ceil(reps.repeat / 2)), reps.min_time_s / 2)
    parts: dict[str, list[Timing]] = {"bf16": [], "quantized": []}
    with phase("fastinfer", threads):
        for _ in range(2):
            parts["bf16"].append(bench(run_b, half.warmup, half.repeat, half.min_time_s))
            parts["quantized"].append(bench(run_q, half.warmup, half.repeat, half.min_time_s))
    tb, tq = merge(parts["bf16"], bcopies), merge(parts["quantized"], copies)
    flop = 2 * m * n * k
    return {"qtype": qtype, "name": label, "N": n, "K": k, "m": m, "isa": fastinfer.get_cpu_isa(),
            "quantized_bytes": qbytes, "bf16_bytes": 2 * n * k, "copies": copies, "cold": m == 1,
            "quantized": {**tq.as_dict(), "gbps": gbps(qbytes, tq.median_s), "gflops": gflops(flop, tq.median_s)},
            "bf16": {**tb.as_dict(), "gbps": gbps(2 * n * k, tb.median_s), "gflops": gflops(flop, tb.median_s)},
            "speedup_over_bf16": tb.median_s / tq.median_s, "other_cpu_cores": meter.other_cores()}


def fmt_load(cores: float | None) -> str:
    return "?" if cores is None else f"{cores:.2f}"


def print_report(rows: list[dict]) -> None:
    print(f"\n{'dtype':5} {'proj':8} {'N':>6} {'K':>5} {'m':>4} {'copies':>6} {'torch ms':>9} {'fi ms':>9} "
          f"{'torch GB/s':>10} {'fi GB/s':>8} {'torch GFLOP/s':>13} {'fi GFLOP/s':>10} {'torch/fi':>8} {'other':>5}")
    for r in rows:
        t, f = r["torch"], r["fastinfer"]
        print(f"{r['dtype']:5} {r['name']:8} {r['N']:6d} {r['K']:5d} {r['m']:4d} {r['copies']:6d} "
              f"{t['median_s'] * 1e3:9.4f} {f['median_s'] * 1e3:9.4f} {t['gbps']:10.1f} {f['gbps']:8.1f} "
              f"{t['gflops']:13.1f} {f['gflops']:10.1f} {r['ratio']:7.2f}x {fmt_load(r['other_cpu_cores']):>5}")
    for tag in DTYPES:
        for m in MS:
            rs = [r["ratio"] for r in rows if r["dtype"] == tag and r["m"] == m]
            if rs:
                print(f"  {tag} m={m}: geometric mean torch/fastinfer {math.exp(sum(map(math.log, rs)) / len(rs)):.2f}x")
    loads = [r["other_cpu_cores"] for r in rows if r["other_cpu_cores"] is not None]
    if loads and max(loads) > 0.1:
        busy = sum(1 for v in loads if v > 0.1)
        print(f"warning: other processes used > 0.1 core during {busy} of {len(loads)} cases (max {max(loads):.2f}): "
              "those numbers are suspect")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CI smoke test)")
    ap.add_argument("--threads", type=int, default=2, help="threads for each side in its phase (default 2)")
    ap.add_argument("--isa", default=None, help="force fastinfer's CPU ISA: any name fastinfer.set_cpu_isa accepts")
    ap.add_argument("--cold-mb", type=float, default=64.0,
                    help="m = 1: distinct weight copies per timed pass total more than this many MB (default 64)")
    ap.add_argument("--out", default=None, help="directory for the JSON result (default bench/results)")
    ap.add_argument("--quantized", nargs="*", metavar="ISA", default=None,
                    help="instead: the quantised linear (q8_0, q4_0, q4_1, q4_k, q5_k, q6_k) against fastinfer's bf16 "
                         "linear at m = 1 and 64, at each ISA given (none given: every level this CPU runs)")
    args = ap.parse_args(argv)
    if args.quantized is not None:
        return main_quantized(args)

    if args.isa:
        fastinfer.set_cpu_isa(args.isa)
    reps = Reps(1, 4, 0.0) if args.quick else Reps(2, 12, 1.0)
    cold_bytes = int(args.cold_mb * 1e6)
    info = machine_info()
    fi = info["fastinfer"]
    print(f"{info['cpu_model']}, {info['cpus_usable']} cpus; fastinfer {fi['version']} isa={fastinfer.get_cpu_isa()}; "
          f"torch {info['torch']} (mkldnn {torch.backends.mkldnn.is_available()}); python {info['python']}; "
          f"{args.threads} threads per side, in separate phases; repeats {reps.repeat}{' (quick)' if args.quick else ''}")
    if (info["load_avg_1m"] or 0) > 0.5:
        print(f"note: load average {info['load_avg_1m']:.1f} before starting; other work shares these cores")

    threads_before = (torch.get_num_threads(), fastinfer.get_num_threads())
    rows = []
    try:
        for tag in DTYPES:
            for label, n, k in SHAPES:
                for m in MS:
                    rows.append(run_case(tag, label, n, k, m, args.threads, reps, cold_bytes))
                    r = rows[-1]
                    print(f"  {tag} {label} m={m}: torch {r['torch']['median_s'] * 1e3:.3f} ms, "
                          f"fastinfer {r['fastinfer']['median_s'] * 1e3:.3f} ms ({r['ratio']:.2f}x), "
                          f"other load {fmt_load(r['other_cpu_cores'])} cores", flush=True)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads_before[0])
        fastinfer.set_num_threads(threads_before[1])
    print_report(rows)

    payload = {
        "benchmark": "linear",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "args": vars(args),
        "fastinfer_cpu_isa": fastinfer.get_cpu_isa(),
        "repeats": {"warmup": reps.warmup, "repeat": reps.repeat, "min_time_s": reps.min_time_s},
        "machine": info,
        "conventions": {
            "time": "median wall time of one call (time.perf_counter around a pass over `copies` weights / copies); "
                    "min reported too; torch and fastinfer in separate phases (torch, fastinfer, torch, fastinfer), "
                    "each phase with its own pool at `threads` and the other at 1",
            "cold": f"m = 1: copies = cold bytes // weight bytes + 1 distinct weights per pass, > {args.cold_mb} MB",
            "gbps": "weight bytes (N*K*element size) / median time",
            "gflops": "2*m*N*K / median time",
            "ratio": "torch median time / fastinfer median time",
            "other_cpu_cores": "CPU time used by other processes during the case (/proc/stat busy time minus this "
                               "process's rusage) / wall time",
            "check": "fastinfer max |err| vs float64 <= 2 * F.linear's + floor (fp32: 8 * 2^-24 * max sum|x w|; "
                     "bf16: 1e-6)",
        },
        "cases": rows,
    }
    path = write_result("linear-quick" if args.quick else "linear", payload, args.out)
    print(f"\nwrote {path}")
    return 0


def main_quantized(args: argparse.Namespace) -> int:
    reps = Reps(1, 4, 0.0) if args.quick else Reps(2, 12, 0.5)
    cold_bytes = int(args.cold_mb * 1e6)
    isas = args.quantized or [i for i in ("scalar", "avx2", "avx_vnni", "avx512", "avx512_bf16", "amx") if _isa_ok(i)]
    before = fastinfer.get_cpu_isa()
    rows = []
    try:
        for isa in isas:
            fastinfer.set_cpu_isa(isa)
            for qtype in QTYPES:
                for label, n, k in SHAPES:
                    if k % (256 if qtype.endswith("_k") else 32) or (isa == "scalar" and label == "lm_head"):
                        continue
                    for m in QMS:
                        r = run_quant_case(qtype, label, n, k, m, args.threads, reps, cold_bytes)
                        rows.append(r)
                        q = r["quantized"]
                        print(f"  {isa:11s} {qtype} {label:8s} m={m:2d}: {q['median_s'] * 1e6:9.1f} us  "
                              f"{q['gbps']:6.1f} GB/s  {q['gflops']:7.1f} GFLOP/s  x{r['speedup_over_bf16']:.2f} over "
                              f"bf16 ({r['bf16']['gbps']:.1f} GB/s)  other load {fmt_load(r['other_cpu_cores'])}",
                              flush=True)
    finally:
        fastinfer.set_cpu_isa(before)
    payload = {"benchmark": "linear-quantized", "date": dt.datetime.now().isoformat(timespec="seconds"),
               "args": vars(args), "machine": machine_info(), "cases": rows,
               "conventions": {"gbps": "packed weight bytes / median time (m = 1: cycling copies > cold MB)",
                               "gflops": "2*m*N*K / median time (int8 multiply-adds for the quantised side)",
                               "speedup_over_bf16": "fastinfer bf16 packed linear time / quantised time, same "
                                                    "dequantised weights, bf16 activations, same pool"}}
    path = write_result("linear-quantized-quick" if args.quick else "linear-quantized", payload, args.out)
    print(f"wrote {path}")
    return 0


def _isa_ok(name: str) -> bool:
    before = fastinfer.get_cpu_isa()
    try:
        fastinfer.set_cpu_isa(name)
        return True
    except ValueError:
        return False
    finally:
        fastinfer.set_cpu_isa(before)


if __name__ == "__main__":
    sys.exit(main())
