#!/usr/bin/env python
"""Smoke test for an installed fastinfer: import it, print how it was built, run the
attention kernels on tiny inputs and compare with a numpy reference.

    python scripts/smoke_test.py

Needs only numpy; with torch importable it also runs the kernels on torch bf16 tensors.
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import fastinfer


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """float64 attention, (B, Sq, H, D) x (B, Sk, Hk, D); causal aligned to the bottom-right corner."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    k = np.repeat(k, H // Hk, axis=2)
    v = np.repeat(v, H // Hk, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    if causal:
        future = np.arange(Sk)[None, :] > np.arange(Sq)[:, None] + (Sk - Sq)
        s = np.where(future, -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def report(name: str, out: np.ndarray, ref: np.ndarray, atol: float) -> bool:
    err = float(np.abs(np.asarray(out, dtype=np.float64) - ref).max())
    ok = bool(np.isfinite(err)) and err <= atol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |out - ref| = {err:.2e} (tolerance {atol:.0e})")
    return ok


def numpy_checks(rng: np.random.Generator) -> list[bool]:
    q = rng.standard_normal((2, 37, 4, 64), dtype=np.float32)
    k = rng.standard_normal((2, 37, 2, 64), dtype=np.float32)
    v = rng.standard_normal((2, 37, 2, 64), dtype=np.float32)
    out = fastinfer.flash_attn_func(q, k, v, causal=True)
    results = [isinstance(out, np.ndarray) and out.shape == q.shape and out.dtype == np.float32]
    if not results[0]:
        print(f"FAIL numpy flash_attn_func returned {type(out).__name__} {getattr(out, 'shape', None)}")
    results.append(report("numpy float32 flash_attn_func causal GQA", out, reference(q, k, v, True), 2e-5))

    # One decode step against a paged cache with an odd block size and a shuffled block table.
    B, L, Hk, D, bs = 3, 29, 2, 64, 5
    kd = rng.standard_normal((B, L, Hk, D), dtype=np.float32)
    vd = rng.standard_normal((B, L, Hk, D), dtype=np.float32)
    nblk = -(-L // bs)
    table = rng.permutation(B * nblk).astype(np.int32).reshape(B, nblk)
    k_cache = np.zeros((B * nblk, bs, Hk, D), np.float32)
    v_cache = np.zeros_like(k_cache)
    for b in range(B):
        for t in range(L):
            k_cache[table[b, t // bs], t % bs] = kd[b, t]
            v_cache[table[b, t // bs], t % bs] = vd[b, t]
    qd = rng.standard_normal((B, 1, 4, D), dtype=np.float32)
    out = fastinfer.flash_attn_with_kvcache(qd, k_cache, v_cache, cache_seqlens=L, block_table=table)
    results.append(report("numpy float32 flash_attn_with_kvcache paged (block 5)", out, reference(qd, kd, vd, False),
                          2e-5))
    return results


def torch_checks(torch, rng: np.random.Generator) -> list[bool]:
    q, k, v = (rng.standard_normal((1, 50, 4, 128), dtype=np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v))
    out = fastinfer.flash_attn_func(tq, tk, tv, causal=True)
    ok = isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and tuple(out.shape) == q.shape
    if not ok:
        print(f"FAIL torch flash_attn_func returned {type(out).__name__} {getattr(out, 'dtype', None)}")
    # Reference from the bf16-rounded inputs; the tolerance allows bf16 rounding of the output.
    ref = reference(*(x.float().numpy() for x in (tq, tk, tv)), causal=True)
    return [ok, report("torch bfloat16 flash_attn_func causal", out.float().numpy(), ref, 2e-2)]


def main() -> int:
    print(f"fastinfer {fastinfer.__version__} from {fastinfer.__file__}")
    print(json.dumps(fastinfer.build_info(), indent=2))
    rng = np.random.default_rng(0)
    results = numpy_checks(rng)
    try:
        import torch
    except ImportError:
        print("torch not importable: skipping the torch bf16 check")
    else:
        print(f"torch {torch.__version__}")
        results += torch_checks(torch, rng)
    if all(results):
        print(f"smoke test passed ({len(results)} checks)")
        return 0
    print(f"smoke test FAILED ({results.count(False)} of {len(results)} checks)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
