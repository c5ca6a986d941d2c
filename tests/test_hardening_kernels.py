"""Issue 14, kernel API: inputs that used to be accepted silently or fail unreadably.

* cu_seqlens that do not start at 0 (rows of out left uninitialised), and index values that wrap
  when narrowed to int32;
* written tensors (outputs, caches, gradients, in-place operands) whose elements share memory
  (expand()ed, overlapping strides) or that share memory with another operand;
* +inf / NaN in q, k or v: softmax gives NaN rows (torch SDPA does), the kernels gave zeros or
  finite garbage, on every CPU SIMD level, in the decode, paged, split-KV, varlen and CpuDecoder
  paths, and the backward pass;
* int/float arguments that pybind rejects without naming them ("incompatible function arguments")
  or that were truncated/wrapped silently.
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import fastinfer
from fastinfer import _C, ops
from fastinfer.kernels.backward import attention_backward
from reference import check_rejected, randn, visible_keys

fa = fastinfer.flash_attn_func
fv = fastinfer.flash_attn_varlen_func
fkv = fastinfer.flash_attn_with_kvcache


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


def opts(scale=0.25):
    o = _C.AttentionOptions()
    o.softmax_scale = scale
    return o


# ----------------------------------------------------------------------------- a float64 softmax reference


def softmax_ref(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D), lse (B, H, Sq), float64, with softmax's
    (torch SDPA's) semantics for non-finite scores: a row with a NaN or +inf score, or whose visible
    scores are all -inf, is NaN. Rows with no visible key (masking) are zeros with lse +inf (flash-attn)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hk, 2), v.repeat_interleave(H // Hk, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * D ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq)[:, None] + Sk - Sq
    j = torch.arange(Sk)[None, :]
    if alibi is not None:
        s = s - alibi.double().reshape(1, H, 1, 1) * (i - j).abs()
    vis = visible_keys(Sq, Sk, causal, window)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1)  # NaN for +inf/NaN scores and for all -inf rows
    # Masked keys take no part (SDPA's matmul would multiply their 0 by an inf in v)
    out = (p[..., None] * v.permute(0, 2, 1, 3)[:, :, None]).masked_fill(~vis[..., None], 0.0).sum(-2).transpose(1, 2)
    lse = torch.logsumexp(s, -1)
    lse = torch.where(torch.isnan(p).any(-1), torch.full_like(lse, float("nan")), lse)
    empty = ~vis.any(-1)  # (Sq,)
    out[:, empty] = 0.0
    lse[..., empty] = float("inf")
    return out, lse


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    out, ref_out = out.double(), ref_out
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), \
        f"NaN rows differ: got {torch.isnan(out).any(-1).nonzero().tolist()}, want {torch.isnan(ref_out).any(-1).nonzero().tolist()}"
    assert torch.equal(torch.isinf(out), torch.isinf(ref_out))
    fin = torch.isfinite(ref_out)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out[fin] - ref_out[fin]).abs().max() <= tol * max(1.0, ref_out[fin].abs().max())
    if lse is not None:
        lse = lse.double()
        assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
        assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        assert (lse[fin] - ref_lse[fin]).abs().max() <= 1e-3 * max(1.0, ref_lse[fin].abs().max())


def poison(x, where, value):
    x = x.clone()
    for idx in where:
        x[idx] = value
    return x


dtypes2 = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _poisoned(bad, q, k, v):
    """One non-finite element; q has both signs, so an inf in k gives +inf scores in some rows
    and -inf scores in others."""
    inf = float("inf")
    if bad == "k_posinf":
        k = poison(k, [(0, 3, 0, 5), (-1, 1, -1, 0)], inf)
        q = q.clone()
        q[0, :, 0, 5] = q[0, :, 0, 5].abs()  # head 0 of sequence 0: +inf scores for certain
    elif bad == "k_neginf":
        k = poison(k, [(0, 2, 0, 1)], -inf)
    elif bad == "k_nan":
        k = poison(k, [(0, 4, 0, 7)], float("nan"))
    elif bad == "q_inf":
        q = poison(q, [(0, q.shape[1] - 1, 1, 3)], inf)
    elif bad == "v_inf":
        v = poison(v, [(0, 1, 0, 2)], inf)
    else:
        v = poison(v, [(-1, 0, -1, 4)], float("nan"))
    return q, k, v


# ----------------------------------------------------------------------------- 9: NaN propagation


NONFINITE_CASES = [(bad, "full") for bad in ("k_posinf", "k_neginf", "k_nan", "q_inf", "v_inf", "v_nan")] + \
    [(bad, mode) for mode in ("causal", "window", "softcap", "alibi") for bad in ("k_posinf", "v_inf")]


@dtypes2
@pytest.mark.parametrize("bad,mode", NONFINITE_CASES, ids=[f"{b}-{m}" for b, m in NONFINITE_CASES])
@pytest.mark.parametrize("shape", ["prefill", "decode"])
def test_nonfinite_inputs_give_nan_rows_like_softmax(cpu_isa, gen, dtype, bad, shape, mode):
    sq, sk, H, Hk, D = (40, 70, 4, 2, 64) if shape == "prefill" else (1, 70, 4, 2, 64)
    q, k, v = (randn((2, s, h, D), dtype, gen) for s, h in ((sq, H), (sk, Hk), (sk, Hk)))
    q, k, v = _poisoned(bad, q, k, v)
    kw = {"causal": {"causal": True}, "window": {"window_size": (20, 3)}, "softcap": {"softcap": 5.0},
          "alibi": {"alibi_slopes": torch.linspace(0.1, 1.0, H)}}.get(mode, {})
    out, lse, _ = fa(q, k, v, return_attn_probs=True, **kw)
    rkw = dict(kw)
    if "window_size" in rkw:
        rkw["window"] = rkw.pop("window_size")
    if "alibi_slopes" in rkw:
        rkw["alibi"] = rkw.pop("alibi_slopes")
    ref_out, ref_lse = softmax_ref(q, k, v, **rkw)
    assert_matches(out, lse, ref_out, ref_lse, dtype)
    if bad in ("k_posinf", "k_nan", "q_inf") and mode not in ("softcap", "causal", "window"):
        assert torch.isnan(out).any(), "the probe must produce NaN rows"


@dtypes2
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("bad", ["k_posinf", "k_nan", "only_key_neginf"])
def test_nonfinite_kvcache_paged_and_split(cpu_isa, gen, dtype, num_splits, bad):
    """Decode against a paged cache, with and without split-KV (each split sees part of the keys)."""
    B, H, Hk, D, bs, L = 2, 4, 2, 64, 16, 200
    nblk = B * (L // bs + 1)
    kc, vc = randn((nblk, bs, Hk, D), dtype, gen), randn((nblk, bs, Hk, D), dtype, gen)
    table = torch.arange(nblk, dtype=torch.int32).reshape(B, -1)
    q = randn((B, 1, H, D), dtype, gen)
    window = (-1, -1)
    if bad == "k_posinf":
        kc[table[0, 5], 3, 0, :] = float("inf")  # key 83 of sequence 0: every score of heads 0-1 is +-inf
    elif bad == "k_nan":
        kc[table[1, 11], 0, 1, 9] = float("nan")  # key 176 of sequence 1 (the last split)
    else:  # the one visible key of sequence 0 scores -inf: softmax over {-inf} is NaN
        q = q.abs()
        kc[table[0, (L - 1) // bs], (L - 1) % bs, :, 0] = float("-inf")
        window = (0, 0)
    lens = i32(L, L)
    out, lse = fkv(q, kc, vc, cache_seqlens=lens, block_table=table, num_splits=num_splits, window_size=window,
                   return_softmax_lse=True)
    dense_k = torch.stack([kc[table[b]].reshape(-1, Hk, D)[:L] for b in range(B)])
    dense_v = torch.stack([vc[table[b]].reshape(-1, Hk, D)[:L] for b in range(B)])
    ref_out, ref_lse = softmax_ref(q, dense_k, dense_v, window=window)
    assert_matches(out, lse, ref_out, ref_lse, dtype)
    assert torch.isnan(out).any()


@dtypes2
def test_nonfinite_varlen(cpu_isa, gen, dtype):
    H, D = 2, 32  # sequences of 5 and 3 queries over 9 and 6 keys
    q, k, v = randn((8, H, D), dtype, gen), randn((15, H, D), dtype, gen), randn((15, H, D), dtype, gen)
    k[10, 0, 0] = float("inf")  # sequence 1, key 1
    q[5:, 0, 0] = q[5:, 0, 0].abs()  # +inf scores for query head 0 of sequence 1
    out, lse, _ = fv(q, k, v, i32(0, 5, 8), i32(0, 9, 15), 5, 9, causal=True, return_attn_probs=True)
    for b, (q0, q1, k0, k1) in enumerate([(0, 5, 0, 9), (5, 8, 9, 15)]):
        ro, rl = softmax_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=True)
        assert_matches(out[q0:q1], lse[:, q0:q1], ro[0], rl[0], dtype)
    assert not torch.isnan(out[:5]).any() and torch.isnan(out[5:]).any()


def test_fully_masked_rows_are_still_zeros(gen):
    # More queries than keys, causal: the first rows see no key (flash-attn: zeros, lse +inf), even with
    # an inf elsewhere in k.
    q, k, v = randn((1, 6, 2, 32), torch.float32, gen), randn((1, 3, 2, 32), torch.float32, gen), \
        randn((1, 3, 2, 32), torch.float32, gen)
    out, lse, _ = fa(q, k, v, causal=True, return_attn_probs=True)
    assert (out[0, :3] == 0).all() and torch.isposinf(lse[0, :, :3]).all()
    assert torch.isfinite(out[0, 3:]).all()


def test_backward_of_a_nan_row_is_nan(cpu_isa, gen):
    q, k, v = (randn((1, 8, 2, 32), torch.float32, gen) for _ in range(3))
    q = q.abs()
    k[0, 2, 0, 0] = float("inf")  # +inf scores for every row of head 0 that sees key 2
    out, lse, _ = fa(q, k, v, causal=True, return_attn_probs=True)
    assert torch.isnan(out[0, 2:, 0]).all() and torch.isnan(lse[0, 0, 2:]).all()
    assert torch.isfinite(out[0, :2, 0]).all() and torch.isfinite(out[0, :, 1]).all()
    dq, dk, dv = attention_backward(torch.ones_like(out), q, k, v, out, lse, causal=True)
    assert torch.isnan(dq[0, 2:, 0]).all(), "gradients of NaN rows must be NaN, not zeros"
    assert torch.isfinite(dq[0, :, 1]).all() and torch.isfinite(dk[0, :, 1]).all()


# ----------------------------------------------------------------------------- 7: cu_seqlens


@pytest.fixture
def t(gen):
    ns = types.SimpleNamespace()
    ns.qv, ns.kv_, ns.vv = randn((6, 4, 16), torch.float32, gen), randn((8, 2, 16), torch.float32, gen), \
        randn((8, 2, 16), torch.float32, gen)
    ns.cu_q, ns.cu_k = i32(0, 2, 6), i32(0, 3, 8)
    ns.pk, ns.pv = randn((6, 4, 2, 16), torch.float32, gen), randn((6, 4, 2, 16), torch.float32, gen)
    ns.table = i32(4, 1, 0, 5).reshape(2, 2)
    ns.q = randn((2, 3, 4, 16), torch.float32, gen)
    ns.kc, ns.vc = randn((2, 8, 2, 16), torch.float32, gen), randn((2, 8, 2, 16), torch.float32, gen)
    ns.knew, ns.vnew = randn((2, 1, 2, 16), torch.float32, gen), randn((2, 1, 2, 16), torch.float32, gen)
    ns.lens = i32(2, 4)
    ns.key, ns.value = randn((3, 2, 16), torch.float32, gen), randn((3, 2, 16), torch.float32, gen)
    ns.slots = torch.tensor([0, 9, 2])
    ns.out = torch.full((6, 4, 16), float("nan"))
    ns.lse = torch.full((4, 6), float("nan"))
    ns.dq, ns.dk, ns.dv = torch.full((6, 4, 16), 7.0), torch.full((8, 2, 16), 7.0), torch.full((8, 2, 16), 7.0)
    return ns


def _bwd(t, cu_q, cu_k):
    out, lse, _ = fv(t.qv, t.kv_, t.vv, t.cu_q, t.cu_k, 4, 5, return_attn_probs=True)
    return attention_backward(torch.ones_like(out), t.qv, t.kv_, t.vv, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              dq=t.dq, dk=t.dk, dv=t.dv)


CU_CASES = [
    ("varlen_cu_q_start", lambda t: fv(t.qv, t.kv_, t.vv, i32(1, 2, 6), t.cu_k, 4, 5), r"^cu_seqlens_q\[0\] must be 0"),
    ("varlen_cu_k_start", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, i32(2, 3, 8), 4, 5), r"^cu_seqlens_k\[0\] must be 0"),
    ("paged_cu_q_start", lambda t: fv(t.qv, t.pk, t.pv, i32(2, 2, 6), t.cu_k, 4, 5, block_table=t.table),
     r"^cu_seqlens_q\[0\] must be 0"),
    ("paged_cu_k_start", lambda t: fv(t.qv, t.pk, t.pv, t.cu_q, i32(1, 3, 8), 4, 5, block_table=t.table),
     r"^cu_seqlens_k\[0\] must be 0"),
    ("paged_cu_k_decreasing", lambda t: fv(t.qv, t.pk, t.pv, t.cu_q, i32(0, 5, 4), 4, 5, block_table=t.table),
     r"^cu_seqlens_k must be non-decreasing"),
    ("raw_cu_q_start", lambda t: _C.attention_forward(t.qv, t.kv_, t.vv, t.out, lse=t.lse, cu_seqlens_q=i32(1, 2, 6),
                                                      cu_seqlens_k=t.cu_k, options=opts()),
     r"^cu_seqlens_q\[0\] must be 0"),
    ("backward_cu_q_start", lambda t: _bwd(t, i32(1, 2, 6), t.cu_k), r"^cu_seqlens_q\[0\] must be 0"),
    ("backward_cu_k_start", lambda t: _bwd(t, t.cu_q, i32(3, 3, 8)), r"^cu_seqlens_k\[0\] must be 0"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in CU_CASES], ids=[c[0] for c in CU_CASES])
def test_cu_seqlens_must_start_at_zero(t, call, match):
    check_rejected(t, call, ValueError, match)


def test_rows_outside_every_sequence_are_zeros(t):
    # flash-attn accepts q rows past cu_seqlens_q[-1] (padded batches): they come back as zeros with
    # lse +inf, never as uninitialised memory.
    _C.attention_forward(t.qv, t.kv_, t.vv, t.out, lse=t.lse, cu_seqlens_q=i32(0, 1, 4), cu_seqlens_k=t.cu_k, options=opts())
    assert torch.isfinite(t.out[:4]).all() and (t.out[4:] == 0).all() and torch.isposinf(t.lse[:, 4:]).all()
    _C.attention_forward(t.qv, t.kv_, t.vv, t.out, lse=t.lse, cu_seqlens_q=i32(0), cu_seqlens_k=i32(0), options=opts())
    assert (t.out == 0).all() and torch.isposinf(t.lse).all()  # no sequence at all


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k", "cache_seqlens", "slot_mapping"])
def test_index_values_do_not_wrap_when_narrowed(t, which):
    big = 2**32 + 2  # wraps to 2 as int32
    if which == "cu_seqlens_q":
        call = lambda t: fv(t.qv, t.kv_, t.vv, torch.tensor([0, big, 6]), t.cu_k, 4, 5)  # noqa: E731
    elif which == "cu_seqlens_k":
        call = lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, np.array([0, 3, big]), 4, 5)  # noqa: E731
    elif which == "cache_seqlens":
        call = lambda t: fkv(t.q, t.kc, t.vc, cache_seqlens=[big, 1])  # noqa: E731
    else:
        call = lambda t: ops.reshape_and_cache(t.key, t.value, t.pk, t.pv, np.array([0, 2**63, 1], dtype=np.uint64))  # noqa: E731
    check_rejected(t, call, ValueError, rf"^{which}: values must fit int(32|64)")


# ----------------------------------------------------------------------------- 8: overlapping written tensors


def _interleaved_cache(gen):
    # The engine's layout (blocks, heads, 2, block_size, D): K and V of a block interleave, disjoint.
    c = randn((6, 2, 2, 4, 16), torch.float32, gen)
    return c, c[:, :, 0].transpose(1, 2), c[:, :, 1].transpose(1, 2)


OVERLAP_CASES = [
    ("kvcache_append_expanded_k_cache",
     lambda t: fkv(t.q, t.kc[:1].expand(2, 8, 2, 16), t.vc, t.knew, t.vnew, cache_seqlens=t.lens), r"^k_cache: this tensor is written"),
    ("kvcache_append_expanded_v_cache",
     lambda t: fkv(t.q, t.kc, t.vc[:, :1].expand(2, 8, 2, 16), t.knew, t.vnew, cache_seqlens=t.lens), r"^v_cache: this tensor is written"),
    ("kvcache_append_paged_expanded",
     lambda t: fkv(t.q, t.pk[:1].expand(6, 4, 2, 16), t.pv, t.knew, t.vnew, cache_seqlens=t.lens, block_table=t.table),
     r"^k_cache: this tensor is written"),
    ("kvcache_append_k_is_v", lambda t: fkv(t.q, t.kc, t.kc, t.knew, t.vnew, cache_seqlens=t.lens),
     r"^k_cache: must not overlap v_cache"),
    ("kvcache_append_source_in_cache", lambda t: fkv(t.q, t.kc, t.vc, t.kc[:, 5:6], t.vnew, cache_seqlens=t.lens),
     r"^k_cache: must not overlap k"),
    ("reshape_and_cache_expanded", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk[:, :1].expand(6, 4, 2, 16), t.pv, t.slots),
     r"^k_cache: this tensor is written"),
    ("reshape_and_cache_overlapping_strides",
     lambda t: ops.reshape_and_cache(t.key, t.value, t.pk.as_strided((6, 4, 2, 16), (16, 32, 16, 1)), t.pv, t.slots),
     r"^k_cache: this tensor is written"),
    ("reshape_and_cache_k_is_v", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk, t.pk, t.slots),
     r"^k_cache: must not overlap v_cache"),
    ("raw_out_expanded", lambda t: _C.attention_forward(t.qv, t.kv_, t.vv, t.out[:1].expand(6, 4, 16), cu_seqlens_q=t.cu_q,
                                                        cu_seqlens_k=t.cu_k, options=opts()), r"^out: this tensor is written"),
    ("raw_out_is_q", lambda t: _C.attention_forward(t.qv, t.kv_, t.vv, t.qv, cu_seqlens_q=t.cu_q, cu_seqlens_k=t.cu_k,
                                                    options=opts()), r"^out: must not overlap q"),
    ("raw_lse_expanded", lambda t: _C.attention_forward(t.qv, t.kv_, t.vv, t.out, lse=t.lse[:, :1].expand(4, 6),
                                                        cu_seqlens_q=t.cu_q, cu_seqlens_k=t.cu_k, options=opts()),
     r"^softmax_lse: this tensor is written"),
    ("backward_dq_expanded", lambda t: attention_backward(
        torch.ones_like(t.qv), t.qv, t.kv_, t.vv, t.qv.clone(), torch.zeros(4, 6), cu_seqlens_q=t.cu_q, cu_seqlens_k=t.cu_k,
        dq=t.dq[:1].expand(6, 4, 16), dk=t.dk, dv=t.dv), r"^dq: this tensor is written"),
    ("backward_dk_is_dv", lambda t: attention_backward(
        torch.ones_like(t.qv), t.qv, t.kv_, t.vv, t.qv.clone(), torch.zeros(4, 6), cu_seqlens_q=t.cu_q, cu_seqlens_k=t.cu_k,
        dq=t.dq, dk=t.dk, dv=t.dk), r"^dk: must not overlap dv"),
    ("rms_norm_residual_expanded", lambda t: ops.rms_norm(t.key[:, 0], torch.ones(16), 1e-6, residual=t.value[:1, 0].expand(3, 16)),
     r"^residual: this tensor is written"),
    ("rotary_expanded", lambda t: ops.rotary_embedding_(t.key[:1].expand(3, 2, 16), torch.ones(4, 8), torch.zeros(4, 8),
                                                        torch.tensor([0, 1, 2])), r"^x: this tensor is written"),
    ("rotary_cos_in_x", lambda t: ops.rotary_embedding_(t.key, t.key.view(-1)[:32].view(4, 8), torch.ones(4, 8),
                                                               torch.tensor([0, 1, 0])),
     r"^x: must not overlap cos"),
    ("linear_out_expanded", lambda t: _C.linear(t.key[:, 0], ops.pack_linear_weight(torch.ones(4, 16)), None,
                                                t.value[:1, 0, :4].expand(3, 4)), r"^out: this tensor is written"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in OVERLAP_CASES], ids=[c[0] for c in OVERLAP_CASES])
def test_written_tensors_must_not_overlap(t, call, match):
    check_rejected(t, call, ValueError, match)


def test_interleaved_k_and_v_caches_are_accepted(gen):
    c, kc, vc = _interleaved_cache(gen)
    key, value = randn((3, 2, 16), torch.float32, gen), randn((3, 2, 16), torch.float32, gen)
    ops.reshape_and_cache(key, value, kc, vc, torch.tensor([0, 9, 23]))
    assert torch.equal(kc[2, 1], key[1]) and torch.equal(vc[5, 3], value[2])
    q = randn((2, 1, 4, 16), torch.float32, gen)
    fkv(q, kc, vc, key[:2, None], value[:2, None], cache_seqlens=i32(1, 2), block_table=i32(0, 1, 2, 3).reshape(2, 2))


def test_out_may_alias_nothing_but_read_only_inputs_may(gen):
    q = randn((1, 4, 2, 16), torch.float32, gen)
    assert torch.isfinite(fa(q, q, q)).all()  # q, k and v are only read: one tensor for all three is fine


# ----------------------------------------------------------------------------- 13: int/float arguments


ARG_CASES = [
    ("window_huge", lambda t: fa(t.q, t.kc, t.vc, window_size=(2**40, 0)), ValueError,
     r"^window_size: expected two ints in \[-1, 2\*\*31-1\] \(-1 = unbounded\), got \(1099511627776, 0\)"),
    ("window_float", lambda t: fa(t.q, t.kc, t.vc, window_size=(3.5, 0)), TypeError, r"^window_size: expected two ints"),
    ("window_nan", lambda t: fa(t.q, t.kc, t.vc, window_size=(float("nan"), 0)), TypeError, r"^window_size"),
    ("window_bool", lambda t: fa(t.q, t.kc, t.vc, window_size=(True, 0)), TypeError, r"^window_size"),
    ("window_scalar", lambda t: fa(t.q, t.kc, t.vc, window_size=4), TypeError, r"^window_size"),
    ("window_varlen", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, t.cu_k, 4, 5, window_size=(0, -2**40)), ValueError,
     r"^window_size"),
    ("window_kvcache", lambda t: fkv(t.q, t.kc, t.vc, window_size=(2**31, 0)), ValueError, r"^window_size"),
    ("window_backward", lambda t: attention_backward(t.q, t.q, t.kc, t.vc, t.q, torch.zeros(2, 4, 3),
                                                     window_size=(0, 2**33)), ValueError, r"^window_size"),
    ("num_splits_huge", lambda t: fkv(t.q, t.kc, t.vc, num_splits=2**40), ValueError, r"^num_splits: expected an int"),
    ("num_splits_float", lambda t: fkv(t.q, t.kc, t.vc, num_splits=2.0), TypeError, r"^num_splits: expected an int"),
    ("max_seqlen_q_negative", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, t.cu_k, -1, 5), ValueError, r"^max_seqlen_q"),
    ("max_seqlen_k_huge", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, t.cu_k, 4, 2**63), ValueError, r"^max_seqlen_k"),
    ("max_seqlen_float", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, t.cu_k, 4.5, 5), TypeError, r"^max_seqlen_q"),
    ("scale_string", lambda t: fa(t.q, t.kc, t.vc, softmax_scale="0.1"), TypeError, r"^softmax_scale: expected a number"),
    ("scale_huge_int", lambda t: fa(t.q, t.kc, t.vc, softmax_scale=10**400), ValueError, r"^softmax_scale"),
    ("scale_beyond_float32", lambda t: fa(t.q, t.kc, t.vc, softmax_scale=1e39), ValueError, r"^softmax_scale"),
    ("softcap_tiny", lambda t: fa(t.q, t.kc, t.vc, softcap=1e-45), ValueError, r"^softcap must be >= 0 and finite"),
    ("softcap_bool", lambda t: fa(t.q, t.kc, t.vc, softcap=True), TypeError, r"^softcap"),
    ("dropout_nan", lambda t: fa(t.q, t.kc, t.vc, dropout_p=float("nan")), ValueError, r"^dropout_p"),
    ("dropout_negative", lambda t: fa(t.q, t.kc, t.vc, dropout_p=-0.5), ValueError, r"^dropout_p: expected a probability"),
    ("cache_seqlens_int_huge", lambda t: fkv(t.q, t.kc, t.vc, cache_seqlens=2**40), ValueError, r"^cache_seqlens"),
    ("eps_huge", lambda t: ops.rms_norm(t.key[:, 0], torch.ones(16), 10**400), ValueError, r"^eps"),
    ("eps_inf", lambda t: ops.rms_norm(t.key[:, 0], torch.ones(16), float("inf")), ValueError, r"^eps"),
    ("out_features_huge", lambda t: ops.linear(t.key[:, 0], ops.pack_linear_weight(torch.ones(4, 16)), 2**40), ValueError,
     r"^out_features"),
    ("linear_packed_numel_huge", lambda t: _C.linear_packed_numel(2**70, 4, "float32"), ValueError,
     r"^linear_packed_numel: n: expected an int"),
    ("linear_packed_numel_big", lambda t: _C.linear_packed_numel(2**40, 4, "float32"), ValueError,
     r"^linear_packed_numel: n and k must be in \[0, 2\*\*31-1\]"),
    ("num_threads_huge", lambda t: fastinfer.set_num_threads(2**40), ValueError, r"^n: expected an int"),
    ("raw_window_left", lambda t: setattr(_C.AttentionOptions(), "window_left", 2**40), ValueError, r"^window_left"),
    ("raw_window_right_neg", lambda t: setattr(_C.AttentionOptions(), "window_right", -5), ValueError, r"^window_right"),
    ("raw_num_splits_float", lambda t: setattr(_C.AttentionOptions(), "num_splits", 1.5), TypeError, r"^num_splits"),
    ("raw_max_seqlen_bool", lambda t: setattr(_C.AttentionOptions(), "max_seqlen_q", True), TypeError, r"^max_seqlen_q"),
    ("raw_scale_huge", lambda t: setattr(_C.AttentionOptions(), "softmax_scale", 10**400), ValueError, r"^softmax_scale"),
    ("raw_decoder_hidden", lambda t: _C.CpuDecoderConfig(hidden=2**70, intermediate=8, heads=1, kv_heads=1, head_dim=8, norm_eps=1e-6,
                                                                  softmax_scale=1.0, act="silu"), ValueError,
     r"^hidden: expected an int"),
    ("raw_decoder_heads_float", lambda t: _C.CpuDecoderConfig(hidden=8, intermediate=8, heads=1.5, kv_heads=1, head_dim=8,
                                                                       norm_eps=1e-6, softmax_scale=1.0, act="silu"), TypeError,
     r"^heads: expected an int"),
    ("raw_decoder_eps", lambda t: _C.CpuDecoderConfig(hidden=8, intermediate=8, heads=1, kv_heads=1, head_dim=8, norm_eps=10**400,
                                                               softmax_scale=1.0, act="silu"), ValueError,
     r"^norm_eps"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES])
def test_scalar_arguments_are_checked_by_name(t, call, exc, match):
    check_rejected(t, call, exc, match)


def test_numpy_and_torch_integer_scalars_are_accepted(t):
    out = fv(t.qv, t.kv_, t.vv, t.cu_q, t.cu_k, np.int64(4), torch.tensor(5), window_size=(np.int32(3), 0))
    assert torch.isfinite(out).all()
    fastinfer.set_num_threads(np.int64(1))
    assert fastinfer.get_num_threads() == 1


_THREADS_SCRIPT = r"""
import fastinfer, numpy as np
try:
    fastinfer.set_num_threads(100000)
except ValueError as e:
    print(e)
    raise SystemExit(3)
q = np.random.randn(1, 512, 8, 64).astype(np.float32)
fastinfer.flash_attn_func(q, q, q)  # would start 100000 threads
print("accepted")
"""


def test_absurd_thread_count_is_refused_in_its_own_process():
    res = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, (res.returncode, res.stdout[-500:], res.stderr[-2000:])
    assert res.stdout.strip().startswith("n: expected an int in [-2147483648, 1024], got 100000")


# ----------------------------------------------------------------------------- the CpuDecoder stack


@pytest.fixture
def decoder_call(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_cpu_decoder import call as make_call

    return make_call.__wrapped__(tmp_path_factory)


def _decoder_forward(ns):
    ns.native.forward(ns.x, ns.out, ns.cos, ns.sin, ns.rows, ns.cu_q, ns.cu_k, ns.table, ns.slots, ns.workspace)


def test_decoder_inf_in_cache_gives_nan(decoder_call):
    ns = decoder_call
    with torch.inference_mode():
        ns.k0[int(ns.table[0, 0]), 0] = float("inf")  # layer 0, key 0 of sequence 0 (+-inf scores)
        ns.k0[int(ns.table[0, 0]), 1] = float("nan")  # and a NaN key
        _decoder_forward(ns)
    assert torch.isnan(ns.out[0]).all(), "sequence 0 attends to a NaN key: its hidden state must be NaN"
    assert torch.isfinite(ns.out[1:]).all()


DECODER_CASES = [
    ("cu_k_start", lambda ns: setattr(ns, "cu_k", i32(1, 6, 10)), r"^cu_seqlens_k\[0\] must be 0"),
    ("x_in_workspace", lambda ns: setattr(ns, "x", ns.workspace[:4 * ns.x.numel()].zero_().view(torch.float32).view_as(ns.x)),
     r"^out: must not overlap x|^workspace: must not overlap x"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in DECODER_CASES], ids=[c[0] for c in DECODER_CASES])
def test_decoder_bad_calls(decoder_call, change, match):
    with torch.inference_mode():
        change(decoder_call)
        check_rejected(decoder_call, _decoder_forward, ValueError, match)


def test_decoder_caches_must_not_overlap(decoder_call):
    ns = decoder_call
    n = len([a for a in vars(ns) if a.startswith("k") and a[1:].isdigit()])
    pairs = [(getattr(ns, f"k{i}"), getattr(ns, f"v{i}")) for i in range(n)]
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"^kv_caches\[0\]\.k: this tensor is written"):
            ns.native.bind_caches([(pairs[0][0][:1].expand_as(pairs[0][0]), pairs[0][1])] + pairs[1:])
        with pytest.raises(ValueError, match=r"^kv_caches\[0\]\.k: must not overlap kv_caches\[0\]\.v"):
            ns.native.bind_caches([(pairs[0][0], pairs[0][0])] + pairs[1:])
        if n > 1:
            with pytest.raises(ValueError, match=r"must not overlap kv_caches\[1\]"):
                ns.native.bind_caches([pairs[0], (pairs[0][0], pairs[1][1])] + pairs[2:])
        ns.native.bind_caches(pairs)  # the engine's caches are fine
        _decoder_forward(ns)
