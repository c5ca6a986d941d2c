"""Where one decode step's time goes: matmuls, attention kernels, other torch ops, Python, the engine.

    python bench/profile_step.py                 # batch 1 and 64, the default model, bf16, 2 threads
    python bench/profile_step.py --batches 16

For each batch size: B prompts of 64 random tokens are prefilled, then decode steps are timed
(medians of --steps). Where the model runs its layers as one native call (the CPU decoder stack,
fastinfer.models.cpu_decoder), that step is timed first: the call, the output head, the engine. The
components below are then measured on the per-op path (the same kernels called one by one from Python):
- engine: scheduler + sampler + detokenizer (step time minus the model runner's time);
- matmuls: runner time minus the runner time with every linear layer replaced by a preallocated
  output (same shapes, no work), i.e. what the matmuls cost where they run (cold caches included);
- matmuls alone: the same linears called back to back with the model's weights and kernels (on CPU:
  fastinfer's packed linear on its pool, torch at one thread, as in a step);
- attention: time inside fastinfer's attention and cache-write kernels, in the real step and in the
  step without matmuls (the difference: caches the matmuls evicted);
- the rest of the runner: norms, rotary, activations, Python (runner time without matmuls minus
  attention there).
Results: bench/results/profile_step-*.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine_info, write_result  # noqa: E402


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class Timed:
    """Wraps a callable and sums the wall time spent inside it."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0


def profile_batch(llm, batch: int, steps: int) -> dict:
    import fastinfer._C as C
    import fastinfer.kernels.forward as attention_mod
    import fastinfer.models.layers as layers
    import fastinfer.kernels.ops as ops_mod
    from fastinfer import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(100, llm.get_tokenizer().vocab_size, (64,), generator=g).tolist() for _ in range(batch)]
    eng = llm.engine
    for i, prompt in enumerate(prompts):
        eng.add_request(f"profile-{batch}-{i}", prompt,
                        SamplingParams(temperature=0.0, max_tokens=3 * steps + 8, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()
    eng.step()

    # As the engine runs: the decoder stack as one native call where the model has one (CPU).
    model = eng.runner.model
    native = getattr(model, "cpu_decoder", None)
    native_row: dict = {}
    if native is not None:
        # the head is the only linear called from Python here: float (C.linear) or quantised (C.qlinear)
        runner_exec, head, qhead = Timed(eng.runner.execute), Timed(C.linear), Timed(C.qlinear)
        eng.runner.execute, C.linear, C.qlinear = runner_exec, head, qhead
        try:
            median_ms(eng.step, 2)
            runner_exec.total = head.total = qhead.total = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            wall = (time.perf_counter() - t0) / steps * 1e3
        finally:
            eng.runner.execute, C.linear, C.qlinear = runner_exec.fn, head.fn, qhead.fn
        head_total = head.total + qhead.total
        native_row = {"native_step_ms": wall, "native_layers_ms": (runner_exec.total - head_total) / steps * 1e3,
                      "native_head_ms": head_total / steps * 1e3,
                      "native_engine_ms": wall - runner_exec.total / steps * 1e3}
        print(f"B={batch:3d}: native stack: step {wall:6.1f} ms ({batch / wall * 1e3:.0f} tok/s) | layers (one call) "
              f"{native_row['native_layers_ms']:5.1f} ms | head {native_row['native_head_ms']:5.1f} | engine "
              f"{native_row['native_engine_ms']:4.1f}", flush=True)
        model.cpu_decoder = None  # the breakdown below times the same kernels called one by one from Python

    runner_exec = Timed(eng.runner.execute)
    eng.runner.execute = runner_exec
    kernels = {name: Timed(getattr(mod._C, name)) for mod, name in
               ((attention_mod, "attention_forward"), (ops_mod, "reshape_and_cache"))}
    saved_c = {name: getattr(C, name) for name in kernels}
    for mod in (attention_mod, ops_mod):
        for name, t in kernels.items():
            if hasattr(mod._C, name):
                setattr(mod._C, name, t)
    try:
        step_ms = median_ms(eng.step, steps)
        runner_exec.total = 0.0
        for t in kernels.values():
            t.total = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall = (time.perf_counter() - t0) / steps * 1e3
        runner_ms = runner_exec.total / steps * 1e3
        attention_ms = sum(t.total for t in kernels.values()) / steps * 1e3

        outputs: dict = {}

        def no_matmul(self, x, out_float32=False, activations="int8", float_rows=None):
            dtype = torch.float32 if out_float32 else x.dtype
            key = (x.shape[:-1], self.out_features, dtype)
            if key not in outputs:
                outputs[key] = torch.zeros(*x.shape[:-1], self.out_features, dtype=dtype)
            return outputs[key]

        real = layers.Linear.forward
        layers.Linear.forward = no_matmul
        try:
            runner_exec.total = 0.0
            for t in kernels.values():
                t.total = 0.0
            for _ in range(steps):
                eng.step()
            runner_no_mm = runner_exec.total / steps * 1e3
            attention_no_mm = sum(t.total for t in kernels.values()) / steps * 1e3
        finally:
            layers.Linear.forward = real
    finally:
        model.cpu_decoder = native
        eng.runner.execute = runner_exec.fn
        for name, fn in saved_c.items():
            for mod in (attention_mod, ops_mod):
                setattr(mod._C, name, fn)
        for rid in list(eng.requests):
            eng.abort(rid)
        eng.step()

    x = torch.randn(batch, model.config.hidden_size, dtype=model.dtype)
    xi = torch.randn(batch, model.config.intermediate_size, dtype=model.dtype)
    attn = model.model.layers[0].self_attn
    xo = torch.randn(batch, attn.heads * attn.head_dim, dtype=model.dtype)  # o_proj's input (Gemma 3: not hidden)

    def matmuls():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj(x)
            layer.self_attn.o_proj(xo)
            layer.mlp.gate_up_proj(x)
            layer.mlp.down_proj(xi)
        model.head_proj(x) if model.head_proj is not None else torch.nn.functional.linear(x, model.head_weight())

    threads = torch.get_num_threads()
    if eng.runner.single_torch_thread:
        torch.set_num_threads(1)
    matmuls()
    alone = median_ms(matmuls, steps)
    torch.set_num_threads(threads)
    row = {"batch": batch, "step_ms": step_ms, "wall_ms_per_step": wall, "runner_ms": runner_ms,
           "engine_ms": wall - runner_ms, "matmul_ms": runner_ms - runner_no_mm, "matmul_alone_ms": alone,
           "attention_and_cache_write_ms": attention_ms,
           "attention_without_matmuls_ms": attention_no_mm,
           "rest_of_runner_ms": runner_no_mm - attention_no_mm, "tok_per_s": batch / step_ms * 1e3, **native_row}
    print(f"B={batch:3d}: {'per-op path: ' if native else ''}step {step_ms:6.1f} ms ({row['tok_per_s']:.0f} tok/s) | matmuls {row['matmul_ms']:5.1f} ms "
          f"(alone {alone:5.1f}) | attention+cache write {attention_ms:4.1f} (without matmuls {attention_no_mm:4.1f}) | "
          f"other ops + Python "
          f"{row['rest_of_runner_ms']:4.1f} | engine (schedule, sample, detokenize) {row['engine_ms']:4.1f}",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "q8_0"],
                    help="the LLM's weights (default: auto, a GGUF's quantised tensors natively)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import fastinfer
    from fastinfer import LLM

    fastinfer.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory_bytes=1 << 30,
              quantization=None if args.quantization == "none" else args.quantization)
    rows = [profile_batch(llm, b, args.steps) for b in args.batches]
    out = write_result("profile_step", {"model": llm.model_path, "dtype": args.dtype, "threads": args.threads,
                                        "quantization": args.quantization,
                                        "machine": machine_info(), "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
