"""flash_attn_func / flash_attn_varlen_func / the packed variants against the float64 reference."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastinfer
from fastinfer import _C
from conftest import DTYPE_IDS, DTYPES, SUPPORTED_ISAS, dtypes
from reference import alibi_slopes, assert_close, attention_ref, attention_ref_varlen, check, cu_seqlens, randn


def run_dense(q, k, v, **kw):
    """flash_attn_func with return_attn_probs=True, checked against the reference; returns (out, lse)."""
    out, lse, probs = fastinfer.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert probs is None
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    check(out, lse, lambda upcast: attention_ref(q, k, v, upcast=upcast, **kw))
    return out, lse


def qkv(gen, dtype, batch, sq, sk, h, hk, d):
    return (randn((batch, sq, h, d), dtype, gen), randn((batch, sk, hk, d), dtype, gen),
            randn((batch, sk, hk, d), dtype, gen))


# ----------------------------------------------------------------------------- shapes

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim): lengths that are not multiples
# of the 64-key / 16- and 32-row tiles, seqlen 1, seqlen_q > seqlen_k and < seqlen_k.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 1, 7, 4, 1, 64),
    (2, 7, 17, 4, 2, 24),
    (1, 17, 7, 2, 2, 64),
    (1, 63, 65, 2, 1, 80),
    (2, 65, 63, 4, 4, 96),
    (1, 113, 257, 2, 1, 128),
    (1, 257, 113, 1, 1, 64),
    (1, 17, 33, 2, 2, 256),
    (1, 33, 1, 2, 1, 64),
]


@dtypes
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_q{}_k{}_h{}_hk{}_d{}".format(*s))
def test_shapes(gen, dtype, causal, shape):
    q, k, v = qkv(gen, dtype, *shape)
    out, lse = run_dense(q, k, v, causal=causal)
    sq, sk = shape[1], shape[2]
    if causal and sq > sk:
        # Bottom-right alignment: the first sq - sk queries see no key at all.
        assert torch.all(out[:, : sq - sk] == 0)
        assert torch.all(torch.isinf(lse[:, :, : sq - sk]) & (lse[:, :, : sq - sk] > 0))


@dtypes
@pytest.mark.parametrize("headdim", range(8, 257, 8))
def test_head_dims(gen, dtype, headdim):
    q, k, v = qkv(gen, dtype, 1, 5, 19, 2, 1, headdim)
    run_dense(q, k, v, causal=headdim % 16 == 0)


@dtypes
@pytest.mark.parametrize("nheads_k", [8, 4, 2, 1], ids=lambda n: f"ratio{8 // n}")
@pytest.mark.parametrize("sq,sk", [(1, 40), (5, 21), (13, 70)])
def test_gqa(gen, dtype, nheads_k, sq, sk):
    q, k, v = qkv(gen, dtype, 2, sq, sk, 8, nheads_k, 32)
    run_dense(q, k, v, causal=True)


def test_gqa_reads_the_right_kv_head(gen):
    # Each kv head's values are constant and distinct, so out reveals which head was read.
    q, k, v = qkv(gen, torch.float32, 1, 3, 5, 8, 2, 16)
    v = torch.arange(2, dtype=torch.float32).reshape(1, 1, 2, 1).expand(1, 5, 2, 16).contiguous()
    out = fastinfer.flash_attn_func(q, k, v)
    for h in range(8):
        assert torch.allclose(out[0, :, h], torch.full((3, 16), float(h // 4)))


# ----------------------------------------------------------------------------- masks and score modifiers


@dtypes
@pytest.mark.parametrize("window,causal", [
    ((3, -1), False), ((-1, 2), False), ((4, 4), False), ((0, 0), False), ((10, 0), False),
    ((0, -1), False), ((5, -1), True), ((-1, 3), True), ((2, 7), True), ((300, 300), False),
], ids=lambda x: str(x).replace(" ", ""))
@pytest.mark.parametrize("sq,sk", [(17, 17), (7, 65), (65, 7), (1, 70)])
def test_sliding_window(gen, dtype, window, causal, sq, sk):
    q, k, v = qkv(gen, dtype, 1, sq, sk, 2, 1, 32)
    run_dense(q, k, v, causal=causal, window_size=window)


@dtypes
@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(gen, dtype, softcap, causal):
    q, k, v = qkv(gen, dtype, 2, 19, 70, 4, 2, 64)
    run_dense(q, k * 3, v, causal=causal, softcap=softcap)  # larger scores, so that the cap matters


@dtypes
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_h", "slopes_bh"])
@pytest.mark.parametrize("extra", [
    {}, {"causal": True}, {"window_size": (6, 2)}, {"softcap": 4.0, "causal": True},
], ids=["plain", "causal", "window", "softcap_causal"])
def test_alibi(gen, dtype, per_batch, extra):
    q, k, v = qkv(gen, dtype, 2, 9, 66, 4, 2, 32)
    slopes = alibi_slopes(4, 2 if per_batch else None, gen)
    run_dense(q, k, v, alibi_slopes=slopes, **extra)


@pytest.mark.parametrize("scale", [0.01, 0.3, 2.0])
def test_softmax_scale(gen, scale):
    q, k, v = qkv(gen, torch.float32, 1, 9, 33, 2, 2, 64)
    run_dense(q, k, v, softmax_scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_large_scores(gen, dtype):
    # Scores around +-1000: the online softmax must rescale, not overflow.
    q, k, v = qkv(gen, dtype, 1, 17, 130, 2, 1, 64)
    run_dense(q * 8, k * 8, v, causal=True)


def test_empty_key_rows_and_lse_convention(gen):
    # window (0, 0) with seqlen_q > seqlen_k: query i sees key i + sk - sq only if it exists.
    q, k, v = qkv(gen, torch.float32, 1, 10, 4, 2, 2, 16)
    out, lse = run_dense(q, k, v, window_size=(0, 0))
    assert torch.all(out[0, :6] == 0) and torch.all(torch.isposinf(lse[0, :, :6]))
    # Each of the last four rows sees exactly its own diagonal key: out = v, lse = score.
    scores = torch.einsum("thd,thd->ht", q[0, 6:].double(), k[0].double()) / 4.0
    torch.testing.assert_close(out[0, 6:], v[0])
    torch.testing.assert_close(lse[0, :, 6:].double(), scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 5, 2, 16), (2, 0, 2, 16)], ids=["batch0", "seqlen_q0"])
def test_empty_queries(gen, shape):
    q = randn(shape, torch.float32, gen)
    k = randn((shape[0], 7, 2, 16), torch.float32, gen)
    out, lse, _ = fastinfer.flash_attn_func(q, k, k, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (shape[0], 2, shape[1])


def test_zero_length_keys(gen):
    q = randn((2, 3, 2, 16), torch.float32, gen)
    k = randn((2, 0, 1, 16), torch.float32, gen)
    out, lse = run_dense(q, k, k)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


# ----------------------------------------------------------------------------- varlen


# (q lengths, k lengths); includes zero-length q and zero-length k sequences.
VARLEN = [
    ([1], [1]),
    ([3, 0, 17, 1], [5, 9, 0, 33]),
    ([65, 7, 1], [63, 113, 1]),
    ([0, 0], [4, 0]),
    ([20, 5], [5, 20]),
]


@dtypes
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", VARLEN, ids=lambda l: "q{}_k{}".format(*l).replace(" ", ""))
def test_varlen(gen, dtype, causal, lens):
    lq, lk = lens
    H, Hk, D = 4, 2, 40
    q = randn((sum(lq), H, D), dtype, gen)
    k = randn((sum(lk), Hk, D), dtype, gen)
    v = randn((sum(lk), Hk, D), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                   return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (H, sum(lq))
    check(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal, upcast=upcast))
    for b in range(len(lq)):
        if lk[b] == 0:
            assert torch.all(out[cu_q[b]:cu_q[b + 1]] == 0)
            assert torch.all(torch.isposinf(lse[:, cu_q[b]:cu_q[b + 1]]))


@dtypes
@pytest.mark.parametrize("extra", [
    {"window_size": (5, 1)}, {"softcap": 3.0, "causal": True}, {"alibi": "h"}, {"alibi": "bh", "causal": True},
], ids=["window", "softcap", "alibi_h", "alibi_bh"])
def test_varlen_options(gen, dtype, extra):
    lq, lk = [9, 0, 30], [40, 3, 30]
    H, Hk, D = 8, 2, 32
    extra = dict(extra)
    alibi = extra.pop("alibi", None)
    if alibi:
        extra["alibi_slopes"] = alibi_slopes(H, 3 if alibi == "bh" else None, gen)
    q, k, v = randn((sum(lq), H, D), dtype, gen), randn((sum(lk), Hk, D), dtype, gen), randn((sum(lk), Hk, D), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 40, return_attn_probs=True, **extra)
    check(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, upcast=upcast, **extra))


def test_varlen_int64_cu_seqlens_and_trailing_rows(gen):
    # int64 cu_seqlens are converted; rows of q past cu_seqlens_q[-1] are not part of any sequence
    # (flash-attn accepts them: padded batches) and come back as zeros with lse +inf, not uninitialised.
    q = randn((12, 2, 16), torch.float32, gen)
    k = randn((9, 2, 16), torch.float32, gen)
    v = randn((9, 2, 16), torch.float32, gen)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int64), torch.tensor([0, 5, 9], dtype=torch.int64)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 5, causal=True, return_attn_probs=True)
    ref, _ = attention_ref_varlen(q[:10], k, v, cu_q, cu_k, causal=True)
    lowp, _ = attention_ref_varlen(q[:10], k, v, cu_q, cu_k, causal=True, upcast=False)
    assert_close(out[:10], ref, lowp)
    assert (out[10:] == 0).all() and torch.isposinf(lse[:, 10:]).all()


# ----------------------------------------------------------------------------- packed variants


@dtypes
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_qkvpacked(gen, dtype, causal):
    qkv_ = randn((2, 37, 3, 4, 48), dtype, gen)
    out, lse, _ = fastinfer.flash_attn_qkvpacked_func(qkv_, causal=causal, return_attn_probs=True)
    q, k, v = qkv_.unbind(2)
    check(out, lse, lambda upcast: attention_ref(q, k, v, causal=causal, upcast=upcast))


@dtypes
@pytest.mark.parametrize("nheads_k", [4, 1])
def test_kvpacked(gen, dtype, nheads_k):
    q = randn((2, 11, 4, 64), dtype, gen)
    kv = randn((2, 29, 2, nheads_k, 64), dtype, gen)
    slopes = alibi_slopes(4)
    out, lse, _ = fastinfer.flash_attn_kvpacked_func(q, kv, causal=True, alibi_slopes=slopes, return_attn_probs=True)
    check(out, lse, lambda upcast: attention_ref(q, kv[:, :, 0], kv[:, :, 1], causal=True, alibi_slopes=slopes,
                                                 upcast=upcast))


# ----------------------------------------------------------------------------- strided inputs


@dtypes
def test_noncontiguous_transposed(gen, dtype):
    # (B, H, S, D) storage viewed as (B, S, H, D): last stride 1, others permuted.
    q = randn((2, 4, 21, 32), dtype, gen).transpose(1, 2)
    k = randn((2, 2, 45, 32), dtype, gen).transpose(1, 2)
    v = randn((2, 45, 2, 32), dtype, gen)  # k and v with different strides
    assert not q.is_contiguous() and not k.is_contiguous()
    run_dense(q, k, v, causal=True)


@dtypes
def test_noncontiguous_padded_headdim(gen, dtype):
    # Rows wider than head_dim (sliced from a bigger last dimension), and a batch-strided slice.
    q = randn((4, 13, 3, 40), dtype, gen)[::2, :, :, 8:]
    k = randn((2, 30, 1, 48), dtype, gen)[..., :32]
    v = randn((2, 30, 3, 32), dtype, gen)[:, :, 1:2]
    run_dense(q, k, v, window_size=(4, 4))


@dtypes
def test_noncontiguous_varlen_from_packed_qkv(gen, dtype):
    lens = [5, 0, 23]
    packed = randn((sum(lens), 3, 4, 24), dtype, gen)
    q, k, v = packed.unbind(1)
    cu = cu_seqlens(lens)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True, return_attn_probs=True)
    check(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu, cu, causal=True, upcast=upcast))


# ----------------------------------------------------------------------------- every ISA


ISA_CASES = {
    "gqa_causal_softcap_alibi": dict(shape=(2, 19, 70, 8, 2, 64), causal=True, softcap=8.0, alibi=True),
    "window_long": dict(shape=(1, 40, 200, 2, 1, 96), window_size=(33, 5)),
    "decode_d256": dict(shape=(3, 1, 130, 4, 1, 256)),
    "rows32_d8": dict(shape=(1, 70, 70, 1, 1, 8), causal=True),
}


@dtypes
@pytest.mark.parametrize("case", list(ISA_CASES))
def test_every_isa(cpu_isa, gen, dtype, case):
    cfg = dict(ISA_CASES[case])
    shape = cfg.pop("shape")
    if cfg.pop("alibi", False):
        cfg["alibi_slopes"] = alibi_slopes(shape[3], shape[0], gen)
    q, k, v = qkv(gen, dtype, *shape)
    run_dense(q, k, v, **cfg)


@dtypes
def test_every_isa_varlen(cpu_isa, gen, dtype):
    lq, lk = [1, 0, 33, 9], [64, 5, 40, 0]
    q, k, v = randn((sum(lq), 4, 72), dtype, gen), randn((sum(lk), 2, 72), dtype, gen), randn((sum(lk), 2, 72), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 64, causal=True, return_attn_probs=True)
    check(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, causal=True, upcast=upcast))


# Which tile kernel runs depends on rows = seqlen_q * (nheads // nheads_k) per kv head, the head
# dim and the dtype: at most 8 rows and head_dim % 16 == 0 take the few-rows (decode) kernel,
# bf16 has vdpbf16ps/AMX variants for head_dim % 32 == 0, and 16- or 32-row tiles otherwise.
# Key counts cross the 16/32-key padding and the 64-key tile edges.
ROW_KINDS = {  # name: (seqlen_q, nheads, nheads_k)
    "rows8": (1, 8, 1),
    "rows4": (2, 4, 2),
    "rows10": (5, 2, 1),
    "rows40": (20, 4, 2),
}
MODS = {
    "k1": (1, {}),
    "k33": (33, {}),
    "k129": (129, {}),
    "k65_causal_window_softcap_alibi": (65, dict(causal=True, window_size=(40, -1), softcap=10.0, alibi=True)),
    "k129_window_both": (129, dict(window_size=(50, 7))),
}


@dtypes
@pytest.mark.parametrize("headdim", [16, 24, 80, 96])
@pytest.mark.parametrize("rows", list(ROW_KINDS))
@pytest.mark.parametrize("mods", list(MODS))
def test_kernel_paths(cpu_isa, gen, dtype, headdim, rows, mods):
    sq, h, hk = ROW_KINDS[rows]
    sk, kw = MODS[mods]
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = alibi_slopes(h, 2, gen)
    q, k, v = qkv(gen, dtype, 2, sq, sk, h, hk, headdim)
    run_dense(q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_isas_agree(cpu_isa, gen, dtype):
    # The SIMD levels differ only in rounding: float32 results agree with the scalar kernel to
    # float32 accuracy, bf16 ones to a couple of bf16 ulps.
    q, k, v = qkv(gen, dtype, 1, 33, 90, 4, 2, 64)
    out = fastinfer.flash_attn_func(q, k, v, causal=True).float()
    fastinfer.set_cpu_isa("scalar")
    base = fastinfer.flash_attn_func(q, k, v, causal=True).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, base, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- frameworks


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_numpy_inputs(np_rng, np_dtype):
    q = np_rng.standard_normal((2, 9, 4, 32)).astype(np_dtype)
    k = np_rng.standard_normal((2, 21, 2, 32)).astype(np_dtype)
    v = np_rng.standard_normal((2, 21, 2, 32)).astype(np_dtype)
    out, lse, _ = fastinfer.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert isinstance(out, np.ndarray) and out.dtype == np_dtype and out.shape == q.shape
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32 and lse.shape == (2, 4, 9)
    check(out, lse, lambda upcast: attention_ref(q, k, v, causal=True, upcast=upcast))


def test_numpy_varlen_with_slopes_and_lists(np_rng):
    lq, lk = [3, 8], [8, 8]
    q = np_rng.standard_normal((11, 2, 16)).astype(np.float32)
    k = np_rng.standard_normal((16, 1, 16)).astype(np.float32)
    v = np_rng.standard_normal((16, 1, 16)).astype(np.float32)
    cu_q, cu_k = np.array([0, 3, 11], dtype=np.int64), [0, 8, 16]  # int64 array, plain list
    slopes = [0.5, 0.25]
    out = fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 8, causal=True, alibi_slopes=slopes)
    assert isinstance(out, np.ndarray)
    check(out, None, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, causal=True,
                                                         alibi_slopes=torch.tensor(slopes), upcast=upcast))


def test_requires_grad_inputs(gen):
    q, k, v = (t.requires_grad_() for t in qkv(gen, torch.float32, 1, 6, 10, 2, 1, 16))
    out = fastinfer.flash_attn_func(q, k, v, causal=True)
    assert out.requires_grad  # through the custom op (gradients: tests/test_torch_ops.py)
    check(out.detach(), None, lambda upcast: attention_ref(q.detach(), k.detach(), v.detach(), causal=True,
                                                           upcast=upcast))
    with torch.no_grad():  # the direct kernel call
        assert not fastinfer.flash_attn_func(q, k, v, causal=True).requires_grad
    packed = randn((1, 6, 3, 2, 16), torch.float32, gen).requires_grad_()
    out = fastinfer.flash_attn_qkvpacked_func(packed)
    check(out.detach(), None, lambda upcast: attention_ref(*packed.detach().unbind(2), upcast=upcast))


def test_deterministic(gen):
    q, k, v = qkv(gen, torch.bfloat16, 1, 3, 900, 8, 1, 64)  # few tiles: split-KV engages
    a = fastinfer.flash_attn_func(q, k, v)
    b = fastinfer.flash_attn_func(q, k, v, deterministic=True)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- no dependence on earlier calls

# Runs in a child process: it leaves NaN in freed heap memory (a call on NaN inputs with more
# keys), then repeats a call whose 35 query rows per kv head exceed one 32-row tile (so the
# kernels stage each head's keys/values once) and whose left window starts the key range off
# the 64-key grid. The answer must be the same as on a clean heap, bit for bit, with no NaN.
_STALE_MEMORY_SCRIPT = r"""
import json, sys, torch, fastinfer
fastinfer.set_cpu_isa(sys.argv[1])
fastinfer.set_num_threads(1)
res = {}
for name, dtype in [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g).to(dtype) for n in (35, 127, 127))
    clean = fastinfer.flash_attn_func(q, k, v, window_size=(23, 35))
    nan_q = torch.full((1, 35, 2, 64), float("nan"), dtype=dtype)
    nan_k = torch.full((1, 191, 2, 64), float("nan"), dtype=dtype)
    differs = 0
    for _ in range(3):
        fastinfer.flash_attn_func(nan_q, nan_k, nan_k)
        out = fastinfer.flash_attn_func(q, k, v, window_size=(23, 35))
        differs += int((out != clean).sum()) + int(torch.isnan(clean).sum())
    res[name] = differs
print(json.dumps(res))
"""


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512_bf16", "amx"])  # avx_vnni: avx2's attention
def test_result_does_not_depend_on_earlier_calls(isa):
    if isa not in SUPPORTED_ISAS:
        pytest.skip(f"this build/CPU does not support {isa}")
    res = subprocess.run([sys.executable, "-c", _STALE_MEMORY_SCRIPT, isa], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"child process failed (rc={res.returncode}): {res.stderr[-2000:]}"
    differing = json.loads(res.stdout.strip().splitlines()[-1])
    assert differing == {"fp32": 0, "fp16": 0, "bf16": 0}, f"elements that changed after earlier NaN calls: {differing}"


# ----------------------------------------------------------------------------- raw kernel call, poisoned buffers


def _opts(d, causal=False, window=(-1, -1), softcap=0.0, num_splits=0, scale=None):
    o = _C.AttentionOptions()
    o.softmax_scale = d ** -0.5 if scale is None else scale
    o.softcap = softcap
    o.window_left, o.window_right = window[0], 0 if causal else window[1]
    o.num_splits = num_splits
    return o


@dtypes
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_C_dense_writes_every_output(gen, dtype, causal):
    q, k, v = qkv(gen, dtype, 2, 37, 21, 4, 2, 40)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    lse = torch.full((2, 4, 37), float("nan"))
    _C.attention_forward(q, k, v, out, lse=lse, options=_opts(40, causal))
    check(out, lse, lambda upcast: attention_ref(q, k, v, causal=causal, upcast=upcast))


@dtypes
def test_C_strided_out_and_lse(gen, dtype):
    # out and lse are views into bigger NaN buffers: the kernel writes exactly their elements.
    q, k, v = qkv(gen, dtype, 2, 9, 30, 4, 1, 32)
    out_buf = torch.full((2, 9, 6, 48), float("nan"), dtype=dtype)
    lse_buf = torch.full((2, 9, 5), float("nan"))
    out = out_buf[:, :, 1:5, 8:40]
    lse = lse_buf[:, :, 1:].transpose(1, 2)  # (2, 4, 9) with non-unit last stride
    _C.attention_forward(q, k, v, out, lse=lse, options=_opts(32, causal=True))
    check(out, lse, lambda upcast: attention_ref(q, k, v, causal=True, upcast=upcast))
    written = torch.zeros(out_buf.shape, dtype=torch.bool)
    written[:, :, 1:5, 8:40] = True
    assert torch.isnan(out_buf[~written]).all()
    assert torch.isnan(lse_buf[:, :, 0]).all()


@dtypes
def test_C_varlen_writes_every_output(gen, dtype):
    lq, lk = [4, 0, 40, 2], [0, 6, 33, 70]
    q, k, v = randn((sum(lq), 4, 16), dtype, gen), randn((sum(lk), 4, 16), dtype, gen), randn((sum(lk), 4, 16), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    lse = torch.full((4, sum(lq)), float("nan"))
    _C.attention_forward(q, k, v, out, lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, options=_opts(16, window=(8, 0)))
    check(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, window_size=(8, 0), upcast=upcast))


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_C_split_kv_writes_every_output(gen, num_splits):
    q, k, v = qkv(gen, torch.float32, 1, 1, 1100, 4, 1, 64)
    out = torch.full(q.shape, float("nan"))
    lse = torch.full((1, 4, 1), float("nan"))
    _C.attention_forward(q, k, v, out, lse=lse, options=_opts(64, num_splits=num_splits))
    check(out, lse, lambda upcast: attention_ref(q, k, v, upcast=upcast))


def test_C_kv_batch_idx_and_seqlens(gen):
    q = randn((3, 2, 4, 32), torch.bfloat16, gen)
    kc, vc = randn((5, 50, 2, 32), torch.bfloat16, gen), randn((5, 50, 2, 32), torch.bfloat16, gen)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    lens = torch.tensor([50, 1, 17], dtype=torch.int32)
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16)
    lse = torch.full((3, 4, 2), float("nan"))
    _C.attention_forward(q, kc, vc, out, lse=lse, seqlens_k=lens, kv_batch_idx=idx, options=_opts(32, causal=True))
    for b in range(3):
        i, n = int(idx[b]), int(lens[b])
        check(out[b:b + 1], lse[b:b + 1],
              lambda upcast: attention_ref(q[b:b + 1], kc[i:i + 1, :n], vc[i:i + 1, :n], causal=True, upcast=upcast))


# ----------------------------------------------------------------------------- random configurations


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_configurations(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.integers(1, 2))
    sq, sk = draw(st.integers(1, 70)), draw(st.integers(0, 140))
    hk = draw(st.sampled_from([1, 2]))
    h = hk * draw(st.sampled_from([1, 2, 3, 4]))
    d = 8 * draw(st.integers(1, 16))
    causal = draw(st.booleans())
    window = (draw(st.integers(-1, 40)), draw(st.integers(-1, 40)))
    softcap = draw(st.sampled_from([0.0, 0.0, 2.0, 20.0]))
    alibi = draw(st.sampled_from([None, "h", "bh"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    if alibi:
        kw["alibi_slopes"] = alibi_slopes(h, batch if alibi == "bh" else None, gen)
    q, k, v = qkv(gen, dtype, batch, sq, sk, h, hk, d)
    run_dense(q, k, v, **kw)
