"""Mutation gate: do the emulator's modes catch every planted synchronisation bug?

Each mutant of sync_mutations.py (every ``__syncthreads`` / ``__syncwarp`` / ``cp_async_wait`` of the
kernels deleted, moved down, moved up; one at a time) is written into a copy of ``csrc/cuda``, built
against the emulator (emu_build.sh: a plain build and a race build, incrementally) and run through
the modes until one fails:

  standard      index-order schedule, cp.async lands at the wait (the emulator's default)
  cpasync-issue cp.async lands when issued (FI_EMU_CPASYNC=issue)
  warp          one warp as far as it goes before the next (FI_EMU_SCHED=warp)
  warp-reverse  the same, last warp first
  race          the race build (shared-memory race checker), index order

A mutant that no mode catches fails the gate unless it is listed in EQUIVALENT with the reason it
cannot change any result (a justification, read in review); a listed mutant that some mode does
catch fails it too (the justification is wrong). The unmutated sources must pass every mode first.

    python csrc/cuda/emu/mutation_gate.py                   # every mutant, first catching mode; JSON to bench/results
    python csrc/cuda/emu/mutation_gate.py --all-modes       # every mode on every mutant (the full matrix)
    python csrc/cuda/emu/mutation_gate.py --only delete --headdims 64   # a subset (CI)

Exit status 0 when the catch rate is 100% of the non-equivalent mutants.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))
from sync_mutations import KERNEL_FILES, Mutant, all_mutants  # noqa: E402

# (name, build, env) in the order they are tried.
MODES = [
    ("standard", "plain", {"FI_EMU_SCHED": "index", "FI_EMU_CPASYNC": "wait"}),
    ("cpasync-issue", "plain", {"FI_EMU_SCHED": "index", "FI_EMU_CPASYNC": "issue"}),
    ("warp", "plain", {"FI_EMU_SCHED": "warp", "FI_EMU_CPASYNC": "wait"}),
    ("warp-reverse", "plain", {"FI_EMU_SCHED": "warp-reverse", "FI_EMU_CPASYNC": "wait"}),
    ("race", "race", {"FI_EMU_SCHED": "index", "FI_EMU_CPASYNC": "wait"}),
]

# Which self-test a kernel file feeds.
TARGETS = {
    "attention_fwd_kernel.cuh": ("forward",),
    "attention_cuda.cu": ("forward", "backward"),
    "kv_cache_cuda.cu": ("forward",),
    "attention_bwd_kernel.cuh": ("backward",),
}

# Mutants that cannot change what any thread reads, with the reason (keyed by Mutant.id's file, the
# statement, and the op, so that an edit above a site does not orphan its entry).
EQUIVALENT = {
    ("attention_fwd_kernel.cuh", "cp_async_wait<0>();", "move-down"):
        "the final wait moves past the quad reduction of l, which touches registers only; every shared-memory "
        "access after the loop is still behind it and the barrier that follows it",
    ("attention_fwd_kernel.cuh", "cp_async_wait<0>();", "move-up"):
        "before the key loop it makes Q and the prologue tiles land early (a stronger wait); the copies the loop "
        "issues are waited for by the loop's own waits, and the groups still pending after the loop are the empty "
        "ones committed past the last tile (nx >= ntiles), so nothing is left in flight either way",
    ("attention_fwd_kernel.cuh", "__syncthreads();", "move-up:merge"):
        "the first merge barrier is the first statement of `if constexpr (kWarpsN > 1)`; moved before the `if` it "
        "runs at the same point for the decode shapes, and is one extra, harmless barrier for the prefill shapes "
        "(block-uniform, so no divergence)",
    ("attention_fwd_kernel.cuh", "__syncthreads();", "move-up:output"):
        "the output barrier is the first statement of `if (a.num_splits == 1)`; moved before the `if` it runs at "
        "the same point when num_splits == 1 and is one extra block-uniform barrier otherwise",
    ("attention_fwd_kernel.cuh", "__syncthreads();", "move-down:mblock-loop"):
        "at the end of each m-block instead of the start of the next, it still separates consecutive m-blocks; "
        "before the first one nothing has touched shared memory (zero_rows_outside writes global memory only)",
}


def equivalence_key(m: Mutant, src_text: str) -> tuple[str, str, str]:
    """EQUIVALENT's key of a mutant: barriers of the forward kernel are told apart by what follows them."""
    op = m.op
    if m.file == "attention_fwd_kernel.cuh" and m.statement == "__syncthreads();":
        after = "\n".join(src_text.splitlines()[m.line - 1 : m.line + 3])
        if "every warp is done reading the key/value stages" in after:
            op += ":merge"
        elif "every warp is done with Q" in after:
            op += ":output"
        elif "fwd_mblock<Cfg, T>" in after:
            op += ":mblock-loop"
    return (m.file, m.statement, op)


def run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, float, str]:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timeout after {timeout:.0f} s\n" + ((e.stdout or b"").decode(errors="replace")
                                                                  if isinstance(e.stdout, bytes) else (e.stdout or ""))
    return rc, time.monotonic() - t0, out


def first_error(out: str) -> str:
    """The line that says why a run failed."""
    for key in ("[cuda-emu] ERROR", "[cuda-emu race]", "FAIL", "ERROR"):
        for line in out.splitlines():
            if line.startswith(key) or key in line:
                return line.strip()[:300]
    return out.strip().splitlines()[-1][:300] if out.strip() else ""


class Gate:
    """Builds in a work folder and runs the modes on the sources there."""

    def __init__(self, work: Path, headdims: str, timeout: float, selftest_args: dict[str, list[str]], ref: str) -> None:
        self.work, self.src = work, work / "src"
        self.headdims, self.timeout, self.args = headdims, timeout, selftest_args
        if self.src.exists():
            shutil.rmtree(self.src)
        if not ref:
            shutil.copytree(ROOT / "csrc" / "cuda", self.src, ignore=shutil.ignore_patterns("emu"))
            return
        self.src.mkdir(parents=True)
        git = ["git", "-C", str(ROOT)]
        names = subprocess.run([*git, "ls-tree", "--name-only", ref, "csrc/cuda/"], capture_output=True, text=True,
                               check=True).stdout.split()
        for path in names:
            if path.endswith((".cu", ".cuh", ".h")):
                text = subprocess.run([*git, "show", f"{ref}:{path}"], capture_output=True, text=True, check=True).stdout
                (self.src / Path(path).name).write_text(text)

    def write(self, name: str, text: str) -> None:
        path = self.src / name
        if path.read_text() != text:
            path.write_text(text)

    def build(self, target: str, build: str) -> tuple[int, str]:
        env = {"EMU_SRC": str(self.src), "EMU_HEADDIMS": self.headdims}
        rc, _, out = run(["bash", str(HERE / "emu_build.sh"), target, build, str(self.work / f"{target}-{build}")],
                         env, 1800)
        return rc, out

    def mode(self, target: str, mode: tuple[str, str, dict[str, str]]) -> dict:
        name, build, env = mode
        rc, out = self.build(target, build)
        if rc:
            return {"mode": name, "target": target, "rc": rc, "seconds": 0.0, "why": "build failed: " + first_error(out)}
        binary = self.work / f"{target}-{build}" / ("selftest_emulated" if target == "forward" else "selftest_backward_emulated")
        env = {**env, "ASAN_OPTIONS": "detect_leaks=0"}
        rc, secs, out = run([str(binary), *self.args[target]], env, self.timeout)
        return {"mode": name, "target": target, "rc": rc, "seconds": round(secs, 1), "why": first_error(out) if rc else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--headdims", default="64 256", help="head dims built (64: 3 stages, 8 warps; 256: 2 stages, 4 warps)")
    ap.add_argument("--all-modes", action="store_true", help="run every mode on every mutant (default: stop at the first catch)")
    ap.add_argument("--only", default="", help="keep mutants whose id contains this text (e.g. delete, attention_bwd)")
    ap.add_argument("--modes", default=",".join(m[0] for m in MODES), help="modes to use, in order")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per self-test run")
    ap.add_argument("--full-cases", action="store_true", help="forward: every fixed case, not only the edge cases")
    ap.add_argument("--ref", default="", help="take csrc/cuda from this git commit (default: the working tree)")
    ap.add_argument("--work", default="", help="build folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the JSON result ('' for none)")
    args = ap.parse_args()
    modes = [m for name in args.modes.split(",") for m in MODES if m[0] == name]
    if len(modes) != len(args.modes.split(",")):
        ap.error(f"--modes: choose from {', '.join(m[0] for m in MODES)}")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fi-mutation-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    # Forward: the edge cases (selftest.cu edge_cases: every sync statement's path, the multi-row-block loop,
    # the decode shape's merge, blocks without key tiles, split-KV) - the bulk of the fixed set adds time, not
    # paths. Backward: its fixed cases.
    selftest_args = {"forward": ["--edge-only", "--cases", "0"], "backward": ["--cases", "0"]}
    if args.full_cases:
        selftest_args["forward"] = ["--cases", "0"]
    gate = Gate(work, args.headdims, args.timeout, selftest_args, args.ref)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.ref or "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    originals = {f: (gate.src / f).read_text() for f in KERNEL_FILES}
    mutants = [m for m in all_mutants(gate.src) if args.only in m.id]
    t_start = time.monotonic()

    # Baseline: every mode passes on the unchanged kernels (a report there would be a false positive).
    baseline = []
    targets = sorted({t for m in mutants for t in TARGETS[m.file]}, reverse=True) or ["forward", "backward"]
    for target in targets:
        for mode in modes:
            r = gate.mode(target, mode)
            baseline.append(r)
            print(f"baseline {target:8s} {r['mode']:13s} rc={r['rc']} {r['seconds']:6.1f}s {r['why']}", flush=True)
    if any(r["rc"] for r in baseline):
        print("mutation gate: the unchanged kernels fail a mode; fix that first", file=sys.stderr)
        return 2

    results = []
    for m in mutants:
        gate.write(m.file, m.text)
        key = equivalence_key(m, originals[m.file])
        runs, caught_by = [], []
        for mode in modes:
            for target in TARGETS[m.file]:
                r = gate.mode(target, mode)
                runs.append(r)
                if r["rc"]:
                    caught_by.append(mode[0])
                    break
            if caught_by and not args.all_modes:
                break
        gate.write(m.file, originals[m.file])
        equivalent = EQUIVALENT.get(key)
        verdict = "caught" if caught_by else ("equivalent" if equivalent else "MISSED")
        if caught_by and equivalent:
            verdict = "caught-but-listed-equivalent"
        results.append({"id": m.id, "op": m.op, "statement": m.statement, "description": m.description,
                        "verdict": verdict, "caught_by": caught_by, "equivalent_because": equivalent,
                        "first_error": next((r["why"] for r in runs if r["rc"]), ""), "runs": runs})
        print(f"{verdict:12s} {m.description}  [{', '.join(caught_by) or '-'}]", flush=True)

    caught = sum(r["verdict"] == "caught" for r in results)
    equiv = sum(r["verdict"] == "equivalent" for r in results)
    bad = [r for r in results if r["verdict"] in ("MISSED", "caught-but-listed-equivalent")]
    considered = len(results) - equiv
    rate = caught / considered if considered else 1.0
    summary = {
        "mutants": len(results), "caught": caught, "equivalent_justified": equiv, "missed": len(bad),
        "catch_rate": rate, "caught_by_mode": {n: sum(n in r["caught_by"][:1] for r in results) for n, _, _ in modes},
        "headdims": args.headdims, "modes": [m[0] for m in modes], "all_modes": args.all_modes, "only": args.only,
        "sources": f"git {commit}" if args.ref else f"working tree at git {commit}",
        "selftest_args": gate.args,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        sys.path.insert(0, str(ROOT / "bench"))
        from timing import machine_info, write_result  # noqa: E402

        # The default gate is "mutation_gate"; a mode subset or the full matrix gets its own file.
        name = "mutation_gate"
        if [m[0] for m in modes] != [m[0] for m in MODES]:
            name += "-" + "+".join(m[0] for m in modes)
        if args.all_modes:
            name += "-all-modes"
        path = write_result(name, {"summary": summary, "baseline": baseline, "mutants": results,
                                              "machine": machine_info()}, args.out)
        print(f"wrote {path}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
