"""Reference attention for the tests, and the tolerance rule the tests share.

The reference is plain torch, computed in float64 (``upcast=True``). The same code
run with ``upcast=False`` is the *low-precision reference*: it shows how much error
an honest implementation in the input dtype makes, and the kernels are allowed
at most twice that (flash-attention's rule, see ``assert_close``).

Low-precision reference, step by step (as in flash-attention's ``attention_ref``
with ``upcast=False``):

1. q, k, v stay in the input dtype; ``S = q @ k^T`` is a matmul in that dtype
   (so the scores are rounded to it);
2. S goes to float32; scale, softcap, ALiBi, masking, softmax and the
   log-sum-exp are float32;
3. the probabilities P are cast back to the input dtype and ``O = P @ v`` is a
   matmul in that dtype (so O is rounded to it).

For float32 inputs this is simply the float32 computation.

Semantics (flash-attn 2.x):

* query i of a sequence with Sq queries and Sk keys sits at position
  ``i' = i + Sk - Sq`` (bottom-right alignment);
* window (left, right): key j is visible iff ``i' - left <= j <= i' + right``,
  -1 meaning unbounded on that side; causal means right = 0;
* scores = softmax_scale * q.k, then ``softcap * tanh(scores / softcap)``, then
  ``- slope[h] * |i' - j|`` (ALiBi);
* GQA: query head h reads key/value head ``h // (H // Hk)``;
* a query that sees no key outputs zeros and its log-sum-exp is +inf;
* the log-sum-exp is natural-log.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------- inputs


def randn(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values drawn in float32 from `gen`, then cast to `dtype`."""
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale).to(dtype)


def cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    """(batch + 1,) int32 prefix sums of `lengths`."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
    return out


def as_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


# ----------------------------------------------------------------------------- attention


def visible_keys(Sq: int, Sk: int, causal: bool, window_size: Sequence[int]) -> torch.Tensor:
    """(Sq, Sk) bool: which keys each query row sees, flash-attn's bottom-right aligned causal mask and window."""
    ipos = torch.arange(Sq, dtype=torch.int64)[:, None] + (Sk - Sq)
    j = torch.arange(Sk, dtype=torch.int64)[None, :]
    left, right = window_size[0], 0 if causal else window_size[1]
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        visible &= j >= ipos - left
    if right >= 0:
        visible &= j <= ipos + right
    return visible


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: Optional[float] = None,
                  causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                  alibi_slopes: Optional[torch.Tensor] = None, upcast: bool = True):
    """Dense attention. q (B, Sq, H, D); k, v (B, Sk, Hk, D); alibi_slopes (H,) or (B, H).

    Returns out (B, Sq, H, D) and lse (B, H, Sq): float64 when `upcast`, else out in
    q's dtype and lse in float32 (see the module docstring).
    """
    q, k, v = as_torch(q), as_torch(k), as_torch(v)
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    assert H % Hk == 0
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    acc = torch.float64 if upcast else torch.float32
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // Hk, dim=2)
    v = v.repeat_interleave(H // Hk, dim=2)

    scores = torch.einsum("bthd,bshd->bhts", q, k).to(acc) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    ipos = torch.arange(Sq, dtype=torch.int64)[:, None] + (Sk - Sq)  # (Sq, 1)
    j = torch.arange(Sk, dtype=torch.int64)[None, :]  # (1, Sk)
    if alibi_slopes is not None:
        slopes = as_torch(alibi_slopes).to(acc)
        slopes = slopes.reshape(1, H, 1, 1) if slopes.dim() == 1 else slopes.reshape(B, H, 1, 1)
        scores = scores - slopes * (ipos - j).abs().to(acc)
    visible = visible_keys(Sq, Sk, causal, window_size)
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows that see nothing
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    probs = probs.masked_fill(empty[..., None], 0.0)
    probs = probs.to(v.dtype)
    out = torch.einsum("bhts,bshd->bthd", probs, v)
    lse = lse.masked_fill(empty, float("inf"))
    return out, lse


def attention_ref_varlen(q, k, v, cu_q: Sequence[int], cu_k: Sequence[int], *, alibi_slopes=None, **kw):
    """Packed sequences, one dense reference call per sequence.

    q (total_q, H, D); k, v (total_k, Hk, D). Returns out (total_q, H, D), lse (H, total_q).
    """
    q, k, v = as_torch(q), as_torch(k), as_torch(v)
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        slopes = alibi_slopes
        if slopes is not None and as_torch(slopes).dim() == 2:
            slopes = as_torch(slopes)[b]
        o, l = attention_ref(q[None, cu_q[b]:cu_q[b + 1]], k[None, cu_k[b]:cu_k[b + 1]], v[None, cu_k[b]:cu_k[b + 1]],
                             alibi_slopes=slopes, **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` rows of one sequence of a paged cache (num_blocks, block_size, Hk, D),
    read block by block through its block_table row."""
    block_size = cache.shape[1]
    nblocks = (length + block_size - 1) // block_size
    blocks = [int(x) for x in block_table[:nblocks]]
    rows = cache[blocks].reshape(-1, *cache.shape[2:]) if blocks else cache[:0, 0]
    return rows[:length]


def expected_append(cache, new, lens, batch_idx=None, block_table=None):
    """cache after writing new[b, i] at position lens[b] + i of sequence b (dense or paged)."""
    cache = cache.clone()
    if new is None:
        return cache
    for b in range(new.shape[0]):
        for i in range(new.shape[1]):
            pos = int(lens[b]) + i
            if block_table is not None:
                bs = cache.shape[1]
                cache[int(block_table[b, pos // bs]), pos % bs] = new[b, i]
            else:
                row = b if batch_idx is None else int(batch_idx[b])
                cache[row, pos] = new[b, i]
    return cache


def paged_cache(gen, dtype, lengths, block_size, hk, d, spare_blocks=3):
    """A paged cache whose blocks are handed out to the sequences in a random order.

    Returns (k_cache, v_cache, block_table): sequence b gets enough blocks for lengths[b]
    keys (at least one); the rest of its table row is -1, which the kernels never read."""
    nblk = [max(1, (n + block_size - 1) // block_size) for n in lengths]
    num_blocks = sum(nblk) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    width = max(nblk)
    table = torch.full((len(lengths), width), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[at:at + n]
        at += n
    kc = randn((num_blocks, block_size, hk, d), dtype, gen)
    vc = randn((num_blocks, block_size, hk, d), dtype, gen)
    return kc, vc, table


def kvcache_ref(q, k_cache, v_cache, lengths, batch_idx=None, block_table=None, alibi=None, **kw):
    """Per sequence: the first lengths[b] keys of its cache row (dense) or blocks (paged)."""
    def fn(upcast):
        outs, lses = [], []
        for b in range(q.shape[0]):
            n = int(lengths[b])
            if block_table is not None:
                k, v = gather_paged(k_cache, block_table[b], n), gather_paged(v_cache, block_table[b], n)
            else:
                row = b if batch_idx is None else int(batch_idx[b])
                k, v = k_cache[row, :n], v_cache[row, :n]
            slopes = alibi[b] if alibi is not None and alibi.dim() == 2 else alibi
            o, l = attention_ref(q[b:b + 1], k[None], v[None], alibi_slopes=slopes, upcast=upcast, **kw)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs), torch.cat(lses)
    return fn


def attention_ref_paged(q, k_cache, v_cache, cu_q: Sequence[int], seqlens_k: Sequence[int], block_table, **kw):
    """Varlen queries against a paged cache: gather each sequence's keys, then attention_ref_varlen."""
    ks = [gather_paged(as_torch(k_cache), block_table[b], int(n)) for b, n in enumerate(seqlens_k)]
    vs = [gather_paged(as_torch(v_cache), block_table[b], int(n)) for b, n in enumerate(seqlens_k)]
    cu_k = [0]
    for n in seqlens_k:
        cu_k.append(cu_k[-1] + int(n))
    return attention_ref_varlen(q, torch.cat(ks), torch.cat(vs), cu_q, cu_k, **kw)


# ----------------------------------------------------------------------------- tolerance

# Added to twice the low-precision reference's error. It only matters when that
# error is (nearly) zero, e.g. a single key, where the output is an exact copy of v.
OUT_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
LSE_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _dtype_of(x) -> torch.dtype:
    return as_torch(x).dtype


def tolerance(out, ref: torch.Tensor, lowp_ref: torch.Tensor, floor: Optional[float] = None) -> float:
    """The largest error allowed for `out`: 2 * max|lowp_ref - ref| + floor (finite entries of ref)."""
    ref = as_torch(ref).double()
    lowp = as_torch(lowp_ref).double()
    fin = torch.isfinite(ref)
    lowp_err = (lowp[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
    if floor is None:
        floor = OUT_FLOOR[_dtype_of(out)]
    return 2 * lowp_err + floor


def assert_close(out, ref: torch.Tensor, lowp_ref: torch.Tensor, *, floor: Optional[float] = None, what: str = "out"):
    """flash-attention's rule: max|out - ref| <= 2 * max|lowp_ref - ref| + floor.

    Infinite entries of ref (the +inf log-sum-exp of a row without keys) must be
    matched exactly; out must hold no NaN (outputs are poisoned with NaN before
    the kernels run, so a NaN also means an element was never written).
    """
    out_t = as_torch(out)
    assert out_t.shape == ref.shape, f"{what}: shape {tuple(out_t.shape)} != reference {tuple(ref.shape)}"
    o = out_t.double()
    r = as_torch(ref).double()
    nan = torch.isnan(o)
    assert not nan.any(), f"{what}: {int(nan.sum())} NaN entries (unwritten?), first at {nan.nonzero()[0].tolist()}"
    inf = ~torch.isfinite(r)
    if inf.any():
        assert torch.equal(o[inf], r[inf]), f"{what}: entries expected to be {r[inf].unique().tolist()} are {o[inf].tolist()[:8]}"
    assert torch.isfinite(o[~inf]).all(), f"{what}: non-finite entries where the reference is finite"
    if (~inf).any():
        err = (o[~inf] - r[~inf]).abs()
        tol = tolerance(out_t, ref, lowp_ref, floor)
        worst = err.max().item()
        if worst > tol:
            idx = (~inf).nonzero()[err.argmax()].tolist()
            raise AssertionError(f"{what}: max error {worst:.3g} at {idx} (got {o[tuple(idx)].item():.6g}, expected "
                                 f"{r[tuple(idx)].item():.6g}) exceeds tolerance {tol:.3g} "
                                 f"(2 * low-precision reference error + floor)")


def check(out, lse, ref_fn: Callable[..., tuple], lse_dtype: Optional[torch.dtype] = None):
    """Compare out (and lse, if not None) with ref_fn(upcast=True) under the tolerance of ref_fn(upcast=False)."""
    ref_out, ref_lse = ref_fn(upcast=True)
    lowp_out, lowp_lse = ref_fn(upcast=False)
    assert_close(out, ref_out, lowp_out, what="out")
    if lse is not None:
        assert _dtype_of(lse) == torch.float32, f"lse dtype {_dtype_of(lse)}"
        in_dtype = lse_dtype or _dtype_of(out)
        assert_close(lse, ref_lse, lowp_lse, floor=LSE_FLOOR[in_dtype], what="lse")


def alibi_slopes(nheads: int, batch: Optional[int] = None, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """float32 ALiBi slopes: the usual geometric ones (H,), or random positive ones (B, H)."""
    if batch is None:
        return torch.tensor([2.0 ** (-8.0 * (h + 1) / nheads) for h in range(nheads)], dtype=torch.float32)
    return torch.rand(batch, nheads, generator=gen, dtype=torch.float32) * 0.5 + 0.01


def snapshot(ns) -> dict:
    """Copies of every tensor attribute of a namespace (see assert_unchanged)."""
    return {name: val.clone() for name, val in vars(ns).items() if isinstance(val, torch.Tensor)}


def assert_unchanged(ns, before: dict) -> None:
    """Every tensor of ns is bit for bit as in `before` (NaN poison included)."""
    for name, old in before.items():
        new = getattr(ns, name)
        same = new.shape == old.shape and torch.equal(torch.isnan(new), torch.isnan(old)) and \
            torch.equal(new.nan_to_num(), old.nan_to_num())
        assert same, f"{name} was modified by a rejected call"


def check_rejected(ns, call: Callable, exc: type, match: str) -> None:
    """call(ns) must raise exc with a message matching `match` and leave every tensor of ns as it
    was: a bad call loses nothing."""
    import pytest

    before = snapshot(ns)
    with pytest.raises(exc, match=match):
        call(ns)
    assert_unchanged(ns, before)
