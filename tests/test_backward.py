"""CPU attention backward (fastinfer.kernels.backward.attention_backward) against float64 autograd.

Tolerance: flash-attention's rule per gradient, 2 * (error of the same autograd computation
in the input dtype) + a small floor (reference.assert_close). Outputs are poisoned with NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastinfer
import fastinfer.kernels.backward
from fastinfer import _C
from fastinfer.kernels.backward import attention_backward
from conftest import _poisoned_like, dtypes
from reference import alibi_slopes, cu_seqlens, randn
from reference_backward import attention_grads_ref, attention_grads_ref_varlen, check_grads


@pytest.fixture(autouse=True)
def _poison_grads(monkeypatch):
    """dq/dk/dv come from an uninitialised `empty`: make them NaN so unwritten elements show."""
    monkeypatch.setattr(fastinfer.kernels.backward, "empty_like", _poisoned_like)


@pytest.fixture(autouse=True)
def _single_threaded_reference():
    """The float64 autograd references are tiny: torch's intra-op threads only add spinning (10x the CPU time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_dense(gen, dtype, B, Sq, Sk, H, Hk, D, *, scale=1.0, **kw):
    """Forward (for out and lse), backward, and the check against the reference."""
    q, k, v = randn((B, Sq, H, D), dtype, gen, scale), randn((B, Sk, Hk, D), dtype, gen, scale), randn((B, Sk, Hk, D), dtype, gen)
    dout = randn((B, Sq, H, D), dtype, gen)
    out, lse, _ = fastinfer.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    grads = attention_backward(dout, q, k, v, out, lse, **kw)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    check_grads(grads, lambda upcast: attention_grads_ref(q, k, v, dout, upcast=upcast, **kw))
    return q, k, v, dout, out, lse, grads


def run_varlen(gen, dtype, lens_q, lens_k, H, Hk, D, extra_q=0, extra_k=0, **kw):
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    tq, tk = int(cq[-1]) + extra_q, int(ck[-1]) + extra_k  # extra: trailing rows outside every sequence
    q, k, v = randn((tq, H, D), dtype, gen), randn((tk, Hk, D), dtype, gen), randn((tk, Hk, D), dtype, gen)
    dout = randn((tq, H, D), dtype, gen)
    mq, mk = max(lens_q, default=0), max(lens_k, default=0)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, return_attn_probs=True, **kw)
    if extra_q:  # rows outside every sequence: the forward leaves them; give them finite values
        out[int(cq[-1]):] = 0
        lse[:, int(cq[-1]):] = 0
    grads = attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq,
                               max_seqlen_k=mk, **kw)
    check_grads(grads, lambda upcast: attention_grads_ref_varlen(q, k, v, dout, cq, ck, upcast=upcast, **kw))
    return grads


# ----------------------------------------------------------------------------- dense


@dtypes
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 53, 4, 2), (1, 1, 70, 4, 1), (2, 70, 1, 2, 1), (1, 100, 33, 3, 3),
                                   (1, 1, 1, 1, 1)], ids=str)
def test_dense(gen, dtype, causal, shape):
    run_dense(gen, dtype, *shape, 64, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("headdim", [8, 32, 40, 80, 96, 128, 256])
def test_head_dims(gen, dtype, headdim):
    run_dense(gen, dtype, 1, 45, 75, 4, 2, headdim, causal=True)


@dtypes
@pytest.mark.parametrize("hk", [1, 2, 8])
def test_gqa(gen, dtype, hk):
    run_dense(gen, dtype, 1, 33, 90, 8, hk, 32)


def test_gqa_sums_over_the_group(gen):
    """dk/dv of a kv head equal the sum of the per-head gradients of the repeated keys (MHA)."""
    q, k, v = randn((1, 20, 4, 32), torch.float32, gen), randn((1, 30, 1, 32), torch.float32, gen), randn((1, 30, 1, 32), torch.float32, gen)
    dout = randn((1, 20, 4, 32), torch.float32, gen)
    out, lse, _ = fastinfer.flash_attn_func(q, k, v, return_attn_probs=True)
    _, dk, dv = attention_backward(dout, q, k, v, out, lse)
    kr, vr = k.repeat_interleave(4, 2), v.repeat_interleave(4, 2)
    out2, lse2, _ = fastinfer.flash_attn_func(q, kr, vr, return_attn_probs=True)
    _, dk2, dv2 = attention_backward(dout, q, kr, vr, out2, lse2)
    torch.testing.assert_close(dk, dk2.sum(2, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, dv2.sum(2, keepdim=True), rtol=1e-5, atol=1e-5)


@dtypes
@pytest.mark.parametrize("window", [(0, 0), (5, 3), (-1, 7), (20, -1), (70, 70)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(50, 130), (130, 50)])
def test_sliding_window(gen, dtype, window, causal, sq, sk):
    run_dense(gen, dtype, 1, sq, sk, 2, 1, 32, window_size=window, causal=causal)


@dtypes
@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(gen, dtype, softcap, causal):
    # Large scores, so that the cap (and its tanh derivative) matters.
    run_dense(gen, dtype, 1, 40, 70, 4, 2, 64, scale=3.0, softcap=softcap, causal=causal)


@dtypes
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("extra", [{}, {"causal": True}, {"window_size": (9, 2), "softcap": 10.0}], ids=str)
def test_alibi(gen, dtype, per_batch, extra):
    slopes = alibi_slopes(4, 2 if per_batch else None, gen)
    run_dense(gen, dtype, 2, 41, 66, 4, 2, 32, alibi_slopes=slopes, **extra)


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
def test_softmax_scale(gen, scale):
    run_dense(gen, torch.float32, 1, 30, 50, 2, 2, 64, softmax_scale=scale, causal=True)


@dtypes
def test_large_scores(gen, dtype):
    run_dense(gen, dtype, 1, 33, 77, 2, 1, 64, scale=6.0)


def test_rows_without_keys_get_zero_gradients(gen):
    """Causal with more queries than keys: the first rows see no key (lse = +inf)."""
    q, k, v, dout, out, lse, (dq, dk, dv) = run_dense(gen, torch.float32, 1, 40, 10, 2, 1, 32, causal=True)
    assert torch.isinf(lse[:, :, :30]).all()
    assert (dq[:, :30] == 0).all() and dq[:, 30:].abs().sum() > 0


def test_keys_no_query_sees_get_zero_gradients(gen):
    """A left window over few queries: early keys are never attended to."""
    q, k, v, dout, out, lse, (dq, dk, dv) = run_dense(gen, torch.float32, 1, 8, 100, 2, 2, 32, window_size=(4, 0))
    assert (dk[:, :88] == 0).all() and (dv[:, :88] == 0).all() and dk[:, 92:].abs().sum() > 0


def test_zero_length_queries(gen):
    q, k, v = randn((2, 0, 2, 32), torch.float32, gen), randn((2, 9, 2, 32), torch.float32, gen), randn((2, 9, 2, 32), torch.float32, gen)
    out, lse = torch.empty_like(q), torch.empty(2, 2, 0)
    dq, dk, dv = attention_backward(torch.empty_like(q), q, k, v, out, lse)
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all()


# ----------------------------------------------------------------------------- varlen


@dtypes
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", [([5, 1, 40], [7, 1, 40]), ([33, 0, 17], [20, 9, 50]), ([64], [64]), ([1, 1], [1, 80])],
                         ids=str)
def test_varlen(gen, dtype, causal, lens):
    run_varlen(gen, dtype, *lens, 4, 2, 64, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("extra", [{"window_size": (6, 2)}, {"softcap": 8.0}, {"alibi": True}, {"softmax_scale": 0.3}],
                         ids=str)
def test_varlen_options(gen, dtype, extra):
    extra = dict(extra)
    if extra.pop("alibi", False):
        extra["alibi_slopes"] = alibi_slopes(4, 3, gen)
    run_varlen(gen, dtype, [20, 3, 31], [25, 40, 31], 4, 1, 80, causal=True, **extra)


def test_varlen_rows_outside_sequences_are_zeroed(gen):
    dq, dk, dv = run_varlen(gen, torch.float32, [9, 4], [12, 7], 2, 2, 32, extra_q=3, extra_k=5, causal=True)
    assert (dq[13:] == 0).all() and (dk[19:] == 0).all() and (dv[19:] == 0).all()


def test_varlen_int64_cu_seqlens(gen):
    lens = [10, 30]
    q, k, v = randn((40, 2, 32), torch.float32, gen), randn((40, 2, 32), torch.float32, gen), randn((40, 2, 32), torch.float32, gen)
    dout = randn((40, 2, 32), torch.float32, gen)
    cu = cu_seqlens(lens)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, causal=True, return_attn_probs=True)
    a = attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    b = attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu.long(), cu_seqlens_k=cu.long(), causal=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- ISAs, layouts, determinism


@dtypes
@pytest.mark.parametrize("case", [
    dict(B=2, Sq=45, Sk=77, H=6, Hk=2, D=80, causal=True, softcap=12.0),
    dict(B=1, Sq=70, Sk=70, H=4, Hk=4, D=64, window_size=(10, 5)),
    dict(B=1, Sq=3, Sk=150, H=8, Hk=2, D=128, alibi=True, window_size=(100, 5)),
], ids=["gqa-causal-softcap", "window", "decode-alibi-window"])
def test_every_isa(cpu_isa, gen, dtype, case):
    case = dict(case)
    shape = [case.pop(n) for n in ("B", "Sq", "Sk", "H", "Hk", "D")]
    if case.pop("alibi", False):
        case["alibi_slopes"] = alibi_slopes(shape[3])
    run_dense(gen, dtype, *shape, **case)


@dtypes
def test_every_isa_varlen(cpu_isa, gen, dtype):
    run_varlen(gen, dtype, [17, 1, 40], [30, 6, 40], 4, 2, 32, causal=True)


def test_isas_agree(gen):
    """Every level computes the same gradients up to float32 rounding."""
    from conftest import SUPPORTED_ISAS

    q, k, v = randn((1, 60, 4, 64), torch.bfloat16, gen), randn((1, 90, 2, 64), torch.bfloat16, gen), randn((1, 90, 2, 64), torch.bfloat16, gen)
    dout = randn((1, 60, 4, 64), torch.bfloat16, gen)
    out, lse, _ = fastinfer.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    results = {}
    for isa in SUPPORTED_ISAS:
        fastinfer.set_cpu_isa(isa)
        results[isa] = [g.float() for g in attention_backward(dout, q, k, v, out, lse, causal=True)]
    first = next(iter(results.values()))
    for isa, grads in results.items():
        for a, b in zip(grads, first):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=f"{isa} differs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_bitwise(gen, dtype):
    """Repeated calls, any thread count, deterministic or not: identical bits."""
    q, k, v = randn((2, 150, 8, 64), dtype, gen), randn((2, 200, 2, 64), dtype, gen), randn((2, 200, 2, 64), dtype, gen)
    dout = randn((2, 150, 8, 64), dtype, gen)
    out, lse, _ = fastinfer.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    first = attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for threads, det in ((2, True), (1, True), (2, False), (2, True)):
        fastinfer.set_num_threads(threads)
        again = attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=det)
        for a, b in zip(first, again):
            assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               b.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_strided_inputs_and_preallocated_outputs(gen):
    """Views with row/head strides (packed qkv, padded outputs) give the contiguous results."""
    qkv = randn((2, 30, 3, 4, 32), torch.float32, gen)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    dout = randn((2, 30, 4, 48), torch.float32, gen)[..., :32]
    out, lse, _ = fastinfer.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    want = attention_backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse, causal=True)
    dqkv = torch.full((2, 30, 3, 4, 32), float("nan"))
    got = attention_backward(dout, q, k, v, out, lse, causal=True, dq=dqkv[:, :, 0], dk=dqkv[:, :, 1], dv=dqkv[:, :, 2])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(dqkv[:, :, 1], want[1])


def test_numpy_inputs(np_rng):
    q = np_rng.standard_normal((1, 12, 2, 32)).astype(np.float32)
    k = np_rng.standard_normal((1, 20, 2, 32)).astype(np.float32)
    dout = np_rng.standard_normal((1, 12, 2, 32)).astype(np.float32)
    out, lse, _ = fastinfer.flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    dq, dk, dv = attention_backward(dout, q, k, k, out, lse, causal=True)
    assert isinstance(dq, np.ndarray) and dq.dtype == np.float32
    ref = attention_grads_ref(q, k, k, dout, causal=True)
    for g, r in zip((dq, dk, dv), ref):
        np.testing.assert_allclose(g, r.numpy(), atol=2e-5, rtol=1e-4)


def test_fp32_tight(gen):
    """float32 gradients agree with float64 autograd to float32 rounding (no low-precision slack)."""
    q, k, v, dout, out, lse, grads = run_dense(gen, torch.float32, 2, 90, 130, 4, 2, 64, causal=True, softcap=20.0)
    ref = attention_grads_ref(q, k, v, dout, causal=True, softcap=20.0)
    for g, r in zip(grads, ref):
        assert (g.double() - r).abs().max().item() <= 1e-5 * max(1.0, r.abs().max().item())


# ----------------------------------------------------------------------------- bad inputs


def _valid(gen, varlen=False):
    if varlen:
        q, k, v = randn((20, 4, 32), torch.float32, gen), randn((30, 2, 32), torch.float32, gen), randn((30, 2, 32), torch.float32, gen)
        lse = torch.zeros(4, 20)
    else:
        q, k, v = randn((2, 10, 4, 32), torch.float32, gen), randn((2, 15, 2, 32), torch.float32, gen), randn((2, 15, 2, 32), torch.float32, gen)
        lse = torch.zeros(2, 4, 10)
    return dict(dout=torch.randn_like(q), q=q, k=k, v=v, out=torch.randn_like(q), lse=lse,
                dq=torch.full_like(q, 7.0), dk=torch.full_like(k, 7.0), dv=torch.full_like(v, 7.0))


BAD = [
    ("lse", lambda a: None, ValueError, "lse: the forward's log-sum-exp is required"),
    ("lse", lambda a: torch.zeros(2, 10, 4), ValueError, "lse: expected shape (2, 4, 10)"),
    ("lse", lambda a: torch.zeros(2, 4, 10, dtype=torch.float16), TypeError, "lse: expected dtype float32"),
    ("dout", lambda a: torch.zeros(2, 10, 4, 16), ValueError, "dout: expected the shape of q"),
    ("dout", lambda a: a["dout"].half(), TypeError, "dout: expected dtype float32"),
    ("dq", lambda a: torch.zeros(2, 10, 4, 32, dtype=torch.bfloat16), TypeError, "dq: expected dtype float32"),
    ("dk", lambda a: torch.zeros(2, 15, 4, 32), ValueError, "dk: expected the shape of k"),
    ("dv", lambda a: torch.zeros(2, 32, 2, 15).transpose(1, 3), ValueError, "dv: the last dimension must be contiguous"),
    ("k", lambda a: torch.zeros(2, 15, 2, 40), ValueError, "v: expected the shape of k (2, 15, 2, 40)"),
    ("q", lambda a: torch.zeros(2, 10, 4, 12), ValueError, "head dimension must be a multiple of 8"),
    ("out", lambda a: torch.zeros(2, 10, 4, 32, dtype=torch.float64), TypeError, "out: expected dtype float32"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_and_write_nothing(gen, name, make, exc, msg):
    a = _valid(gen)
    a[name] = make(a)
    before = {n: x.clone() for n, x in a.items() if isinstance(x, torch.Tensor)}
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], dq=a["dq"], dk=a["dk"], dv=a["dv"])
    for n, x in before.items():
        assert torch.equal(a[n], x), f"{n} was modified"


@pytest.mark.parametrize("case", ["only_cu_q", "decreasing", "too_long", "lse_shape"])
def test_bad_varlen_inputs(gen, case):
    a = _valid(gen, varlen=True)
    cu_q, cu_k = torch.tensor([0, 8, 20], dtype=torch.int32), torch.tensor([0, 10, 30], dtype=torch.int32)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    msg = {"only_cu_q": "must be given together", "decreasing": "cu_seqlens_k must be non-decreasing",
           "too_long": r"cu_seqlens_q\[-1\] = 21 exceeds", "lse_shape": r"lse: expected shape \(4, 20\)"}[case]
    if case == "only_cu_q":
        kw.pop("cu_seqlens_k")
    elif case == "decreasing":
        kw["cu_seqlens_k"] = torch.tensor([0, 12, 10], dtype=torch.int32)
    elif case == "too_long":
        kw["cu_seqlens_q"] = torch.tensor([0, 8, 21], dtype=torch.int32)
    else:
        a["lse"] = torch.zeros(2, 4, 10)
    with pytest.raises(ValueError, match=msg):
        attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], dq=a["dq"], dk=a["dk"], dv=a["dv"], **kw)
    for g in (a["dq"], a["dk"], a["dv"]):
        assert (g == 7.0).all()


def test_raw_binding_keywords(gen):
    """The binding itself (what the torch.library op calls) with its keyword names."""
    a = _valid(gen)
    opt = _C.AttentionOptions()
    opt.softmax_scale = 32 ** -0.5
    out, lse, _ = fastinfer.flash_attn_func(a["q"], a["k"], a["v"], return_attn_probs=True)
    _C.attention_backward(a["dout"], a["q"], a["k"], a["v"], out, lse, a["dq"], a["dk"], a["dv"], options=opt,
                          deterministic=True)
    want = attention_backward(a["dout"], a["q"], a["k"], a["v"], out, lse)
    for g, w in zip((a["dq"], a["dk"], a["dv"]), want):
        assert torch.equal(g, w)
