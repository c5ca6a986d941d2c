"""The CUDA attention backward through fastinfer.kernels.backward.attention_backward, on CUDA tensors.

Marked ``cuda`` and skipped without a usable device (or a build without the CUDA kernels).
Each test compares the GPU gradients with float64 autograd under flash-attention's rule
(reference_backward.check_grads) and, where it says so, with the CPU kernels on the same
inputs. dq/dk/dv are NaN-poisoned, so an element the kernels never write fails the test.
"""

from __future__ import annotations

import pytest
import torch

import fastinfer
import fastinfer.kernels.backward
from fastinfer.kernels.backward import attention_backward
from conftest import DTYPE_IDS, _poisoned_like
from reference import alibi_slopes, cu_seqlens, randn
from reference_backward import attention_grads_ref, attention_grads_ref_varlen, check_grads

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not fastinfer.cuda_available(), reason="needs a CUDA device")]

DEV = "cuda"
gpu_dtypes = pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=lambda d: DTYPE_IDS[d])
HEAD_DIMS = (64, 96, 128, 256)


@pytest.fixture(autouse=True)
def _poison_grads(monkeypatch):
    monkeypatch.setattr(fastinfer.kernels.backward, "empty_like", _poisoned_like)


def cpu(xs):
    return [x.detach().cpu() for x in xs]


def run_dense(gen, dtype, B, Sq, Sk, H, Hk, D, *, compare_cpu=False, **kw):
    q, k, v = randn((B, Sq, H, D), dtype, gen), randn((B, Sk, Hk, D), dtype, gen), randn((B, Sk, Hk, D), dtype, gen)
    dout = randn((B, Sq, H, D), dtype, gen)
    kw_dev = dict(kw)
    if kw.get("alibi_slopes") is not None:
        kw_dev["alibi_slopes"] = kw["alibi_slopes"].to(DEV)
    qd, kd, vd, gd = (x.to(DEV) for x in (q, k, v, dout))
    out, lse, _ = fastinfer.flash_attn_func(qd, kd, vd, return_attn_probs=True, **kw_dev)
    grads = attention_backward(gd, qd, kd, vd, out, lse, **kw_dev)
    torch.cuda.synchronize()
    assert all(g.is_cuda for g in grads)
    got = cpu(grads)
    check_grads(got, lambda upcast: attention_grads_ref(q, k, v, dout, upcast=upcast, **kw))
    if compare_cpu:  # the CPU kernels on the same inputs, out and lse
        want = attention_backward(dout, q, k, v, out.cpu(), lse.cpu(), **kw)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float(), w.float(), rtol=5e-2, atol=5e-2)
    return grads, (qd, kd, vd, gd, out, lse)


@gpu_dtypes
@pytest.mark.parametrize("headdim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(gen, dtype, headdim, causal):
    run_dense(gen, dtype, 2, 97, 130, 4, 2, headdim, causal=causal, compare_cpu=True)


@gpu_dtypes
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 1, 200, 8, 2), (2, 200, 1, 2, 1), (1, 300, 300, 6, 6),
                                   (3, 65, 17, 8, 1)], ids=str)
def test_shapes(gen, dtype, shape):
    run_dense(gen, dtype, *shape, 64, causal=True)


@gpu_dtypes
@pytest.mark.parametrize("extra", [{"window_size": (16, 4)}, {"window_size": (-1, 9)}, {"softcap": 5.0},
                                   {"alibi": True}, {"softmax_scale": 0.3}], ids=str)
def test_options(gen, dtype, extra):
    extra = dict(extra)
    if extra.pop("alibi", False):
        extra["alibi_slopes"] = alibi_slopes(4)
    run_dense(gen, dtype, 2, 77, 120, 4, 2, 128, causal=True, **extra)


@gpu_dtypes
@pytest.mark.parametrize("lens", [([5, 1, 40], [7, 1, 40]), ([33, 0, 130], [20, 9, 150])], ids=str)
def test_varlen(gen, dtype, lens):
    lq, lk = lens
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    H, Hk, D = 4, 2, 64
    q, k, v = randn((int(cq[-1]), H, D), dtype, gen), randn((int(ck[-1]), Hk, D), dtype, gen), randn((int(ck[-1]), Hk, D), dtype, gen)
    dout = randn(q.shape, dtype, gen)
    qd, kd, vd, gd, cqd, ckd = (x.to(DEV) for x in (q, k, v, dout, cq, ck))
    out, lse, _ = fastinfer.flash_attn_varlen_func(qd, kd, vd, cqd, ckd, max(lq), max(lk), causal=True, return_attn_probs=True)
    grads = attention_backward(gd, qd, kd, vd, out, lse, cu_seqlens_q=cqd, cu_seqlens_k=ckd, max_seqlen_q=max(lq),
                               max_seqlen_k=max(lk), causal=True)
    check_grads(cpu(grads), lambda upcast: attention_grads_ref_varlen(q, k, v, dout, cq, ck, upcast=upcast, causal=True))


@gpu_dtypes
def test_deterministic_bitwise(gen, dtype):
    grads, (q, k, v, g, out, lse) = run_dense(gen, dtype, 2, 300, 400, 8, 2, 128, causal=True)
    for det in (True, False, True):
        again = attention_backward(g, q, k, v, out, lse, causal=True, deterministic=det)
        for a, b in zip(grads, again):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_float32_is_refused_clearly(gen):
    q = torch.randn(1, 4, 2, 64, device=DEV)
    out, lse, _ = fastinfer.flash_attn_func(q.half(), q.half(), q.half(), return_attn_probs=True)
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        attention_backward(q, q, q, q, out.float(), lse)
