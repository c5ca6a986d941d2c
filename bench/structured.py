"""Structured outputs' cost: decode step time with a JSON-schema constraint against unconstrained decoding, and grammar
compile times.

    python bench/structured.py                       # the default model, batches 1 16 64, 3 rounds, 2 threads
    python bench/structured.py --batches 16 --rounds 5 --steps 24

Decode: B sequences of one chat prompt (temperature 1.0, a seed each) are prefilled, then ``--steps`` engine steps
are timed one by one while all B are decoding (the median step is reported); the constrained run's schema is an
array of 6 person objects (strings, a bounded integer, an enum, an array of enums: about 150 tokens), so no sequence
finishes inside the timed steps, and the free run ignores EOS. The two runs alternate within each round (their
order swapped every round), so a slow spell of a shared machine hits both; the overhead reported is the median of
the per-round ratios of median step times. The time spent in the constraint stage (grammar masks computed and
applied) and in the matchers' accept (advancing past each new token) is timed too: the direct cost, which load
blurs less; and the process CPU time per step (all threads), which waiting for a busy machine's cores does not
inflate as it does wall time.

Compile: for each schema of the test suite (tests/structured_fixtures.py), building its llguidance matcher over
the default model's tokenizer (what a cache miss costs, off the engine loop), the check StructuredOutputsParams
runs when it is made, and the one-time llguidance tokenizer build. Results: bench/results/structured-*.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from structured_fixtures import SCHEMAS  # noqa: E402
from timing import machine_info, write_result  # noqa: E402

TARGET_OVERHEAD_AT_16 = 0.10

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}
BENCH_SCHEMA = {"type": "array", "items": PERSON, "minItems": 6, "maxItems": 6}


class Timed:
    """Wraps a callable to add up the time spent in it (the sampler's constraint stage, the matchers' accept)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self.inner(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def decode_steps(llm, batch: int, steps: int, constrained: bool, round_index: int, timer: Timed,
                 accept: Timed) -> dict:
    """Median seconds per engine step over ``steps`` steps with ``batch`` sequences all decoding."""
    from fastinfer import SamplingParams, StructuredOutputsParams

    engine = llm.engine
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "List six people as JSON."}])
    ids = tok.encode(text, add_special_tokens=False)
    so = StructuredOutputsParams(json=BENCH_SCHEMA) if constrained else None
    for i in range(batch):
        params = SamplingParams(temperature=1.0, seed=1000 * round_index + i, max_tokens=steps + 8,
                                ignore_eos=not constrained, structured_outputs=so)
        engine.add_request(f"r{round_index}-{int(constrained)}-{i}", ids, params)
    while engine.num_waiting or any(not s.output_token_ids for s in engine.scheduler.running):
        engine.step()  # prefill (and the grammar compile, a cache hit after the first round)
    times, cpu, timer.seconds, accept.seconds = [], [], 0.0, 0.0
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        engine.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if len(engine.scheduler.running) != batch:
            raise RuntimeError("a sequence finished inside the timed steps: the benchmark schema is too short")
    constraint_s, accept_s = timer.seconds, accept.seconds
    while engine.has_unfinished():
        for rid in list(engine.requests):
            engine.abort(rid)
        engine.step()
    return {"step_s": statistics.median(times), "mean_step_s": statistics.mean(times),
            "cpu_step_s": statistics.median(cpu),
            "constraint_stage_s_per_step": constraint_s / steps, "accept_s_per_step": accept_s / steps}


def compile_times(llm, repeat: int) -> dict:
    import llguidance

    from fastinfer import StructuredOutputsParams
    from fastinfer.engine.grammar_compiler import GrammarCompiler

    tok = llm.get_tokenizer()
    compiler = GrammarCompiler(tok, llm.config.vocab_size, tok.eos_token_ids)
    t0 = time.perf_counter()
    lltok = compiler.llg_tokenizer()
    tokenizer_s = time.perf_counter() - t0
    out = {"llguidance_tokenizer_build_s": tokenizer_s, "schemas": {}}
    for name, schema in {**SCHEMAS, "bench": BENCH_SCHEMA}.items():
        checks, builds = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            params = StructuredOutputsParams(json=schema)
            checks.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            matcher = llguidance.LLMatcher(lltok, params.llguidance_grammar, log_level=0)
            builds.append(time.perf_counter() - t0)
            assert not matcher.is_error(), matcher.get_error()
        out["schemas"][name] = {"params_check_s": statistics.median(checks), "compile_s": statistics.median(builds)}
    compiler.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import fastinfer
    from fastinfer import LLM

    torch.set_num_threads(args.threads)
    fastinfer.set_num_threads(args.threads)
    llm = LLM(args.model, max_num_seqs=max(args.batches), kv_cache_memory_bytes=1 << 30)
    from fastinfer.engine.grammar_matcher import GrammarMatcher

    timer = Timed(llm.engine.sampler.constraints.apply)
    llm.engine.sampler.constraints.apply = timer
    accept = Timed(GrammarMatcher.accept)  # each sequence's matcher advancing past its new token
    GrammarMatcher.accept = lambda self, token: accept(self, token)

    comp = compile_times(llm, repeat=5)
    print(f"llguidance tokenizer build: {comp['llguidance_tokenizer_build_s'] * 1e3:.0f} ms (once per engine)")
    for name, c in comp["schemas"].items():
        print(f"compile {name:>9}: {c['compile_s'] * 1e3:7.2f} ms   params check {c['params_check_s'] * 1e3:6.2f} ms")

    decode_steps(llm, 1, 4, True, -1, timer, accept)  # warm-up: the first compile, allocations
    rounds: dict[int, list[dict]] = {b: [] for b in args.batches}
    for r in range(args.rounds):
        for b in args.batches:
            order = (False, True) if r % 2 == 0 else (True, False)
            res = {c: decode_steps(llm, b, args.steps, c, r, timer, accept) for c in order}
            ratio = res[True]["step_s"] / res[False]["step_s"]
            cpu_ratio = res[True]["cpu_step_s"] / res[False]["cpu_step_s"]
            rounds[b].append({"free": res[False], "json_schema": res[True], "ratio": ratio, "cpu_ratio": cpu_ratio})
            print(f"round {r} batch {b:3d}: free {res[False]['step_s'] * 1e3:7.2f} ms/step, json schema "
                  f"{res[True]['step_s'] * 1e3:7.2f} ms/step (constraint stage "
                  f"{res[True]['constraint_stage_s_per_step'] * 1e3:.2f} ms, accept "
                  f"{res[True]['accept_s_per_step'] * 1e3:.2f} ms), ratio {ratio:.3f}, CPU-time ratio "
                  f"{cpu_ratio:.3f}", flush=True)
    summary = {}
    for b, rs in rounds.items():
        summary[b] = {
            "free_step_ms": statistics.median(x["free"]["step_s"] for x in rs) * 1e3,
            "json_schema_step_ms": statistics.median(x["json_schema"]["step_s"] for x in rs) * 1e3,
            "constraint_stage_ms": statistics.median(x["json_schema"]["constraint_stage_s_per_step"] for x in rs) * 1e3,
            "accept_ms": statistics.median(x["json_schema"]["accept_s_per_step"] for x in rs) * 1e3,
            "overhead": statistics.median(x["ratio"] for x in rs) - 1.0,
            "per_round_ratios": [x["ratio"] for x in rs],
            "free_cpu_step_ms": statistics.median(x["free"]["cpu_step_s"] for x in rs) * 1e3,
            "json_schema_cpu_step_ms": statistics.median(x["json_schema"]["cpu_step_s"] for x in rs) * 1e3,
            "cpu_overhead": statistics.median(x["cpu_ratio"] for x in rs) - 1.0,
            "per_round_cpu_ratios": [x["cpu_ratio"] for x in rs],
        }
        s = summary[b]
        print(f"batch {b:3d}: free {s['free_step_ms']:.2f} ms/step, json schema {s['json_schema_step_ms']:.2f} "
              f"ms/step, overhead {s['overhead'] * 100:+.1f}% (per round: "
              f"{', '.join(f'{x:.3f}' for x in s['per_round_ratios'])}), "
              f"constraint stage {s['constraint_stage_ms']:.2f} ms, accept {s['accept_ms']:.2f} ms; CPU time per "
              f"step {s['free_cpu_step_ms']:.2f} / {s['json_schema_cpu_step_ms']:.2f} ms, overhead "
              f"{s['cpu_overhead'] * 100:+.1f}% (per round: "
              f"{', '.join(f'{x:.3f}' for x in s['per_round_cpu_ratios'])})")
    if 16 in summary:
        for what in ("overhead", "cpu_overhead"):
            met = summary[16][what] <= TARGET_OVERHEAD_AT_16
            print(f"target: {what} <= {TARGET_OVERHEAD_AT_16:.0%} at batch 16: {'met' if met else 'NOT met'}")
    if not args.no_write:
        path = write_result("structured", {
            "args": vars(args), "machine": machine_info(), "bench_schema": BENCH_SCHEMA,
            "target_overhead_at_16": TARGET_OVERHEAD_AT_16, "compile": comp,
            "decode": {str(b): {"summary": summary[b], "rounds": rounds[b]} for b in args.batches}})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
