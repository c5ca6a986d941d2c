"""The CUDA kernels on the CPU emulator (csrc/cuda/emu), in the modes CI can afford.

* The race mode over the fixed emulated case set (every head dim, forward and backward, the edge
  cases of issue 21) must report nothing and every case must pass.
* The emulator's own checks (csrc/cuda/emu/checks/emu_checks.cu) must catch the bug each of them
  plants, in the modes that are meant to, and pass the correct kernel in every mode.
* The mutation generator and the launch-bounds rewrite, as text transformations.

The builds are compiled once per session into a temporary folder (about a minute on 2 cores);
the full mutation gate is csrc/cuda/emu/mutation_gate.py (its last result: bench/results/).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "cuda" / "emu"
sys.path.insert(0, str(EMU))

import prepare_sources  # noqa: E402
import sync_mutations  # noqa: E402

needs_toolchain = pytest.mark.skipif(
    shutil.which("g++") is None or shutil.which("addr2line") is None or platform.system() != "Linux"
    or platform.machine() not in ("x86_64", "AMD64"),
    reason="the emulator needs g++, addr2line and Linux x86-64 (ucontext fibers)")


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def emu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cuda-emu")


def _build(emu_dir: Path, target: str, mode: str) -> Path:
    out = emu_dir / f"{target}-{mode}"
    r = _run(["bash", str(EMU / "emu_build.sh"), target, mode, str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    return out


# ---------------------------------------------------------------- race mode over the emulated case set


@needs_toolchain
def test_race_mode_reports_nothing_forward(emu_dir: Path) -> None:
    build = _build(emu_dir, "forward", "race")
    r = _run([str(build / "selftest_emulated"), "--cases", "0"])
    out = r.stdout + r.stderr
    assert "[cuda-emu race]" not in out and "[cuda-emu] ERROR" not in out, out[-4000:]
    assert r.returncode == 0, out[-4000:]
    assert "head dims compiled: 64,96,128,256" in out
    assert "failed 0" in out and "cache cases failed 0" in out


@needs_toolchain
def test_race_mode_reports_nothing_backward(emu_dir: Path) -> None:
    build = _build(emu_dir, "backward", "race")
    r = _run([str(build / "selftest_backward_emulated"), "--cases", "20"])
    out = r.stdout + r.stderr
    assert "[cuda-emu race]" not in out and "[cuda-emu] ERROR" not in out, out[-4000:]
    assert r.returncode == 0, out[-4000:]
    assert " 0 failed" in out
    for d in (64, 96, 128, 256):
        assert f"D={d} " in out


# ---------------------------------------------------------------- the emulator's own planted bugs

SCHEDULES = [("index", "wait"), ("index", "issue"), ("warp", "wait"), ("warp-reverse", "wait")]


def _check(build: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    return _run([str(build / "emu_checks"), name], env=env, timeout=120)


@pytest.fixture(scope="session")
def checks(emu_dir: Path) -> dict[str, Path]:
    return {mode: _build(emu_dir, "checks", mode) for mode in ("plain", "race")}


@needs_toolchain
@pytest.mark.parametrize("name", ["good", "syncwarp", "smem_optin"])
def test_correct_kernels_pass_every_mode(checks: dict[str, Path], name: str) -> None:
    for sched, cp in SCHEDULES:
        r = _check(checks["plain"], name, FI_EMU_SCHED=sched, FI_EMU_CPASYNC=cp)
        assert r.returncode == 0 and f"ok {name}" in r.stdout, (sched, cp, r.stdout + r.stderr)
    r = _check(checks["race"], name)
    assert r.returncode == 0 and "[cuda-emu race]" not in r.stderr, r.stdout + r.stderr


@needs_toolchain
def test_race_mode_catches_what_no_schedule_shows(checks: dict[str, Path]) -> None:
    # Lanes read each other's data and overwrite theirs with no __syncwarp: right numbers in every schedule.
    for sched, cp in SCHEDULES:
        assert _check(checks["plain"], "war", FI_EMU_SCHED=sched, FI_EMU_CPASYNC=cp).returncode == 0
    r = _check(checks["race"], "war")
    assert r.returncode != 0
    assert "[cuda-emu race] write-after-read on shared-memory byte" in r.stderr
    assert "emu_checks.cu:" in r.stderr  # the source line of both accesses
    assert "shared-memory race(s)" in r.stderr and "war_kernel" in r.stderr
    r = _check(checks["race"], "syncwarp_missing")
    assert r.returncode != 0 and "[cuda-emu race]" in r.stderr


@needs_toolchain
def test_cp_async_landing_and_warp_schedules(checks: dict[str, Path]) -> None:
    # A cp.async into a chunk another thread still reads: invisible when copies land at the wait in index order.
    assert _check(checks["plain"], "cpasync_war").returncode == 0
    for sched, cp in [("index", "issue"), ("warp", "wait")]:
        r = _check(checks["plain"], "cpasync_war", FI_EMU_SCHED=sched, FI_EMU_CPASYNC=cp)
        assert r.returncode == 1 and "wrong result" in r.stdout, (sched, cp, r.stdout)
    r = _check(checks["race"], "cpasync_war")
    assert r.returncode != 0 and "[cuda-emu race]" in r.stderr


@needs_toolchain
def test_thread_exiting_with_copies_in_flight_fails(checks: dict[str, Path]) -> None:
    for sched, cp in SCHEDULES:
        r = _check(checks["plain"], "cpasync_exit", FI_EMU_SCHED=sched, FI_EMU_CPASYNC=cp)
        assert r.returncode != 0
        assert "cp.async copies it never waited for" in r.stderr


@needs_toolchain
def test_launch_contract(checks: dict[str, Path]) -> None:
    plain = checks["plain"]
    r = _check(plain, "launch_bounds")
    assert r.returncode != 0 and "over its __launch_bounds__(32)" in r.stderr and "bounded_kernel" in r.stderr
    r = _check(plain, "grid_y")
    assert r.returncode != 0 and "grid (1,65536,1) over the limits" in r.stderr
    r = _check(plain, "smem_no_optin")
    assert r.returncode != 0 and "65536 bytes of dynamic shared memory" in r.stderr and "cudaFuncSetAttribute" in r.stderr
    # 200 KB: over sm_80's 163 KB opt-in limit (the attribute is refused, the launch fails), within sm_90's 227 KB.
    r = _check(plain, "smem_200k", FI_EMU_ARCH="sm_80")
    assert r.returncode != 0 and "refused" in r.stdout and "over the sm_80 opt-in limit of 166912" in r.stderr
    r = _check(plain, "smem_200k", FI_EMU_ARCH="sm_90")
    assert r.returncode == 0 and "accepted" in r.stdout
    r = _check(plain, "good", FI_EMU_SCHED="random")
    assert r.returncode != 0 and "FI_EMU_SCHED=random" in r.stderr  # no silent default for a typo


# ---------------------------------------------------------------- text transformations (no compiler)


def test_launch_bounds_rewrite() -> None:
    src = ("template <class Cfg>\n__global__ void __launch_bounds__(Cfg::kThreads, 2) k(const A a,\n int b) {\n"
           "  body();\n}\n// __launch_bounds__(9) in a comment stays\n")
    text, n = prepare_sources.rewrite(src)
    assert n == 1
    assert "__global__ void k(const A a,\n int b) { FI_EMU_LAUNCH_BOUNDS(Cfg::kThreads, 2);\n  body();" in text
    assert text.count("\n") == src.count("\n")  # line numbers (race reports) unchanged


def test_sync_mutations_of_a_kernel() -> None:
    src = """__global__ void k() {
  const int n = f();
  for (int i = 0; i < n; ++i) {
    __syncthreads();
    load(i);
    cp_async_wait<0>();
  }
  float x[4];
  __syncthreads();  // a comment
  use(x);
}
"""
    ms = {m.id: m for m in sync_mutations.mutants_of("k.cu", src)}
    assert sorted(ms) == ["k.cu:4:delete", "k.cu:4:move-down", "k.cu:4:move-up", "k.cu:6:delete", "k.cu:6:move-down",
                          "k.cu:6:move-up", "k.cu:9:delete", "k.cu:9:move-down", "k.cu:9:move-up"]
    assert "__syncthreads" not in ms["k.cu:4:delete"].text.split("float")[0]
    # first in the loop body: moving up takes it out of the loop, before the `for`
    assert ms["k.cu:4:move-up"].text.index("__syncthreads") < ms["k.cu:4:move-up"].text.index("for (")
    assert ms["k.cu:4:move-down"].text.index("load(i)") < ms["k.cu:4:move-down"].text.index("__syncthreads")
    # last in the loop body: moving down takes it out of the loop
    assert "} cp_async_wait<0>();\n  float" in ms["k.cu:6:move-down"].text
    # moves cross declarations up to the next other statement
    t = ms["k.cu:9:move-up"].text
    assert t[: t.index("for (")].count("__syncthreads") == 1
    assert ms["k.cu:9:move-down"].text.index("use(x)") < ms["k.cu:9:move-down"].text.rindex("__syncthreads")


def test_every_sync_statement_of_the_kernels_is_mutated() -> None:
    src = ROOT / "csrc" / "cuda"
    mutants = sync_mutations.all_mutants(src)
    for name in sync_mutations.KERNEL_FILES:
        code = sync_mutations.blank_comments((src / name).read_text())
        sites = code.count("__syncthreads()") + code.count("__syncwarp(") + code.count("cp_async_wait<")
        deletes = [m for m in mutants if m.file == name and m.op == "delete"]
        assert len(deletes) == sites, name
        for m in deletes:
            assert m.text != (src / name).read_text()
    assert sum(m.op == "delete" for m in mutants) >= 13


def test_equivalent_mutants_still_exist() -> None:
    # Each written justification must still name a mutant of the current kernels (else it went stale).
    import mutation_gate

    src = ROOT / "csrc" / "cuda"
    texts = {name: (src / name).read_text() for name in sync_mutations.KERNEL_FILES}
    keys = {mutation_gate.equivalence_key(m, texts[m.file]) for m in sync_mutations.all_mutants(src)}
    assert set(mutation_gate.EQUIVALENT) <= keys, set(mutation_gate.EQUIVALENT) - keys
