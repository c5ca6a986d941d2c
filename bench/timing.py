"""The one benchmark timer every fastinfer benchmark uses, plus machine info and result files.

    from timing import bench, bench_interleaved, gflops, gbps, machine_info, write_result
    t = bench(lambda: f(x), warmup=3, repeat=20)   # Timing(median_s, min_s, times_s)
    print(gflops(flop_count, t.median_s), gbps(bytes_moved, t.median_s))
    ts = bench_interleaved({"mine": f, "theirs": g})  # alternating calls: fair ratios on a noisy machine

Wall-clock times come from ``time.perf_counter`` around each call; the
callable must finish its work before it returns (CPU kernels do). Rates are
always computed from the median; the minimum is reported next to it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    median_s: float  # median wall time of one call
    min_s: float  # fastest call
    times_s: list[float] = field(repr=False)  # every timed call, in order

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "repeat": len(self.times_s)}


def bench(fn: Callable[[], Any], warmup: int = 3, repeat: int = 20, min_time_s: float = 0.0) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then at least ``repeat`` times timed.

    ``min_time_s`` > 0 keeps timing past ``repeat`` until that much time has been
    spent, so very short calls still get a stable median.
    """
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeat or spent < min_time_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return Timing(median_s=statistics.median(times), min_s=min(times), times_s=times)


def bench_interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 3, repeat: int = 20,
                      min_time_s: float = 0.0) -> dict[str, Timing]:
    """Time several callables in alternation: round r calls each one once, in order.

    On a shared or throttling machine speed drifts over seconds; alternating puts the
    same drift into every candidate, so their ratio stays meaningful. ``min_time_s``
    bounds the total time of all rounds from below.
    """
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    rounds = 0
    while rounds < repeat or spent < min_time_s:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            spent += dt
        rounds += 1
    return {name: Timing(statistics.median(ts), min(ts), ts) for name, ts in times.items()}


def tflops(flop: float, seconds: float) -> float:
    return flop / seconds / 1e12


def gflops(flop: float, seconds: float) -> float:
    return flop / seconds / 1e9


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (10^9 bytes per second)."""
    return nbytes / seconds / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, fastinfer build, torch, transformers (if loaded), python."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    try:
        import fastinfer

        info["fastinfer"] = fastinfer.build_info()
    except ImportError as e:  # the timer itself does not need fastinfer
        info["fastinfer"] = f"not importable: {e}"
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: F811
        except ImportError:
            torch = None
    info["torch"] = torch.__version__ if torch is not None else None
    if torch is not None:
        info["torch_num_threads"] = torch.get_num_threads()
    # the peer's version matters as much as ours (transformers changed its GGUF loading in 5.x)
    transformers = sys.modules.get("transformers")
    info["transformers"] = getattr(transformers, "__version__", None)
    info["load_avg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info["git"] = git_state()
    return info


def git_state() -> dict | None:
    """Commit of the checkout next to this file and the tracked files changed since.

    An editable install runs whatever extension was last built, which need not match
    the working tree; the extension's path and modification time are recorded too.
    """
    repo = Path(__file__).resolve().parent.parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        state: dict[str, Any] = {"commit": git("rev-parse", "HEAD"),
                                 "modified": git("status", "--porcelain", "--untracked-files=no").splitlines()}
    except (OSError, subprocess.SubprocessError):
        state = {}
    try:
        from fastinfer import _C

        state["extension"] = _C.__file__
        state["extension_mtime"] = _dt.datetime.fromtimestamp(os.path.getmtime(_C.__file__)).isoformat(timespec="seconds")
    except (ImportError, OSError):
        pass
    return state or None


def machine_tag() -> str:
    """A short file-name-safe tag for the machine: hostname, or the CPU model and core count."""
    host = socket.gethostname()
    raw = host if host and host not in ("localhost", "vm") else f"{cpu_model()}-{os.cpu_count()}c"
    tag = "".join(c if c.isalnum() else "-" for c in raw.lower())
    while "--" in tag:
        tag = tag.replace("--", "-")
    return tag.strip("-")[:60] or "unknown"


def write_result(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` as JSON to ``<out_dir>/<name>-<machine tag>-<YYYY-MM-DD>.json`` and return the path.

    ``out_dir`` defaults to ``bench/results``; it is created when missing. A second
    run on the same day and machine replaces the file.
    """
    d = Path(out_dir) if out_dir is not None else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}-{machine_tag()}-{_dt.date.today().isoformat()}.json"
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, Timing):
        return o.as_dict()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)
