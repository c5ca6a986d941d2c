#!/usr/bin/env python
"""One training step of a small Llama through transformers: attn_implementation "fastinfer" vs "sdpa" vs "eager".

    python bench/train_step.py                # full run (several minutes on 2 cores)
    python bench/train_step.py --quick        # fewer repeats: a smoke test
    python bench/train_step.py --threads 2 --out /tmp/results

Model   LlamaConfig: hidden 512, 8 heads of 64 (8 key/value heads), 4 layers, intermediate 1376,
        vocab 1024 (small, so the LM head does not drown the attention), random weights, built with
        the same seed for each implementation (identical weights). fp32, and bf16 weights and
        activations (the model cast with .to(bfloat16)).
Step    batch 4 x 512 tokens, causal LM loss on the inputs as labels, forward + backward
        (gradients zeroed with set_to_none; no optimizer step: it is the same for every
        implementation).
Timing  the three implementations alternate, one step each per round (bench_interleaved), so drift on
        a shared machine hits all alike; medians are reported, minimums are in the JSON.
        Ratio = other implementation's median / fastinfer's (> 1 means fastinfer is faster).
Check   before timing, fastinfer's loss and gradients must match sdpa's (fp32: 1e-4 relative
        gradient norm difference; bf16: 5e-2), or the run fails (exit 1).
Attention the attention alone, forward + backward, at the model's shape ((4, 8, 512, 64) in torch's
        layout, causal): fastinfer.scaled_dot_product_attention vs torch's SDPA vs the eager
        softmax(QK^T)V, interleaved; it is the part of the step the implementations change.
Dispatch the custom-op cost: a decode-sized flash_attn_func call (batch 1, 1 query, 8 heads of 64
        against 8 keys) called directly (no grad: the path the engine takes) vs through
        torch.ops.fastinfer.attention_forward, interleaved, microseconds per call.

Results go to bench/results/ as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

import torch

import fastinfer
from timing import bench_interleaved, machine_info, write_result

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("fastinfer", "sdpa", "eager")
MODEL = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=4,
             intermediate_size=1376, vocab_size=1024, max_position_embeddings=1024)
BATCH, SEQ = 4, 512
TARGETS = {"fp32_sdpa_over_fastinfer": 1.0, "bf16_sdpa_over_fastinfer": 1.0}  # >= : no slower / faster
GRAD_RTOL = {"fp32": 1e-4, "bf16": 5e-2}


def build(impl: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL), attn_implementation=impl, dtype=torch.float32)
    return model.to(dtype).train()


def make_step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss
    return step


def check(tag: str, models: dict, ids) -> dict:
    """fastinfer's loss and gradients against sdpa's; refuse to time a wrong step."""
    grads, losses = {}, {}
    for impl in ("fastinfer", "sdpa"):
        losses[impl] = make_step(models[impl], ids)().item()
        grads[impl] = torch.cat([p.grad.float().flatten() for p in models[impl].parameters()])
    rel = ((grads["fastinfer"] - grads["sdpa"]).norm() / grads["sdpa"].norm()).item()
    if rel > GRAD_RTOL[tag] or abs(losses["fastinfer"] - losses["sdpa"]) > GRAD_RTOL[tag] * abs(losses["sdpa"]):
        raise AssertionError(f"{tag}: fastinfer loss {losses['fastinfer']:.6f} vs sdpa {losses['sdpa']:.6f}, "
                             f"gradient relative difference {rel:.3g} (allowed {GRAD_RTOL[tag]}); not timing")
    return {"loss_fastinfer": losses["fastinfer"], "loss_sdpa": losses["sdpa"], "grad_rel_diff": rel}


def train_case(tag: str, warmup: int, repeat: int) -> dict:
    dtype = DTYPES[tag]
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    models = {impl: build(impl, dtype) for impl in IMPLS}
    agreement = check(tag, models, ids)
    t = bench_interleaved({impl: make_step(models[impl], ids) for impl in IMPLS}, warmup=warmup, repeat=repeat)
    fi = t["fastinfer"].median_s
    row = {"dtype": tag, "check": agreement, "timing": t,
           "ratio_vs_fastinfer": {impl: t[impl].median_s / fi for impl in IMPLS if impl != "fastinfer"}}
    print(f"{tag}: " + ", ".join(f"{impl} {t[impl].median_s * 1e3:.0f} ms" for impl in IMPLS) +
          f" | sdpa/fastinfer {row['ratio_vs_fastinfer']['sdpa']:.2f}x, eager/fastinfer "
          f"{row['ratio_vs_fastinfer']['eager']:.2f}x | grad rel diff vs sdpa {agreement['grad_rel_diff']:.1e}")
    return row


def eager_attention(q, k, v):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")).float(), -1).to(q.dtype) @ v


def attention_case(tag: str, warmup: int, repeat: int) -> dict:
    dtype = DTYPES[tag]
    heads, dim = MODEL["num_attention_heads"], MODEL["hidden_size"] // MODEL["num_attention_heads"]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(BATCH, heads, SEQ, dim, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(BATCH, heads, SEQ, dim, generator=gen).to(dtype)
    fns = {"fastinfer": lambda: fastinfer.scaled_dot_product_attention(q, k, v, is_causal=True),
           "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
           "eager": lambda: eager_attention(q, k, v)}

    def fwd_bwd(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(dout)
        return run

    t = bench_interleaved({impl: fwd_bwd(fn) for impl, fn in fns.items()}, warmup=warmup, repeat=repeat)
    fi = t["fastinfer"].median_s
    row = {"dtype": tag, "shape_bhsd": [BATCH, heads, SEQ, dim], "timing": t,
           "ratio_vs_fastinfer": {impl: t[impl].median_s / fi for impl in IMPLS if impl != "fastinfer"}}
    print(f"{tag} attention fwd+bwd: " + ", ".join(f"{impl} {t[impl].median_s * 1e3:.0f} ms" for impl in IMPLS) +
          f" | sdpa/fastinfer {row['ratio_vs_fastinfer']['sdpa']:.2f}x, eager/fastinfer "
          f"{row['ratio_vs_fastinfer']['eager']:.2f}x")
    return row


def dispatch_case(repeat: int) -> dict:
    q = torch.randn(1, 1, 8, 64)
    k = torch.randn(1, 8, 8, 64)
    scale = 64 ** -0.5

    def direct():
        with torch.no_grad():
            fastinfer.flash_attn_func(q, k, k, causal=True)

    def op():
        with torch.no_grad():
            torch.ops.fastinfer.attention_forward(q, k, k, scale, True, -1, -1, 0.0, None, False)

    def op_grad_mode():  # what a training-mode call pays: the op with autograd in the dispatch
        torch.ops.fastinfer.attention_forward(q, k, k, scale, True, -1, -1, 0.0, None, False)

    t = bench_interleaved({"direct": direct, "custom_op": op, "custom_op_grad_mode": op_grad_mode},
                          warmup=200, repeat=repeat)
    row = {name: x.median_s * 1e6 for name, x in t.items()}
    row["overhead_us"] = row["custom_op"] - row["direct"]
    print(f"dispatch (decode-sized call): direct {row['direct']:.1f} us, custom op {row['custom_op']:.1f} us, "
          f"custom op in grad mode {row['custom_op_grad_mode']:.1f} us -> overhead {row['overhead_us']:.1f} us/call")
    return {"median_us": row, "timing": t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both torch and fastinfer (default 2)")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds per dtype (default 7, quick 2)")
    ap.add_argument("--out", default=None, help="directory for the JSON result (default bench/results)")
    args = ap.parse_args(argv)

    import fastinfer.integrations.transformers as hf

    hf.register()
    torch.set_num_threads(args.threads)
    fastinfer.set_num_threads(args.threads)
    warmup, repeat = (1, 2) if args.quick else (2, 7)
    repeat = args.repeat or repeat
    info = machine_info()
    fi = info["fastinfer"]
    print(f"{info['cpu_model']}, {info['cpus_usable']} cpus; fastinfer {fi['version']} isa={fi['cpu_isa']} "
          f"threads={fi['num_threads']}; torch {info['torch']} threads={torch.get_num_threads()}; "
          f"batch {BATCH} x {SEQ}, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}; "
          f"repeats {repeat}{' (quick)' if args.quick else ''}")
    if (info["load_avg_1m"] or 0) > 0.5:
        print(f"note: load average {info['load_avg_1m']:.1f} before starting; other work shares these cores "
              "(alternating steps keeps ratios fair, absolute times suffer)")
    try:
        rows = [train_case(tag, warmup, repeat) for tag in DTYPES]
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    attn = [attention_case(tag, 1, 3 if args.quick else 15) for tag in DTYPES]
    disp = dispatch_case(500 if args.quick else 3000)
    passes = {f"{r['dtype']}_sdpa_over_fastinfer": r["ratio_vs_fastinfer"]["sdpa"] >= TARGETS[
        f"{r['dtype']}_sdpa_over_fastinfer"] for r in rows}
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in passes.items()))

    payload = {
        "benchmark": "train_step",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "args": vars(args),
        "repeats": {"warmup": warmup, "repeat": repeat},
        "machine": info,
        "model": MODEL,
        "batch": BATCH,
        "seq": SEQ,
        "conventions": {
            "time": "median wall time of one training step (zero_grad, forward, loss, backward); the three "
                    "implementations alternate, one step each per round",
            "ratio": "other implementation's median time / fastinfer's (> 1: fastinfer faster)",
            "check": "fastinfer's loss and flattened gradients vs sdpa's before timing",
            "attention": "attention alone at the model's shape, forward + backward, interleaved",
            "dispatch": "decode-sized call, microseconds: direct kernel call (no grad) vs the custom op",
        },
        "train": rows,
        "attention": attn,
        "dispatch": disp,
        "targets": TARGETS,
        "targets_met": passes,
    }
    path = write_result("train_step-quick" if args.quick else "train_step", payload, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
