"""Offline batch on Ray Data (fastinfer.integrations.ray) against one process, on this machine, in the same run.

    python bench/ray_batch.py                      # 256 prompts, 2 rounds
    python bench/ray_batch.py --rounds 3 --max-concurrent-batches 1 2
    python bench/ray_batch.py --quick              # 32 prompts, 1 round: a smoke test

Workload: N prompts (default 256) of --prompt-tokens random token ids, --max-tokens new tokens each, greedy,
EOS ignored, fresh prompts every round (no prefix-cache hits across rounds). Two ways to run the same job:

- ray: a local cluster (``ray.init(num_cpus=2)``) and ``build_processor`` with ``concurrency=2``, ``num_cpus=1``
  (two actors, one engine thread each), ``batch_size`` 32, over ``ray.data.from_items`` in N / batch_size
  blocks; the driver iterates the output batches as they come (``iter_batches(prefetch_batches=0)``).
- single: ``LLM(...)`` in this process with 2 threads, ``LLM.generate`` on all N prompts at once.

Each side's wall time is the whole job as a user runs it: the ray side includes starting its actors and loading
the model in each, the single side loading its model. Reported per side, medians over rounds: wall time, output
tok/s, time to first result (ray: the first output batch reaching the driver; single: the first request to
finish, from the start of the job) and, for single, the model load and generate-only time. The sides alternate
(and swap which goes first each round); the ratio ray / single is taken per round, then the median. The cluster is
started once, before the first round, and not timed. Results: bench/results/ray_batch-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine_info, write_result  # noqa: E402

TARGET = 0.9  # ray / single throughput, issue 20


def make_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    """Random token ids away from the special tokens at the start of the vocabulary."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab, size=(n, length)).tolist()


def single_round(model: str | None, engine: dict, prompts: list[list[int]], max_tokens: int, threads: int) -> dict:
    import torch

    import fastinfer
    from fastinfer import LLM, SamplingParams

    torch.set_num_threads(threads)
    fastinfer.set_num_threads(threads)
    t0_wall = time.time()
    t0 = time.perf_counter()
    llm = LLM(model, **engine)
    load = time.perf_counter() - t0
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == max_tokens * len(prompts), tokens
    first = min(o.metrics.finished_time for o in outs) - t0_wall
    del llm
    return {"wall_s": wall, "tok_per_s": tokens / wall, "first_result_s": first, "load_s": load,
            "generate_s": wall - load, "generate_tok_per_s": tokens / (wall - load), "output_tokens": tokens,
            "load_1m_before": os.getloadavg()[0]}


def ray_round(model: str | None, engine: dict, prompts: list[list[int]], max_tokens: int, batch_size: int,
              max_concurrent_batches: int) -> dict:
    import ray

    from fastinfer.integrations.ray import FastInferProcessorConfig, build_processor

    rows = [{"id": i, "prompt": p, "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens,
                                                        "ignore_eos": True}} for i, p in enumerate(prompts)]
    config = FastInferProcessorConfig(model_source=model, engine_kwargs=engine, batch_size=batch_size,
                                      concurrency=2, num_cpus=1, max_concurrent_batches=max_concurrent_batches)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    blocks = max(2, -(-len(rows) // batch_size))  # a block per batch, and one per actor at least
    ds = build_processor(config)(ray.data.from_items(rows, override_num_blocks=blocks))
    first = None
    ids: list[int] = []
    tokens = 0
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow"):
        if first is None:
            first = time.perf_counter() - t0
        ids += batch.column("id").to_pylist()
        tokens += sum(batch.column("num_generated_tokens").to_pylist())
        errors = [e for e in batch.column("error").to_pylist() if e is not None]
        assert not errors, errors[:3]
    wall = time.perf_counter() - t0
    assert sorted(ids) == list(range(len(prompts))), "ids lost or repeated"
    assert tokens == max_tokens * len(prompts), tokens
    return {"wall_s": wall, "tok_per_s": tokens / wall, "first_result_s": first, "output_tokens": tokens,
            "load_1m_before": load}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or model folder (default: the built-in SmolLM2-135M)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (EOS ignored)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="the processor's batch_size")
    ap.add_argument("--max-concurrent-batches", type=int, nargs="+", default=[1],
                    help="the processor's max_concurrent_batches; several values: one ray side each")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20,
                    help="of the single process; each of the 2 actors gets half (default: 512 MiB)")
    ap.add_argument("--quick", action="store_true", help="32 prompts, 1 round")
    ap.add_argument("--no-write", action="store_true", help="print only; no JSON under bench/results")
    ap.add_argument("--name", default="ray_batch", help="result file name prefix (default: %(default)s)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.rounds = 32, 1
    if min(args.prompts, args.prompt_tokens, args.max_tokens, args.rounds, args.batch_size,
           *args.max_concurrent_batches) < 1:
        ap.error("every count must be >= 1")

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    from fastinfer.loading import default_model_path, load_model

    model = args.model
    vocab = load_model(model or default_model_path()).config.vocab_size  # for the random prompts
    single_engine = {"kv_cache_memory_bytes": args.kv_cache_memory_bytes, "max_num_seqs": args.prompts}
    actor_engine = {"kv_cache_memory_bytes": args.kv_cache_memory_bytes // 2}
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray.init: {time.perf_counter() - t:.1f} s", flush=True)

    sides = ["single"] + [f"ray_mcb{m}" for m in args.max_concurrent_batches]

    def run(side: str, prompts: list[list[int]]) -> dict:
        if side == "single":
            return single_round(model, single_engine, prompts, args.max_tokens, 2)
        m = int(side.removeprefix("ray_mcb"))
        return ray_round(model, actor_engine, prompts, args.max_tokens, args.batch_size, m)

    # Warm-up, untimed: page cache, imports, Ray's first worker processes.
    warm = make_prompts(vocab, 8, args.prompt_tokens, seed=99_999)
    for side in sides:
        run(side, warm)

    rounds = []
    for r in range(args.rounds):
        prompts = make_prompts(vocab, args.prompts, args.prompt_tokens, seed=1000 + r)
        order = sides if r % 2 == 0 else list(reversed(sides))
        res = {"order": order}
        for side in order:
            res[side] = run(side, prompts)
            x = res[side]
            print(f"round {r} {side:>9}: {x['wall_s']:6.1f} s  {x['tok_per_s']:6.1f} tok/s  first result "
                  f"{x['first_result_s']:5.1f} s  (load avg {x['load_1m_before']:.1f})", flush=True)
        for side in sides[1:]:
            res[f"{side}_ratio"] = res[side]["tok_per_s"] / res["single"]["tok_per_s"]
        rounds.append(res)

    summary = {}
    print()
    print("| side | wall s | output tok/s | ratio to single (per round) | time to first result |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for side in sides:
        s = {k: med([x[side][k] for x in rounds]) for k in ("wall_s", "tok_per_s", "first_result_s")}
        if side != "single":
            ratios = [x[f"{side}_ratio"] for x in rounds]
            s["ratio"] = med(ratios)
            s["round_ratios"] = ratios
            s["target_met"] = s["ratio"] >= TARGET
            shown = f"{s['ratio']:.3f} ({', '.join(f'{v:.3f}' for v in ratios)}); target {TARGET}: " \
                    f"{'met' if s['target_met'] else 'missed'}"
        else:
            s.update({k: med([x[side][k] for x in rounds]) for k in ("load_s", "generate_s", "generate_tok_per_s")})
            shown = "1"
        summary[side] = s
        print(f"| {side} | {s['wall_s']:.1f} | {s['tok_per_s']:.1f} | {shown} | {s['first_result_s']:.1f} s |")
    ray.shutdown()

    payload = {"benchmark": "ray_batch", "argv": sys.argv[1:], "target_ratio": TARGET,
               "workload": {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                            "max_tokens": args.max_tokens, "batch_size": args.batch_size, "greedy": True,
                            "ignore_eos": True, "ray": "concurrency=2, num_cpus=1 (1 thread each)",
                            "single": "one process, 2 threads", "single_engine": single_engine,
                            "actor_engine": actor_engine},
               "ray_version": ray.__version__, "summary": summary, "rounds": rounds, "machine": machine_info()}
    if not args.no_write:
        print("wrote", write_result(args.name, payload))


if __name__ == "__main__":
    main()
