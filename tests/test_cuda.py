"""The CUDA kernels through the public API, on CUDA tensors.

Every test is marked ``cuda`` and skipped when ``fastinfer.cuda_available()`` is False
(no GPU, or a build without the CUDA kernels). Each compares the GPU result with the
float64 reference under flash-attention's tolerance (``reference.check``) and, where
it says so, with the CPU kernels on the same inputs. Outputs allocated by the API are
NaN-poisoned by conftest, and the raw ``_C`` calls below pass NaN-filled buffers, so an
element the kernels never write fails the test.

Which kernel shape runs: rows per (sequence, kv head) = seqlen_q * nheads / nheads_k;
up to 32 rows take the decode shape (16-row blocks, warps split the keys), more take
the prefill shape (64-128-row blocks). Split-KV engages when there are too few blocks
for the GPU (num_splits=0) or when num_splits > 1 asks for it. Both shapes, both
dtypes and every head dim (64, 96, 128, 256) appear below.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastinfer
from fastinfer import _C, ops
from conftest import DTYPE_IDS
from reference import (alibi_slopes, assert_close, attention_ref, attention_ref_paged, attention_ref_varlen, cu_seqlens,
                       expected_append, kvcache_ref, paged_cache,
                       gather_paged, randn, tolerance)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not fastinfer.cuda_available(), reason="needs a CUDA device")]

DEV = "cuda"
GPU_DTYPES = (torch.float16, torch.bfloat16)
gpu_dtypes = pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: DTYPE_IDS[d])
HEAD_DIMS = (64, 96, 128, 256)


# ----------------------------------------------------------------------------- helpers


def to_dev(*ts):
    return tuple(None if t is None else t.to(DEV) for t in ts)


def cpu(x):
    return None if x is None else x.detach().cpu()


def check_gpu(out, lse, ref_fn, cpu_result=None):
    """GPU out/lse against the float64 reference, and against the CPU kernels' (out, lse) on the same inputs.

    The GPU and CPU kernels may differ by at most the sum of what each is allowed against the reference;
    rows the reference says see no key must match exactly (zeros, lse = +inf)."""
    assert out.is_cuda and (lse is None or lse.is_cuda)
    torch.cuda.synchronize()
    out_c, lse_c = cpu(out), cpu(lse)
    ref_out, ref_lse = ref_fn(upcast=True)
    lowp_out, lowp_lse = ref_fn(upcast=False)
    assert_close(out_c, ref_out, lowp_out, what="out")
    if lse_c is not None:
        assert lse_c.dtype == torch.float32
        assert_close(lse_c, ref_lse, lowp_lse, floor=1e-4, what="lse")
    if cpu_result is not None:
        c_out, c_lse = cpu_result
        tol = tolerance(out_c, ref_out, lowp_out)
        err = (out_c.double() - c_out.double()).abs().max().item() if out_c.numel() else 0.0
        assert err <= 2 * tol, f"GPU and CPU outputs differ by {err:.3g} > {2 * tol:.3g}"
        if lse_c is not None and c_lse is not None:
            fin = torch.isfinite(c_lse)
            assert torch.equal(torch.isfinite(lse_c), fin), "GPU and CPU disagree on which rows see no key"
            if fin.any():
                ltol = tolerance(lse_c, ref_lse, lowp_lse, floor=1e-4)
                lerr = (lse_c[fin].double() - c_lse[fin].double()).abs().max().item()
                assert lerr <= 2 * ltol, f"GPU and CPU lse differ by {lerr:.3g} > {2 * ltol:.3g}"


def qkv(gen, dtype, batch, sq, sk, h, hk, d):
    return (randn((batch, sq, h, d), dtype, gen), randn((batch, sk, hk, d), dtype, gen),
            randn((batch, sk, hk, d), dtype, gen))


def run_dense(q, k, v, compare_cpu=True, **kw):
    """flash_attn_func on the GPU copies of CPU tensors q, k, v (alibi_slopes too); checked; returns GPU (out, lse)."""
    slopes = kw.pop("alibi_slopes", None)
    qd, kd, vd, sd = to_dev(q, k, v, slopes)
    out, lse, probs = fastinfer.flash_attn_func(qd, kd, vd, alibi_slopes=sd, return_attn_probs=True, **kw)
    assert probs is None and out.shape == q.shape and out.dtype == q.dtype and out.is_cuda
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    cpu_res = None
    if compare_cpu:
        c_out, c_lse, _ = fastinfer.flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True, **kw)
        cpu_res = (c_out, c_lse)
    check_gpu(out, lse, lambda upcast: attention_ref(q, k, v, alibi_slopes=slopes, upcast=upcast, **kw), cpu_res)
    return out, lse


def _opts(d, causal=False, window=(-1, -1), softcap=0.0, num_splits=0, scale=None):
    o = _C.AttentionOptions()
    o.softmax_scale = d ** -0.5 if scale is None else scale
    o.softcap = softcap
    o.window_left, o.window_right = window[0], 0 if causal else window[1]
    o.num_splits = num_splits
    return o


# ----------------------------------------------------------------------------- dense shapes

# (batch, seqlen_q, seqlen_k, nheads, nheads_k): edge lengths around the 16-row, 64/128-row and
# 32/64-key tiles, seqlen_q > seqlen_k and < seqlen_k, one query (decode shape), a single key.
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 1, 7, 4, 1),
    (2, 7, 17, 4, 2),
    (1, 17, 7, 2, 2),
    (1, 63, 65, 2, 1),
    (2, 65, 63, 4, 4),
    (1, 113, 257, 2, 1),
    (1, 257, 113, 1, 1),
    (1, 129, 129, 1, 1),
    (1, 33, 1, 2, 1),
]


@gpu_dtypes
@pytest.mark.parametrize("headdim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_q{}_k{}_h{}_hk{}".format(*s))
def test_shapes(gen, dtype, headdim, causal, shape):
    b, sq, sk, h, hk = shape
    q, k, v = qkv(gen, dtype, b, sq, sk, h, hk, headdim)
    out, lse = run_dense(q, k, v, causal=causal)
    if causal and sq > sk:
        assert torch.all(out[:, : sq - sk] == 0)
        assert torch.all(torch.isposinf(lse[:, :, : sq - sk]))


@gpu_dtypes
@pytest.mark.parametrize("nheads_k", [8, 4, 2, 1], ids=lambda n: f"ratio{8 // n}")
@pytest.mark.parametrize("sq,sk", [(1, 40), (4, 300), (5, 21), (13, 70), (40, 129)])
def test_gqa(gen, dtype, nheads_k, sq, sk):
    q, k, v = qkv(gen, dtype, 2, sq, sk, 8, nheads_k, 128)
    run_dense(q, k, v, causal=True)


def test_gqa_reads_the_right_kv_head(gen):
    q, k, _ = qkv(gen, torch.bfloat16, 1, 3, 5, 8, 2, 64)
    v = torch.arange(2, dtype=torch.bfloat16).reshape(1, 1, 2, 1).expand(1, 5, 2, 64).contiguous()
    out = fastinfer.flash_attn_func(*to_dev(q, k, v)).cpu().float()
    for h in range(8):  # probabilities are rounded to bf16 before P.V: close to, not exactly, the constant
        torch.testing.assert_close(out[0, :, h], torch.full((3, 64), float(h // 4)), rtol=0, atol=2e-2)


# ----------------------------------------------------------------------------- masks and score modifiers


@gpu_dtypes
@pytest.mark.parametrize("window,causal", [
    ((3, -1), False), ((-1, 2), False), ((4, 4), False), ((0, 0), False), ((10, 0), False),
    ((0, -1), False), ((5, -1), True), ((-1, 3), True), ((2, 7), True), ((300, 300), False), ((70, 0), False),
], ids=lambda x: str(x).replace(" ", ""))
@pytest.mark.parametrize("sq,sk,h,hk", [(17, 17, 2, 1), (7, 65, 4, 1), (65, 7, 2, 2), (1, 200, 8, 2), (150, 300, 2, 1)])
def test_sliding_window(gen, dtype, window, causal, sq, sk, h, hk):
    q, k, v = qkv(gen, dtype, 1, sq, sk, h, hk, 64)
    run_dense(q, k, v, causal=causal, window_size=window)


@gpu_dtypes
@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq", [2, 70])
def test_softcap(gen, dtype, softcap, causal, sq):
    q, k, v = qkv(gen, dtype, 2, sq, 150, 4, 2, 64)
    run_dense(q, k * 3, v, causal=causal, softcap=softcap)


@gpu_dtypes
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_h", "slopes_bh"])
@pytest.mark.parametrize("extra", [
    {}, {"causal": True}, {"window_size": (6, 2)}, {"softcap": 4.0, "causal": True},
], ids=["plain", "causal", "window", "softcap_causal"])
@pytest.mark.parametrize("sq", [1, 9, 80])
def test_alibi(gen, dtype, per_batch, extra, sq):
    q, k, v = qkv(gen, dtype, 2, sq, 166, 4, 2, 96)
    run_dense(q, k, v, alibi_slopes=alibi_slopes(4, 2 if per_batch else None, gen), **extra)


@pytest.mark.parametrize("scale", [0.01, 0.3, 2.0])
def test_softmax_scale(gen, scale):
    q, k, v = qkv(gen, torch.bfloat16, 1, 9, 33, 2, 2, 64)
    run_dense(q, k, v, softmax_scale=scale)


@gpu_dtypes
@pytest.mark.parametrize("sq", [1, 140])
def test_large_scores(gen, dtype, sq):
    # Scores around +-1000 (bf16) / a few hundred (fp16): the online softmax must rescale, not overflow.
    scale = 8 if dtype == torch.bfloat16 else 4
    q, k, v = qkv(gen, dtype, 1, sq, 300, 2, 1, 64)
    run_dense(q * scale, k * scale, v, causal=True)


def test_empty_key_rows_and_lse_convention(gen):
    q, k, v = qkv(gen, torch.float16, 1, 10, 4, 2, 2, 64)
    out, lse = run_dense(q, k, v, window_size=(0, 0))
    out, lse = out.cpu(), lse.cpu()
    assert torch.all(out[0, :6] == 0) and torch.all(torch.isposinf(lse[0, :, :6]))
    torch.testing.assert_close(out[0, 6:], v[0])  # one visible key: its value


@pytest.mark.parametrize("shape", [(0, 5, 2, 64), (2, 0, 2, 64)], ids=["batch0", "seqlen_q0"])
def test_empty_queries(gen, shape):
    q = randn(shape, torch.float16, gen).to(DEV)
    k = randn((shape[0], 7, 2, 64), torch.float16, gen).to(DEV)
    out, lse, _ = fastinfer.flash_attn_func(q, k, k, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (shape[0], 2, shape[1])


@pytest.mark.parametrize("sq", [3, 70])
def test_zero_length_keys(gen, sq):
    q = randn((2, sq, 2, 64), torch.bfloat16, gen)
    k = randn((2, 0, 1, 64), torch.bfloat16, gen)
    out, lse = run_dense(q, k, k)
    assert torch.all(out.cpu() == 0) and torch.all(torch.isposinf(lse.cpu()))


@gpu_dtypes
@pytest.mark.parametrize("headdim", HEAD_DIMS)
def test_long_causal_prefill(gen, dtype, headdim):
    # Many m-blocks per head, heaviest first; keys through several pipeline stages.
    q, k, v = qkv(gen, dtype, 1, 1100, 1100, 2, 1, headdim)
    run_dense(q, k, v, causal=True, compare_cpu=False)


# ----------------------------------------------------------------------------- varlen

VARLEN = [
    ([1], [1]),
    ([3, 0, 17, 1], [5, 9, 0, 33]),
    ([65, 7, 1], [63, 113, 1]),
    ([0, 0], [4, 0]),
    ([20, 5], [5, 20]),
    ([257, 1, 130], [300, 257, 129]),
]


@gpu_dtypes
@pytest.mark.parametrize("headdim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", VARLEN, ids=lambda l: "q{}_k{}".format(*l).replace(" ", ""))
def test_varlen(gen, dtype, headdim, causal, lens):
    lq, lk = lens
    H, Hk = 4, 2
    q, k, v = randn((sum(lq), H, headdim), dtype, gen), randn((sum(lk), Hk, headdim), dtype, gen), \
        randn((sum(lk), Hk, headdim), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(*to_dev(q, k, v, cu_q, cu_k), max(lq), max(lk), causal=causal,
                                                   return_attn_probs=True)
    c_out, c_lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                       return_attn_probs=True)
    check_gpu(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal, upcast=upcast),
              (c_out, c_lse))
    out, lse = out.cpu(), lse.cpu()
    for b in range(len(lq)):
        if lk[b] == 0:
            assert torch.all(out[cu_q[b]:cu_q[b + 1]] == 0)
            assert torch.all(torch.isposinf(lse[:, cu_q[b]:cu_q[b + 1]]))


@pytest.mark.parametrize("hints", [(1, 1), (2, 3), (10000, 10000), (0, 0)], ids=["too_small", "small", "too_large",
                                                                                 "zero"])
def test_varlen_wrong_max_seqlen_hints(gen, hints):
    # max_seqlen_q/k only steer the launch shape; wrong values must not change the result.
    lq, lk = [70, 1, 33], [90, 40, 0]
    q, k, v = randn((sum(lq), 8, 64), torch.bfloat16, gen), randn((sum(lk), 2, 64), torch.bfloat16, gen), \
        randn((sum(lk), 2, 64), torch.bfloat16, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(*to_dev(q, k, v, cu_q, cu_k), hints[0], hints[1], causal=True,
                                                   return_attn_probs=True)
    check_gpu(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, causal=True, upcast=upcast))


@gpu_dtypes
@pytest.mark.parametrize("extra", [
    {"window_size": (5, 1)}, {"softcap": 3.0, "causal": True}, {"alibi": "h"}, {"alibi": "bh", "causal": True},
], ids=["window", "softcap", "alibi_h", "alibi_bh"])
def test_varlen_options(gen, dtype, extra):
    lq, lk = [9, 0, 30], [40, 3, 30]
    H, Hk, D = 8, 2, 256
    extra = dict(extra)
    alibi = extra.pop("alibi", None)
    if alibi:
        extra["alibi_slopes"] = alibi_slopes(H, 3 if alibi == "bh" else None, gen)
    q, k, v = randn((sum(lq), H, D), dtype, gen), randn((sum(lk), Hk, D), dtype, gen), randn((sum(lk), Hk, D), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    dev_extra = dict(extra)
    if "alibi_slopes" in dev_extra:
        dev_extra["alibi_slopes"] = dev_extra["alibi_slopes"].to(DEV)
    out, lse, _ = fastinfer.flash_attn_varlen_func(*to_dev(q, k, v, cu_q, cu_k), 30, 40, return_attn_probs=True,
                                                   **dev_extra)
    check_gpu(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, upcast=upcast, **extra))


def test_varlen_trailing_rows_untouched(gen):
    # Rows of q past cu_seqlens_q[-1] belong to no sequence: their output stays NaN (poisoned).
    q = randn((12, 2, 64), torch.float16, gen)
    k, v = randn((9, 2, 64), torch.float16, gen), randn((9, 2, 64), torch.float16, gen)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 9], dtype=torch.int32)
    out = fastinfer.flash_attn_varlen_func(*to_dev(q, k, v, cu_q, cu_k), 6, 5, causal=True).cpu()
    ref, _ = attention_ref_varlen(q[:10], k, v, cu_q, cu_k, causal=True)
    lowp, _ = attention_ref_varlen(q[:10], k, v, cu_q, cu_k, causal=True, upcast=False)
    assert_close(out[:10], ref, lowp)
    assert torch.isnan(out[10:]).all()


# ----------------------------------------------------------------------------- strided and unaligned views


@gpu_dtypes
def test_noncontiguous_transposed(gen, dtype):
    q = randn((2, 4, 21, 128), dtype, gen).transpose(1, 2)
    k = randn((2, 2, 45, 128), dtype, gen).transpose(1, 2)
    v = randn((2, 45, 2, 128), dtype, gen)
    run_dense(q, k, v, causal=True)


@gpu_dtypes
@pytest.mark.parametrize("sq", [1, 40])
def test_unaligned_views(gen, dtype, sq):
    # Pointers 2 bytes off a 16-byte boundary and odd strides: the kernels' element-wise load/store path.
    qb, kb, vb = randn((2, sq, 3, 65), dtype, gen), randn((2, 30, 1, 67), dtype, gen), randn((2, 30, 3, 64), dtype, gen)
    q, k, v = qb[..., 1:], kb[..., 3:], vb[:, :, 1:2]
    qbd, kbd, vbd = to_dev(qb, kb, vb)
    qd, kd, vd = qbd[..., 1:], kbd[..., 3:], vbd[:, :, 1:2]
    assert qd.data_ptr() % 16 and kd.data_ptr() % 16
    out, lse, _ = fastinfer.flash_attn_func(qd, kd, vd, window_size=(4, 4), return_attn_probs=True)
    check_gpu(out, lse, lambda upcast: attention_ref(q, k, v, window_size=(4, 4), upcast=upcast))


@gpu_dtypes
def test_C_strided_out_and_lse(gen, dtype):
    # out and lse are views into bigger NaN buffers (out 2 bytes off alignment): exactly their elements are written.
    q, k, v = qkv(gen, dtype, 2, 9, 30, 4, 1, 64)
    out_buf = torch.full((2, 9, 6, 73), float("nan"), dtype=dtype, device=DEV)
    lse_buf = torch.full((2, 9, 5), float("nan"), device=DEV)
    out = out_buf[:, :, 1:5, 9:73]
    lse = lse_buf[:, :, 1:].transpose(1, 2)
    _C.attention_forward(*to_dev(q, k, v), out, lse=lse, options=_opts(64, causal=True))
    check_gpu(out, lse, lambda upcast: attention_ref(q, k, v, causal=True, upcast=upcast))
    written = torch.zeros(out_buf.shape, dtype=torch.bool, device=DEV)
    written[:, :, 1:5, 9:73] = True
    assert torch.isnan(out_buf[~written]).all()
    assert torch.isnan(lse_buf[:, :, 0]).all()


@gpu_dtypes
@pytest.mark.parametrize("headdim", HEAD_DIMS)
@pytest.mark.parametrize("sq,h,hk", [(1, 8, 2), (37, 4, 2)], ids=["decode", "prefill"])
def test_C_dense_writes_every_output(gen, dtype, headdim, sq, h, hk):
    q, k, v = qkv(gen, dtype, 2, sq, 71, h, hk, headdim)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEV)
    lse = torch.full((2, h, sq), float("nan"), device=DEV)
    _C.attention_forward(*to_dev(q, k, v), out, lse=lse, options=_opts(headdim, causal=True))
    check_gpu(out, lse, lambda upcast: attention_ref(q, k, v, causal=True, upcast=upcast))


@gpu_dtypes
def test_C_varlen_writes_every_output(gen, dtype):
    lq, lk = [4, 0, 40, 2], [0, 6, 33, 70]
    q, k, v = randn((sum(lq), 4, 64), dtype, gen), randn((sum(lk), 4, 64), dtype, gen), randn((sum(lk), 4, 64), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEV)
    lse = torch.full((4, sum(lq)), float("nan"), device=DEV)
    qd, kd, vd, cqd, ckd = to_dev(q, k, v, cu_q, cu_k)
    _C.attention_forward(qd, kd, vd, out, lse=lse, cu_seqlens_q=cqd, cu_seqlens_k=ckd, options=_opts(64, window=(8, 0)))
    check_gpu(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, window_size=(8, 0), upcast=upcast))


def test_C_kv_batch_idx_and_seqlens(gen):
    q = randn((3, 2, 4, 64), torch.bfloat16, gen)
    kc, vc = randn((5, 50, 2, 64), torch.bfloat16, gen), randn((5, 50, 2, 64), torch.bfloat16, gen)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    lens = torch.tensor([50, 1, 17], dtype=torch.int32)
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    lse = torch.full((3, 4, 2), float("nan"), device=DEV)
    _C.attention_forward(*to_dev(q, kc, vc), out, lse=lse, seqlens_k=lens.to(DEV), kv_batch_idx=idx.to(DEV),
                         options=_opts(64, causal=True))
    check_gpu(out, lse, kvcache_ref(q, kc, vc, lens, batch_idx=idx, causal=True))


# ----------------------------------------------------------------------------- KV cache: dense


@gpu_dtypes
@pytest.mark.parametrize("batch_idx", [False, True], ids=["rows", "batch_idx"])
@pytest.mark.parametrize("snew", [0, 1, 3], ids=lambda n: f"new{n}")
@pytest.mark.parametrize("sq,causal", [(1, False), (4, True), (40, True)], ids=["decode", "q4_causal", "q40_causal"])
def test_dense_cache(gen, dtype, batch_idx, snew, sq, causal):
    B, Bc, Sc, H, Hk, D = 3, 5, 90, 4, 2, 128
    q = randn((B, sq, H, D), dtype, gen)
    kc, vc = randn((Bc, Sc, Hk, D), dtype, gen), randn((Bc, Sc, Hk, D), dtype, gen)
    lens = torch.tensor([0, 17, Sc - snew], dtype=torch.int32)
    idx = torch.tensor([3, 0, 4], dtype=torch.int32) if batch_idx else None
    if not batch_idx:
        kc, vc = kc[:B].clone(), vc[:B].clone()
    knew = randn((B, snew, Hk, D), dtype, gen) if snew else None
    vnew = randn((B, snew, Hk, D), dtype, gen) if snew else None
    want_k, want_v = expected_append(kc, knew, lens, idx), expected_append(vc, vnew, lens, idx)
    qd, kcd, vcd, knd, vnd, lensd, idxd = to_dev(q, kc, vc, knew, vnew, lens, idx)
    out, lse = fastinfer.flash_attn_with_kvcache(qd, kcd, vcd, knd, vnd, cache_seqlens=lensd, cache_batch_idx=idxd,
                                                 causal=causal, return_softmax_lse=True)
    torch.cuda.synchronize()
    assert torch.equal(lensd.cpu(), lens), "cache_seqlens must not be modified"
    assert torch.equal(kcd.cpu(), want_k) and torch.equal(vcd.cpu(), want_v), "cache contents after the append"
    check_gpu(out, lse, kvcache_ref(q, want_k, want_v, lens + snew, batch_idx=idx, causal=causal))


@gpu_dtypes
def test_dense_cache_options(gen, dtype):
    B, H, Hk, D = 2, 8, 2, 96
    q = randn((B, 5, H, D), dtype, gen)
    kc, vc = randn((B, 90, Hk, D), dtype, gen), randn((B, 90, Hk, D), dtype, gen)
    knew, vnew = randn((B, 5, Hk, D), dtype, gen), randn((B, 5, Hk, D), dtype, gen)
    lens = torch.tensor([60, 85], dtype=torch.int32)
    slopes = alibi_slopes(H, B, gen)
    kw = dict(causal=True, window_size=(20, -1), softcap=10.0, softmax_scale=0.2)
    want_k, want_v = expected_append(kc, knew, lens), expected_append(vc, vnew, lens)
    out, lse = fastinfer.flash_attn_with_kvcache(*to_dev(q, kc, vc, knew, vnew), cache_seqlens=lens.to(DEV),
                                                 alibi_slopes=slopes.to(DEV), return_softmax_lse=True, **kw)
    check_gpu(out, lse, kvcache_ref(q, want_k, want_v, lens + 5, alibi=slopes, **kw))


# ----------------------------------------------------------------------------- KV cache: paged


@gpu_dtypes
@pytest.mark.parametrize("block_size", [1, 3, 16, 256])
@pytest.mark.parametrize("snew", [0, 1, 5], ids=lambda n: f"new{n}")
@pytest.mark.parametrize("sq,causal", [(1, True), (6, True), (50, False)], ids=["decode", "q6_causal", "q50_full"])
def test_paged_cache(gen, dtype, block_size, snew, sq, causal):
    B, H, Hk, D = 3, 8, 2, 64
    lens = torch.tensor([0, 33, 300], dtype=torch.int32)
    kc, vc, table = paged_cache(gen, dtype, (lens + snew).tolist(), block_size, Hk, D)
    q = randn((B, sq, H, D), dtype, gen)
    knew = randn((B, snew, Hk, D), dtype, gen) if snew else None
    vnew = randn((B, snew, Hk, D), dtype, gen) if snew else None
    want_k = expected_append(kc, knew, lens, block_table=table)
    want_v = expected_append(vc, vnew, lens, block_table=table)
    qd, kcd, vcd, knd, vnd, lensd, tabled = to_dev(q, kc, vc, knew, vnew, lens, table)
    out, lse = fastinfer.flash_attn_with_kvcache(qd, kcd, vcd, knd, vnd, cache_seqlens=lensd, block_table=tabled,
                                                 causal=causal, return_softmax_lse=True)
    torch.cuda.synchronize()
    assert torch.equal(tabled.cpu(), table)
    assert torch.equal(kcd.cpu(), want_k) and torch.equal(vcd.cpu(), want_v), "cache contents after the append"
    c_out, c_lse = fastinfer.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), knew, vnew, cache_seqlens=lens,
                                                     block_table=table, causal=causal, return_softmax_lse=True)
    check_gpu(out, lse, kvcache_ref(q, want_k, want_v, lens + snew, block_table=table, causal=causal), (c_out, c_lse))


@gpu_dtypes
@pytest.mark.parametrize("headdim", HEAD_DIMS)
def test_decode_gqa_32_8(gen, dtype, headdim):
    # A Llama-style decode step: 32 query heads over 8 kv heads, paged cache of block size 16.
    B, H, Hk, bs = 4, 32, 8, 16
    lens = torch.tensor([300, 77, 1, 1000], dtype=torch.int32)
    kc, vc, table = paged_cache(gen, dtype, (lens + 1).tolist(), bs, Hk, headdim)
    q = randn((B, 1, H, headdim), dtype, gen)
    knew, vnew = randn((B, 1, Hk, headdim), dtype, gen), randn((B, 1, Hk, headdim), dtype, gen)
    want_k = expected_append(kc, knew, lens, block_table=table)
    want_v = expected_append(vc, vnew, lens, block_table=table)
    out, lse = fastinfer.flash_attn_with_kvcache(*to_dev(q, kc, vc, knew, vnew), cache_seqlens=lens.to(DEV),
                                                 block_table=table.to(DEV), causal=True, return_softmax_lse=True)
    check_gpu(out, lse, kvcache_ref(q, want_k, want_v, lens + 1, block_table=table, causal=True))


# ----------------------------------------------------------------------------- split-KV


@gpu_dtypes
@pytest.mark.parametrize("layout", ["dense", "paged16", "paged1"])
@pytest.mark.parametrize("extra", [{}, {"window_size": (700, -1)}, {"causal": True, "softcap": 5.0}],
                         ids=["plain", "window", "causal_softcap"])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 4, 8])
@pytest.mark.parametrize("sq,h", [(1, 4), (2, 16), (9, 8)], ids=["rows4", "rows32", "rows72"])
def test_num_splits(gen, dtype, layout, extra, num_splits, sq, h):
    # Batch 1, one kv head, a long cache: few blocks, so split-KV is what fills the GPU.
    Hk, D, n = 1, 128, 2500
    q = randn((1, sq, h, D), dtype, gen)
    if layout == "dense":
        kc, vc = randn((1, 2600, Hk, D), dtype, gen), randn((1, 2600, Hk, D), dtype, gen)
        table = None
    else:
        kc, vc, table = paged_cache(gen, dtype, [n], 16 if layout == "paged16" else 1, Hk, D)
    lens = torch.tensor([n], dtype=torch.int32)
    out, lse = fastinfer.flash_attn_with_kvcache(*to_dev(q, kc, vc), cache_seqlens=lens.to(DEV),
                                                 block_table=None if table is None else table.to(DEV),
                                                 num_splits=num_splits, return_softmax_lse=True, **extra)
    check_gpu(out, lse, kvcache_ref(q, kc, vc, lens, block_table=table, **extra))


@pytest.mark.parametrize("num_splits", [0, 2, 3, 8, 64])
@pytest.mark.parametrize("headdim", HEAD_DIMS)
def test_split_matches_unsplit(gen, num_splits, headdim):
    q = randn((1, 1, 8, headdim), torch.float16, gen)
    kc, vc = randn((1, 3000, 2, headdim), torch.float16, gen), randn((1, 3000, 2, headdim), torch.float16, gen)
    qd, kcd, vcd = to_dev(q, kc, vc)
    base, base_lse = fastinfer.flash_attn_with_kvcache(qd, kcd, vcd, num_splits=1, return_softmax_lse=True)
    out, lse = fastinfer.flash_attn_with_kvcache(qd, kcd, vcd, num_splits=num_splits, return_softmax_lse=True)
    torch.testing.assert_close(out.float(), base.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse, base_lse, rtol=1e-4, atol=1e-4)
    check_gpu(out, lse, kvcache_ref(q, kc, vc, [3000]))


@pytest.mark.parametrize("sq", [1, 3, 9], ids=lambda n: f"q{n}")
def test_varlen_long_keys_split(gen, sq):
    lq, lk = [sq, 1], [3000, 700]
    H, Hk, D = 4, 1, 64
    q = randn((sum(lq), H, D), torch.bfloat16, gen)
    k, v = randn((sum(lk), Hk, D), torch.bfloat16, gen), randn((sum(lk), Hk, D), torch.bfloat16, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(*to_dev(q, k, v, cu_q, cu_k), sq, 3000, causal=True,
                                                   return_attn_probs=True)
    check_gpu(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, causal=True, upcast=upcast))


# ----------------------------------------------------------------------------- paged varlen and reshape_and_cache


@gpu_dtypes
@pytest.mark.parametrize("block_size", [1, 3, 16, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("headdim", [64, 128])
def test_varlen_paged(gen, dtype, block_size, causal, headdim):
    lq, lk = [1, 0, 13, 60], [20, 7, 300, 0]
    H, Hk = 4, 1
    kc, vc, table = paged_cache(gen, dtype, lk, block_size, Hk, headdim)
    q = randn((sum(lq), H, headdim), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(*to_dev(q, kc, vc, cu_q, cu_k), max(lq), max(lk), causal=causal,
                                                   block_table=table.to(DEV), return_attn_probs=True)
    c_out, c_lse, _ = fastinfer.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                       block_table=table, return_attn_probs=True)
    check_gpu(out, lse, lambda upcast: attention_ref_paged(q, kc, vc, cu_q, lk, table, causal=causal, upcast=upcast),
              (c_out, c_lse))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("block_size", [1, 5, 16, 256])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_reshape_and_cache(gen, dtype, block_size, slot_dtype):
    T, Hk, D = 300, 2, 128
    num_blocks = (T + block_size - 1) // block_size + 3
    key, value = randn((T, Hk, D), dtype, gen), randn((T, Hk, D), dtype, gen)
    kc, vc = randn((num_blocks, block_size, Hk, D), dtype, gen), randn((num_blocks, block_size, Hk, D), dtype, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[torch.randperm(T, generator=gen)[:5]] = -1
    want_k, want_v = kc.clone(), vc.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // block_size, s % block_size] = key[i]
            want_v[s // block_size, s % block_size] = value[i]
    kcd, vcd = to_dev(kc, vc)
    ops.reshape_and_cache(*to_dev(key, value), kcd, vcd, slots.to(slot_dtype).to(DEV))
    torch.cuda.synchronize()
    assert torch.equal(kcd.cpu(), want_k) and torch.equal(vcd.cpu(), want_v)


def test_reshape_and_cache_strided_sources(gen):
    fused = randn((10, 3, 2, 64), torch.float16, gen).to(DEV)
    key, value = fused[:, 1], fused[:, 2]
    kc, vc = torch.zeros(4, 4, 2, 64, dtype=torch.float16, device=DEV), torch.zeros(4, 4, 2, 64, dtype=torch.float16,
                                                                                  device=DEV)
    slots = torch.arange(15, 5, -1, device=DEV)
    ops.reshape_and_cache(key, value, kc, vc, slots)
    flat_k, flat_v = kc.reshape(16, 2, 64), vc.reshape(16, 2, 64)
    assert torch.equal(flat_k[slots], key) and torch.equal(flat_v[slots], value)
    assert torch.all(flat_k[:6] == 0) and torch.all(flat_v[:6] == 0)


@gpu_dtypes
@pytest.mark.parametrize("block_size", [1, 3, 16, 256])
def test_round_trip_reshape_and_cache_then_paged_attention(gen, dtype, block_size):
    lens = [5, 70, 1, 33]
    H, Hk, D = 8, 2, 128
    k, v = randn((sum(lens), Hk, D), dtype, gen), randn((sum(lens), Hk, D), dtype, gen)
    q = randn((sum(lens), H, D), dtype, gen)
    kc, vc, table = paged_cache(gen, dtype, lens, block_size, Hk, D)
    slots = torch.cat([table[b, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
                       for b, n in enumerate(lens)])
    qd, kd, vd, kcd, vcd, tabled = to_dev(q, k, v, kc, vc, table)
    ops.reshape_and_cache(kd, vd, kcd, vcd, slots.to(DEV))
    cu = cu_seqlens(lens).to(DEV)
    paged_out, paged_lse, _ = fastinfer.flash_attn_varlen_func(qd, kcd, vcd, cu, cu, 70, 70, causal=True,
                                                               block_table=tabled, return_attn_probs=True)
    dense_out, dense_lse, _ = fastinfer.flash_attn_varlen_func(qd, kd, vd, cu, cu, 70, 70, causal=True,
                                                               return_attn_probs=True)
    # Same keys in the same order, same tiles: identical results.
    assert torch.equal(paged_out, dense_out) and torch.equal(paged_lse, dense_lse)
    cuc = cu_seqlens(lens)
    check_gpu(paged_out, paged_lse, lambda upcast: attention_ref_varlen(q, k, v, cuc, cuc, causal=True, upcast=upcast))


@gpu_dtypes
def test_paged_cache_views_of_a_fused_kv_cache(gen, dtype):
    # vLLM-style storage: (num_blocks, 2, block_size, Hk, D); k and v are strided views; the block table a column slice.
    B, H, Hk, D, bs = 2, 4, 2, 64, 5
    lens = torch.tensor([7, 17], dtype=torch.int32)
    kv = randn((12, 2, bs, Hk, D), dtype, gen)
    wide = torch.randperm(12, generator=gen).to(torch.int32)[:10].reshape(2, 5)
    table = wide[:, :4]
    proj = randn((B, 2, 3, Hk, D), dtype, gen)
    knew, vnew = proj[:, :, 0], proj[:, :, 1]
    q = randn((B, 2, H, D), dtype, gen)
    want = kv.clone()
    want[:, 0] = expected_append(kv[:, 0], knew, lens, block_table=table)
    want[:, 1] = expected_append(kv[:, 1], vnew, lens, block_table=table)
    kvd, projd, wided = to_dev(kv, proj, wide)
    out, lse = fastinfer.flash_attn_with_kvcache(q.to(DEV), kvd[:, 0], kvd[:, 1], projd[:, :, 0], projd[:, :, 1],
                                                 cache_seqlens=lens.to(DEV), block_table=wided[:, :4], causal=True,
                                                 return_softmax_lse=True)
    torch.cuda.synchronize()
    assert torch.equal(kvd.cpu(), want), "only the appended slots of the fused cache may change"
    check_gpu(out, lse, kvcache_ref(q, want[:, 0], want[:, 1], lens + 2, block_table=table, causal=True))


# ----------------------------------------------------------------------------- streams, determinism, errors


def test_runs_on_the_current_stream(gen):
    q, k, v = qkv(gen, torch.bfloat16, 2, 300, 300, 8, 2, 128)
    qd, kd, vd = to_dev(q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fastinfer.flash_attn_func(qd, kd, vd, causal=True)
        out2 = out * 2  # ordered after the kernel only if the kernel ran on `side`
    side.synchronize()
    torch.testing.assert_close(out2, out * 2)
    check_gpu(out, None, lambda upcast: attention_ref(q, k, v, causal=True, upcast=upcast))


def test_deterministic(gen):
    q, k, v = to_dev(*qkv(gen, torch.bfloat16, 1, 3, 5000, 8, 1, 128))
    a = fastinfer.flash_attn_func(q, k, v)
    b = fastinfer.flash_attn_func(q, k, v, deterministic=True)
    assert torch.equal(a, b)


def test_float32_is_rejected_with_a_clear_message(gen):
    q, k, v = to_dev(*qkv(gen, torch.float32, 1, 3, 5, 2, 2, 64))
    with pytest.raises((ValueError, TypeError, NotImplementedError), match="(?i)float16|bfloat16"):
        fastinfer.flash_attn_func(q, k, v)


@pytest.mark.parametrize("headdim", [32, 80, 192])
def test_head_dim_not_compiled_is_rejected(gen, headdim):
    q, k, v = to_dev(*qkv(gen, torch.float16, 1, 3, 5, 2, 2, headdim))
    with pytest.raises((ValueError, NotImplementedError), match="128"):
        fastinfer.flash_attn_func(q, k, v)


# Garbage in device index arrays cannot be checked by the host without a synchronisation; the kernels
# must still stay in bounds (compute-sanitizer runs this in bench/gpu_suite.sh). A binding that copies
# index arrays to the host and rejects them is fine too.
_GARBAGE_SCRIPT = r"""
import torch, fastinfer
dev = "cuda"
g = torch.Generator().manual_seed(0)
def r(*s):
    return torch.randn(*s, generator=g).to(torch.bfloat16).to(dev)
def attempt(fn):
    try:
        fn()
    except ValueError:  # a binding may copy index arrays to the host and reject them
        pass
q, k, v = r(10, 4, 64), r(12, 2, 64), r(12, 2, 64)
cu_q = torch.tensor([0, 7, 1 << 30], dtype=torch.int32, device=dev)
cu_k = torch.tensor([-5, 3, 1 << 29], dtype=torch.int32, device=dev)
attempt(lambda: fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4, causal=True))
kc, vc = r(3, 16, 2, 64), r(3, 16, 2, 64)
table = torch.tensor([[2, 99, -7], [1 << 30, 0, 1]], dtype=torch.int32, device=dev)
lens = torch.tensor([40, -3], dtype=torch.int32, device=dev)
attempt(lambda: fastinfer.flash_attn_with_kvcache(r(2, 1, 8, 64), kc, vc, r(2, 1, 2, 64), r(2, 1, 2, 64),
                                                   cache_seqlens=lens, block_table=table))
lens2 = torch.tensor([1 << 30, 2], dtype=torch.int32, device=dev)
attempt(lambda: fastinfer.flash_attn_with_kvcache(r(2, 1, 8, 64), kc, vc, cache_seqlens=lens2, block_table=table,
                                                   num_splits=4))
slots = torch.tensor([5, 1 << 40, -1, 47, 48], dtype=torch.int64, device=dev)
attempt(lambda: fastinfer.ops.reshape_and_cache(r(5, 2, 64), r(5, 2, 64), kc, vc, slots))
torch.cuda.synchronize()
print("ok")
"""


def test_garbage_device_indices_stay_in_bounds():
    res = subprocess.run([sys.executable, "-c", _GARBAGE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
