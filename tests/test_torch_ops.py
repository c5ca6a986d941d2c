"""fastinfer.torch_ops: autograd through flash_attn_func / flash_attn_varlen_func against a float64
reference, opcheck for every op, torch.compile(fullgraph=True), and the routing rule (custom op
only for autograd or compile; direct kernel call otherwise)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastinfer
from fastinfer import torch_ops
from reference import assert_close, attention_ref, attention_ref_varlen, cu_seqlens, randn

# Gradient floors (added to twice the low-precision reference's error, as for the forward).
GRAD_FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def grads(fn, inputs, dout):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return (out,) + torch.autograd.grad(out, leaves, dout)


def check_grads(mine, ref_fn, inputs, dout):
    """mine: (out, dq, dk, dv) from fastinfer; reference in float64 and in the input dtype."""
    ref = grads(lambda *t: ref_fn(*t, upcast=True), [x.double() for x in inputs], dout.double())
    lowp = grads(lambda *t: ref_fn(*t, upcast=False), inputs, dout)
    floor = GRAD_FLOOR[inputs[0].dtype]
    for name, a, r, lp in zip(("out", "dq", "dk", "dv"), mine, ref, lowp):
        assert a.dtype == inputs[0].dtype
        assert_close(a.detach(), r.detach(), lp.detach(), floor=None if name == "out" else floor, what=name)


DENSE_CASES = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(4, 2)),
    "causal_window": dict(causal=True, window_size=(5, -1)),
    "softcap": dict(softcap=3.0, causal=True),
    "scale": dict(softmax_scale=0.3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 13, 4, 2, 32), (1, 17, 11, 4, 4, 64)],
                         ids=["gqa_q9_k13", "mha_q17_k11"])
def test_dense_forward_backward(gen, dtype, case, shape):
    b, sq, sk, h, hk, d = shape
    kw = DENSE_CASES[case]
    q, k, v = randn((b, sq, h, d), dtype, gen), randn((b, sk, hk, d), dtype, gen), randn((b, sk, hk, d), dtype, gen)
    dout = randn((b, sq, h, d), dtype, gen)
    mine = grads(lambda q, k, v: fastinfer.flash_attn_func(q, k, v, **kw), [q, k, v], dout)
    check_grads(mine, lambda q, k, v, upcast: attention_ref(q, k, v, upcast=upcast, **kw)[0], [q, k, v], dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["causal", "window", "softcap"])
def test_varlen_forward_backward(gen, dtype, case):
    kw = {"causal": dict(causal=True), "window": dict(window_size=(3, 3)),
          "softcap": dict(softcap=2.0, causal=True)}[case]
    lq, lk = [5, 1, 12], [7, 4, 12]
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    q, k, v = randn((sum(lq), 4, 16), dtype, gen), randn((sum(lk), 2, 16), dtype, gen), randn((sum(lk), 2, 16), dtype, gen)
    dout = randn(q.shape, dtype, gen)
    mine = grads(lambda q, k, v: fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw),
                 [q, k, v], dout)
    check_grads(mine, lambda q, k, v, upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, upcast=upcast, **kw)[0],
                [q, k, v], dout)


def test_lse_is_returned_and_not_differentiable(gen):
    q = randn((1, 6, 2, 16), torch.float32, gen).requires_grad_()
    out, lse, probs = fastinfer.flash_attn_func(q, q, q, causal=True, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad and probs is None
    ref_out, ref_lse = attention_ref(q.detach(), q.detach(), q.detach(), causal=True)
    assert_close(lse, ref_lse, attention_ref(q.detach(), q.detach(), q.detach(), causal=True, upcast=False)[1])


def test_only_some_inputs_require_grad(gen):
    q, k, v = (randn((1, 5, 2, 16), torch.float32, gen) for _ in range(3))
    v.requires_grad_()
    out = fastinfer.flash_attn_func(q, k, v)
    (dv,) = torch.autograd.grad(out.sum(), [v])
    vr = v.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(attention_ref(q.double(), k.double(), vr)[0].sum(), [vr])
    torch.testing.assert_close(dv.double(), ref, rtol=1e-5, atol=1e-5)


def test_deterministic_reaches_the_backward(gen, monkeypatch):
    import fastinfer.kernels.backward

    seen = []
    real = fastinfer.kernels.backward.attention_backward

    def spy(*args, **kw):
        seen.append(kw["deterministic"])
        return real(*args, **kw)

    monkeypatch.setattr(fastinfer.kernels.backward, "attention_backward", spy)
    q = randn((1, 5, 2, 16), torch.float32, gen).requires_grad_()
    for det in (True, False):
        fastinfer.flash_attn_func(q, q, q, deterministic=det).sum().backward()
    cu = cu_seqlens([5])
    fastinfer.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 5, 5, deterministic=True).sum().backward()
    assert seen == [True, False, True]


def test_paged_varlen_backward_says_not_implemented(gen):
    q = randn((4, 2, 16), torch.float32, gen).requires_grad_()
    kc, vc = randn((3, 4, 2, 16), torch.float32, gen), randn((3, 4, 2, 16), torch.float32, gen)
    out = fastinfer.flash_attn_varlen_func(q, kc, vc, cu_seqlens([4]), cu_seqlens([6]), 4, 6,
                                           block_table=torch.tensor([[2, 0]], dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="paged"):
        out.sum().backward()


# ----------------------------------------------------------------------------- routing


def test_direct_path_without_grad_or_compile(gen, monkeypatch):
    """No-grad eager calls and tensors that do not require grad never touch the custom ops."""
    calls = []
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
        monkeypatch.setattr(torch_ops, name, lambda *a, _n=name, **k: calls.append(_n))
    q = randn((1, 3, 2, 16), torch.float32, gen)
    cu = cu_seqlens([3])
    fastinfer.flash_attn_func(q, q, q)
    fastinfer.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 3, 3)
    fastinfer.flash_attn_with_kvcache(q, q.clone(), q.clone(), cache_seqlens=3)
    with torch.no_grad():
        fastinfer.flash_attn_func(q.requires_grad_(), q, q)
    assert calls == []
    fastinfer.flash_attn_func(q, q, q)
    assert calls == ["flash_attn_func"]


def test_numpy_inputs_without_torch():
    script = ("import sys, numpy as np, fastinfer\n"
              "q = np.random.default_rng(0).standard_normal((1, 4, 2, 16)).astype(np.float32)\n"
              "out = fastinfer.flash_attn_func(q, q, q, causal=True)\n"
              "assert isinstance(out, np.ndarray) and out.shape == q.shape\n"
              "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True)


# ----------------------------------------------------------------------------- opcheck


def _kvcache_inputs(gen):
    q = randn((2, 2, 4, 16), torch.float32, gen)
    kc, vc = randn((2, 9, 2, 16), torch.float32, gen), randn((2, 9, 2, 16), torch.float32, gen)
    knew, vnew = randn((2, 2, 2, 16), torch.float32, gen), randn((2, 2, 2, 16), torch.float32, gen)
    return q, kc, vc, knew, vnew, torch.tensor([3, 5], dtype=torch.int32)


def _op_cases(gen):
    f32 = torch.float32
    q, k, v = randn((2, 5, 4, 16), f32, gen), randn((2, 7, 2, 16), f32, gen), randn((2, 7, 2, 16), f32, gen)
    cu_q, cu_k = cu_seqlens([2, 3]), cu_seqlens([4, 3])
    kq, kc, vc, knew, vnew, lens = _kvcache_inputs(gen)
    out, lse = torch.ops.fastinfer.attention_forward(q, k, v, 0.25, True, -1, -1, 0.0, None, False)
    slopes = torch.rand(4) * 0.3
    return {
        "attention_forward": (torch.ops.fastinfer.attention_forward.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.25, True, 3, -1, 0.0,
                               None, False)),
        "attention_forward_alibi": (torch.ops.fastinfer.attention_forward.default,
                                    (q, k, v, 0.25, False, -1, -1, 2.0, slopes, True)),
        "varlen_attention_forward": (torch.ops.fastinfer.varlen_attention_forward.default,
                                     (q[0].requires_grad_(), k[0].requires_grad_(), v[0].requires_grad_(), cu_q, cu_k,
                                      3, 4, 0.25, True, -1, -1, 0.0, None, None, False)),
        "attention_with_kvcache": (torch.ops.fastinfer.attention_with_kvcache.default,
                                   (kq, kc, vc, lens, None, None, 0.25, True, -1, -1, 0.0, None, 0)),
        "attention_with_kvcache_append": (torch.ops.fastinfer.attention_with_kvcache_append.default,
                                          (kq, kc, vc, knew, vnew, lens, None, None, 0.25, True, -1, -1, 0.0, None, 0)),
        "reshape_and_cache": (torch.ops.fastinfer.reshape_and_cache.default,
                              (k[0], v[0], randn((4, 3, 2, 16), f32, gen), randn((4, 3, 2, 16), f32, gen),
                               torch.tensor([0, 5, -1, 7, 11, 2, 3], dtype=torch.int64))),
        "attention_backward": (torch.ops.fastinfer.attention_backward.default,
                               (randn(q.shape, f32, gen), q.detach(), k.detach(), v.detach(), out, lse, None, None, 0, 0,
                                0.25, True, -1, -1, 0.0, None, False)),
    }


OPS = ["attention_forward", "attention_forward_alibi", "varlen_attention_forward", "attention_with_kvcache",
       "attention_with_kvcache_append", "reshape_and_cache", "attention_backward"]


@pytest.mark.parametrize("name", OPS)
def test_opcheck(gen, name):
    op, args = _op_cases(gen)[name]
    torch.library.opcheck(op, args)


def test_kvcache_append_writes_the_cache(gen):
    q, kc, vc, knew, vnew, lens = _kvcache_inputs(gen)
    expect_k, expect_v = kc.clone(), vc.clone()
    for b in range(2):
        expect_k[b, lens[b]:lens[b] + 2] = knew[b]
        expect_v[b, lens[b]:lens[b] + 2] = vnew[b]
    out = torch_ops.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens, causal=True)
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)
    ref = torch.cat([attention_ref(q[b:b + 1], expect_k[b:b + 1, :lens[b] + 2], expect_v[b:b + 1, :lens[b] + 2],
                                   causal=True)[0] for b in range(2)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- torch.compile


class TinyAttention(torch.nn.Module):
    """Projection -> flash_attn_func (GQA, causal) -> projection; and a varlen variant."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
        self.proj = torch.nn.Linear(heads * self.hd, dim)

    def forward(self, x, cu=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
        q, k, v = q.view(b, s, -1, self.hd), k.view(b, s, -1, self.hd), v.view(b, s, -1, self.hd)
        if cu is None:
            o = fastinfer.flash_attn_func(q, k, v, causal=True)
        else:
            o = fastinfer.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, s, s,
                                                 causal=True).view(b, s, -1, self.hd)
        return self.proj(o.flatten(2))


def test_compile_fullgraph_forward_backward(gen):
    """Dynamo + AOT autograd over the fake implementations (aot_eager: no code generation, so the
    test stays fast), forward and backward graphs, dense and varlen."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyAttention()
    x = randn((2, 6, 32), torch.float32, gen)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for args in [(x,), (x[:1], cu_seqlens([2, 4]))]:  # dense; varlen (two sequences in one row)
        eager_out = model(*args)
        (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), [model.qkv.weight])
        out = compiled(*args)
        (grad,) = torch.autograd.grad(out.square().sum(), [model.qkv.weight])
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_inductor(gen):
    """CPU inductor around the op (one small inference graph: code generation is the slow part)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyAttention(dim=16, heads=2, kv_heads=1)
    x = randn((1, 5, 16), torch.float32, gen)
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend="inductor")(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_inference_kvcache_and_reshape_and_cache(gen):
    """The engine's decode ops under compile: reshape_and_cache and the kv-cache attention
    mutate their caches inside the graph, no graph break."""
    torch._dynamo.reset()

    def decode(q, knew, vnew, kc, vc, slots, table, lens):
        fastinfer.ops.reshape_and_cache(knew.flatten(0, 1), vnew.flatten(0, 1), kc, vc, slots)
        return fastinfer.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, causal=True)

    q = randn((2, 1, 4, 16), torch.float32, gen)
    knew, vnew = randn((2, 1, 2, 16), torch.float32, gen), randn((2, 1, 2, 16), torch.float32, gen)
    kc, vc = randn((6, 4, 2, 16), torch.float32, gen), randn((6, 4, 2, 16), torch.float32, gen)
    table = torch.tensor([[3, 1], [0, 5]], dtype=torch.int32)
    lens = torch.tensor([6, 3], dtype=torch.int32)
    slots = torch.tensor([1 * 4 + 1, 0 * 4 + 2], dtype=torch.int64)  # positions 5 and 2
    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        expect = decode(q, knew, vnew, kc, vc, slots, table, lens)
        got = torch.compile(decode, fullgraph=True, backend="aot_eager")(q, knew, vnew, kc2, vc2, slots, table, lens)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
