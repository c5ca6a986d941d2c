"""fastinfer.scaled_dot_product_attention against torch's SDPA in float64, the kernel/fallback
decision for each kind of mask, one warning per fallback reason, and sdpa_override()."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastinfer
from fastinfer import sdpa
from reference import randn

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 4e-3}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(sdpa, "_WARNED", set())


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the fastinfer kernels the entry point calls."""
    calls = []
    for name in ("flash_attn_func", "flash_attn_varlen_func"):
        real = getattr(sdpa, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(sdpa, name, spy)
    return calls


def run(*args, **kw):
    """Our SDPA with every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fastinfer.scaled_dot_product_attention(*args, **kw)
    return out, [w for w in caught if issubclass(w.category, sdpa.SDPAFallbackWarning)]


def check_against_torch(out, args, kw):
    """|out - ref64| <= 2 * |torch's SDPA in the same dtype - ref64| + floor."""
    ref = TORCH_SDPA(*[a.double() for a in args], **{k: (x.double() if isinstance(x, torch.Tensor) and
                                                         x.is_floating_point() else x) for k, x in kw.items()})
    low = TORCH_SDPA(*args, **kw)
    assert out.shape == low.shape and out.dtype == low.dtype
    err = (out.double() - ref).abs().max().item()
    tol = 2 * (low.double() - ref).abs().max().item() + FLOOR[out.dtype]
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


def qkv(gen, dtype, b=2, h=4, hk=4, lq=7, lk=7, e=32):
    return randn((b, h, lq, e), dtype, gen), randn((b, hk, lk, e), dtype, gen), randn((b, hk, lk, e), dtype, gen)


# ----------------------------------------------------------------------------- kernel paths

NATIVE = {  # name: (shape kwargs, sdpa kwargs builder, expected kernel)
    "plain": (dict(), lambda q, k: {}, "flash_attn_func"),
    "scale": (dict(), lambda q, k: dict(scale=0.2), "flash_attn_func"),
    "gqa": (dict(hk=2), lambda q, k: dict(enable_gqa=True, is_causal=True), "flash_attn_func"),
    "causal_square": (dict(), lambda q, k: dict(is_causal=True), "flash_attn_func"),
    "causal_lq_lt_lk": (dict(lq=5, lk=9), lambda q, k: dict(is_causal=True), "flash_attn_func"),
    "causal_lq_gt_lk": (dict(lq=9, lk=5), lambda q, k: dict(is_causal=True), "flash_attn_func"),
    "mask_all_true": (dict(), lambda q, k: dict(attn_mask=torch.ones(7, 7, dtype=torch.bool)), "flash_attn_func"),
    "mask_causal_top_left": (dict(lq=9, lk=5), lambda q, k: dict(attn_mask=torch.ones(9, 5, dtype=torch.bool).tril()),
                             "flash_attn_func"),
    "mask_causal_bottom_right": (dict(lq=5, lk=9),
                                 lambda q, k: dict(attn_mask=torch.ones(5, 9, dtype=torch.bool).tril(4)),
                                 "flash_attn_func"),
    "mask_key_padding_bool": (dict(lk=9), lambda q, k: dict(attn_mask=_keep(q.shape[0], 9)[:, None, None]),
                              "flash_attn_varlen_func"),
    "mask_key_padding_additive": (dict(lk=9), lambda q, k: dict(attn_mask=_additive(_keep(q.shape[0], 9), q.dtype)),
                                  "flash_attn_varlen_func"),
    "mask_key_padding_per_head_copies": (dict(hk=2, lk=9), lambda q, k: dict(
        enable_gqa=True, attn_mask=_keep(q.shape[0], 9)[:, None, None].expand(-1, 4, 7, -1)), "flash_attn_varlen_func"),
}


def _keep(b, lk):
    keep = torch.ones(b, lk, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    keep[-1, 6:] = False  # right padding
    return keep


def _additive(keep, dtype):
    bias = torch.zeros(keep.shape[0], 1, 1, keep.shape[1], dtype=dtype)
    bias[..., :1] = bias[..., :1].masked_fill(~keep[:, None, None, :1], float("-inf"))
    return bias.masked_fill(~keep[:, None, None], torch.finfo(dtype).min)  # transformers' style, and -inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", NATIVE, ids=str)
def test_native_paths_match_torch(gen, kernel_calls, dtype, case):
    shape, make_kw, kernel = NATIVE[case]
    q, k, v = qkv(gen, dtype, **shape)
    kw = make_kw(q, k)
    out, warned = run(q, k, v, **kw)
    assert warned == [] and kernel_calls == [kernel]
    check_against_torch(out, (q, k, v), kw)


def test_three_dimensional_inputs(gen, kernel_calls):
    q, k, v = (randn((3, 6, 16), torch.float32, gen) for _ in range(3))
    out, warned = run(q, k, v, is_causal=True)
    assert warned == [] and kernel_calls == ["flash_attn_func"]
    check_against_torch(out, (q, k, v), dict(is_causal=True))


@pytest.mark.parametrize("case", ["causal_lq_gt_lk", "mask_key_padding_bool", "gqa"])
def test_gradients_match_torch(gen, case):
    shape, make_kw, _ = NATIVE[case]
    q, k, v = qkv(gen, torch.float32, **shape)
    kw = make_kw(q, k)
    dout = randn(q.shape, torch.float32, gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = torch.autograd.grad(fastinfer.scaled_dot_product_attention(*leaves, **kw), leaves, dout)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    kw64 = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    ref = torch.autograd.grad(TORCH_SDPA(*leaves64, **kw64), leaves64, dout.double())
    for name, a, r in zip("qkv", mine, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=2e-5, msg=f"d{name}")


# ----------------------------------------------------------------------------- fallbacks


def test_arbitrary_mask_falls_back_with_one_warning(gen, kernel_calls):
    q, k, v = qkv(gen, torch.float32)
    bias = randn((7, 7), torch.float32, gen)
    band = torch.ones(7, 7, dtype=torch.bool).triu(-2).tril(2) | torch.eye(7, dtype=torch.bool)
    out, warned = run(q, k, v, attn_mask=bias)
    assert len(warned) == 1 and "bias" in str(warned[0].message) and "torch's SDPA" in str(warned[0].message)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, bias))
    out, again = run(q, k, v, attn_mask=bias)  # same reason: silent now
    assert again == []
    out, other = run(q, k, v, attn_mask=band)  # a different reason warns once too
    assert len(other) == 1 and "neither causal nor a key-padding" in str(other[0].message)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, band))
    assert kernel_calls == []


@pytest.mark.parametrize("case", ["dropout", "float64", "head_dim", "value_dim", "empty_row", "per_head_mask"])
def test_unsupported_calls_fall_back(gen, kernel_calls, case):
    q, k, v = qkv(gen, torch.float32)
    kw = {}
    if case == "dropout":
        kw = dict(dropout_p=0.5)
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "head_dim":
        q, k, v = (randn((1, 2, 5, 12), torch.float32, gen) for _ in range(3))
    elif case == "value_dim":
        v = randn((2, 4, 7, 16), torch.float32, gen)
    elif case == "empty_row":
        mask = torch.ones(7, 7, dtype=torch.bool)
        mask[3] = False
        kw = dict(attn_mask=mask)
    else:
        kw = dict(attn_mask=torch.rand(1, 4, 1, 7) > 0.3)
    out, warned = run(q, k, v, **kw)
    assert len(warned) == 1 and kernel_calls == []
    if case != "dropout":
        torch.testing.assert_close(out, TORCH_SDPA(q, k, v, **kw), equal_nan=True)
    assert run(q, k, v, **kw)[1] == []


# ----------------------------------------------------------------------------- sdpa_override


def test_override_routes_and_restores(gen, kernel_calls):
    original = F.scaled_dot_product_attention
    q, k, v = qkv(gen, torch.float32)
    with fastinfer.sdpa_override():
        assert F.scaled_dot_product_attention is fastinfer.scaled_dot_product_attention
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with fastinfer.sdpa_override():  # nested
            F.scaled_dot_product_attention(q, k, v)
        assert F.scaled_dot_product_attention is fastinfer.scaled_dot_product_attention
        # a fallback inside the override reaches torch's kernel, not ourselves again
        out, warned = run(q, k, v, attn_mask=randn((7, 7), torch.float32, gen))
        assert len(warned) == 1
    assert F.scaled_dot_product_attention is original
    assert kernel_calls == ["flash_attn_func", "flash_attn_func"]


def test_override_restores_when_the_body_raises():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError):
        with fastinfer.sdpa_override():
            with fastinfer.sdpa_override():
                raise KeyError("inner")
    assert F.scaled_dot_product_attention is original
    with pytest.raises(ValueError):
        with fastinfer.sdpa_override():
            try:
                with fastinfer.sdpa_override():
                    raise KeyError("inner")
            except KeyError:
                assert F.scaled_dot_product_attention is fastinfer.scaled_dot_product_attention
            raise ValueError("outer")
    assert F.scaled_dot_product_attention is original


def test_override_under_compile(gen):
    """Module code calling F.scaled_dot_product_attention compiles without graph breaks inside the override."""
    torch._dynamo.reset()
    q, k, v = qkv(gen, torch.float32, hk=2)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q * 1.5, k, v, is_causal=True, enable_gqa=True)

    with fastinfer.sdpa_override():
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, TORCH_SDPA(q * 1.5, k, v, is_causal=True, enable_gqa=True), rtol=1e-5, atol=1e-5)
