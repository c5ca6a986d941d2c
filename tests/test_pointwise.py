"""ops.rms_norm / ops.act_and_mul / ops.rotary_embedding_: the CPU pointwise ops of a decoder layer.

Every result is checked twice, at every SIMD level (conftest.cpu_isa) and for float32 and bfloat16:

* against the torch expression the kernel replaces, run in the input dtype (``F.rms_norm``,
  ``F.silu(gate) * up``, ``F.gelu(gate, approximate="tanh") * up``, ``layers.apply_rotary``): bfloat16
  within 1 bf16 ulp elementwise and identical in at least 99% of the elements of a test; float32 within
  2e-6 relative (plus float32 noise of the terms, see `check_vs_torch`);
* against a float64 reference: the largest error at most twice that of the torch expression plus a tiny
  floor (reference.assert_close).

Outputs are poisoned with NaN (an element the kernel never writes fails), in-place operands live in
NaN-padded buffers (an element written outside the operand shows up), inputs are fresh random values
per test (conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastinfer
from fastinfer import _C
from fastinfer.kernels import ops
from fastinfer.models.layers import apply_rotary
from conftest import DTYPE_IDS
from reference import assert_close, check_rejected, randn

POINTWISE_DTYPES = (torch.float32, torch.bfloat16)
pw_dtypes = pytest.mark.parametrize("dtype", POINTWISE_DTYPES, ids=lambda d: DTYPE_IDS[d])
ACTS = ("silu", "gelu_tanh")

DIMS = (1, 15, 16, 40, 576, 1000)  # below, at and around the 16-lane vector, with and without a tail
ROWS = (0, 1, 7, 300)  # 300 x 576 and 300 x 1000 exceed the 2^16-element inline limit: the thread pool
HEAD_DIMS = (2, 40, 64, 128)  # half = 1 (tail only), 20 (vector + tail), 32, 64
EPS = 1e-6

RTOL32 = 2e-6  # float32 vs torch, relative
ATOL = 2.0 ** -126  # vs torch, absolute: the smallest normal float (denormal results may be flushed to 0)
U32 = 2.0 ** -24
FP32_FLOOR = 4 * U32  # times the scale of the terms (float64 check, float32)
BF16_FLOOR = 1e-6  # absolute (float64 check, bfloat16): only matters when torch's error is zero by chance
MIN_IDENTICAL = 0.99  # bfloat16: fraction of elements bit-identical to torch's


# ----------------------------------------------------------------------------- helpers


def _poisoned_empty(like, shape):
    # Only floating dtypes hold NaN; anything else is a bad input the kernels will reject.
    if isinstance(like, torch.Tensor):
        if not like.dtype.is_floating_point:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    if not np.issubdtype(like.dtype, np.floating):
        return np.empty(shape, dtype=like.dtype)
    return np.full(shape, np.nan, dtype=like.dtype)


@pytest.fixture(autouse=True)
def _poison_pointwise_outputs(monkeypatch):
    """ops allocates out with an uninitialised empty: make it NaN, so an unwritten element shows up."""
    monkeypatch.setattr(ops, "_empty", _poisoned_empty)


@pytest.fixture(autouse=True)
def _torch_one_thread():
    """The torch references run single-threaded: small elementwise ops gain nothing from torch's
    intra-op threads, and on a loaded machine their barriers cost seconds per test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def set_threads(n: int) -> None:
    fastinfer.set_num_threads(n)
    assert fastinfer.get_num_threads() == n


def strided_rows(x: torch.Tensor, left: int = 3, right: int = 5) -> torch.Tensor:
    """x's values as a column slice of a wider NaN-filled buffer (row stride > width, unaligned start,
    NaN right before and after every row: a kernel reading outside the row turns it into NaN)."""
    m, k = x.shape
    buf = torch.full((m, left + k + right), float("nan"), dtype=x.dtype)
    view = buf[:, left:left + k]
    view.copy_(x)
    return view


def ordered_bf16(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 values as integers whose difference is the distance in ulps (-0 == +0)."""
    i = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


class Identical:
    """Counts bf16 elements bit-identical to torch's over all the checks of one test."""

    def __init__(self):
        self.same = self.total = 0

    def add(self, same: int, total: int):
        self.same += same
        self.total += total

    def check(self, what=""):
        if self.total:
            frac = self.same / self.total
            assert frac >= MIN_IDENTICAL, (f"{what}: only {self.same} of {self.total} bf16 elements ({frac:.2%}) "
                                           f"identical to torch's (>= {MIN_IDENTICAL:.0%} expected)")


def check_vs_torch(out, lowp, *, scale=None, stats: Identical | None = None, what="out"):
    """out against the torch expression in the input dtype, elementwise.

    float32: |out - lowp| <= RTOL32 * (|lowp| + scale) + ATOL. bfloat16: at most 1 ulp apart, or
    within RTOL32 * scale + ATOL. `scale` (elementwise, default 0) is the magnitude of the float32 terms the result
    is computed from, where these cancel (x1 c - x2 s; 0.5 g (1 + tanh) for a negative gate): there the
    result's own magnitude says nothing of the float32 noise both implementations carry.
    NaN must match NaN."""
    out_t = torch.as_tensor(out)
    assert out_t.shape == lowp.shape, f"{what}: shape {tuple(out_t.shape)} != {tuple(lowp.shape)}"
    assert out_t.dtype == lowp.dtype, f"{what}: dtype {out_t.dtype} != {lowp.dtype}"
    if out_t.numel() == 0:
        return
    o, t = out_t.double(), lowp.double()
    nan_o, nan_t = torch.isnan(o), torch.isnan(t)
    assert torch.equal(nan_o, nan_t), (f"{what}: NaN at {nan_o.nonzero()[:4].tolist()} (torch: "
                                       f"{nan_t.nonzero()[:4].tolist()})")
    ok_nan = ~nan_t
    s = torch.zeros_like(t) if scale is None else torch.as_tensor(scale).double().expand_as(t)
    noise = RTOL32 * s + ATOL
    diff = torch.where(ok_nan, (o - t).abs(), torch.zeros_like(o))
    diff = torch.where(o == t, torch.zeros_like(diff), diff)  # equal infinities
    if out_t.dtype == torch.float32:
        bad = diff > RTOL32 * t.abs().nan_to_num(posinf=0, neginf=0) + noise
    else:
        ulps = (ordered_bf16(out_t).long() - ordered_bf16(lowp).long()).abs()
        bad = ok_nan & (ulps > 1) & (diff > noise)
        if stats is not None:
            same = (ulps == 0) | nan_t
            stats.add(int(same.sum()), same.numel())
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ from torch's, first at {list(idx)}: "
                             f"{o[idx].item()!r} vs torch {t[idx].item()!r}")


def check_vs_f64(out, ref64, lowp, *, scale: float, what="out"):
    """max|out - ref64| <= 2 * max|lowp - ref64| + floor (FP32_FLOOR * scale, or BF16_FLOOR), over the
    elements where ref64 is not NaN."""
    if ref64.numel() == 0:
        return
    floor = FP32_FLOOR * scale if lowp.dtype == torch.float32 else BF16_FLOOR
    nan = torch.isnan(ref64)  # NaN inputs: check_vs_torch has matched the NaN positions already
    if nan.any():
        out, ref64, lowp = torch.as_tensor(out)[~nan], ref64[~nan], lowp[~nan]
    assert_close(out, ref64, lowp, floor=floor, what=what)


def max_abs(t: torch.Tensor) -> float:
    """Largest finite |t| (NaN inputs of the NaN tests left out), 0 if none."""
    fin = t[torch.isfinite(t)]
    return fin.abs().max().item() if fin.numel() else 0.0


# ---- the three ops and their references

def weight_for(dim: int, dtype: torch.dtype, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 weight for the kernel, the same values in x's dtype for torch): bf16-representable for bf16."""
    w = (1.0 + 0.5 * torch.randn(dim, generator=gen)).to(dtype)
    return w.float(), w


def check_rms_norm(out, h, w32, w_lowp, eps, stats, what):
    """out = rms_norm(h) (h: the rows normalised, i.e. the rounded sum when there is a residual)."""
    dim = h.shape[-1]
    lowp = F.rms_norm(h, (dim,), w_lowp, eps)
    ref64 = F.rms_norm(h.double(), (dim,), w32.double(), eps)
    check_vs_torch(out, lowp, stats=stats, what=what)
    check_vs_f64(out, ref64, lowp, scale=max_abs(ref64), what=what)


def act_torch(gate, up, act):
    a = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return a * up


def check_act(out, x, act, stats, what):
    d = x.shape[-1] // 2
    gate, up = x[:, :d], x[:, d:]
    lowp = act_torch(gate, up, act)
    ref64 = act_torch(gate.double(), up.double(), act)
    scale = (gate.double() * up.double()).abs()
    check_vs_torch(out, lowp, scale=scale, stats=stats, what=what)
    check_vs_f64(out, ref64, lowp, scale=max_abs(scale), what=what)


def rope_tables(rows: int, head_dim: int, dtype: torch.dtype, base: float = 10000.0):
    """Hugging Face's cos/sin tables (half the head dim), computed in float32, cast to dtype."""
    half = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(half, dtype=torch.float32) * 2 / head_dim)
    ang = torch.arange(rows, dtype=torch.float32)[:, None] * inv_freq[None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def check_rotary(out, x_before, cos, sin, pos, stats, what):
    c, s = cos[pos, None], sin[pos, None]
    lowp = apply_rotary(x_before, c, s)
    x1, x2 = x_before.double().chunk(2, dim=-1)
    cd, sd = c.double(), s.double()
    ref64 = torch.cat((x1 * cd - x2 * sd, x2 * cd + x1 * sd), dim=-1)
    terms = torch.cat(((x1 * cd).abs() + (x2 * sd).abs(), (x2 * cd).abs() + (x1 * sd).abs()), dim=-1)
    check_vs_torch(out, lowp, scale=terms, stats=stats, what=what)
    check_vs_f64(out, ref64, lowp, scale=max_abs(terms), what=what)


def rotary_views(layout: str, tokens: int, heads: int, hd: int, dtype):
    """(x, buf, mask): x a (tokens, heads, hd) view into the NaN-filled buf, mask True on x's elements."""
    if layout == "contiguous":
        buf = torch.full((tokens, heads, hd), float("nan"), dtype=dtype)
        x = buf
        mask = torch.ones(buf.shape, dtype=torch.bool)
    elif layout == "fused_qkv":  # k of a fused (q | k | v) projection, 2 q heads per kv head
        buf = torch.full((tokens, (2 * heads + heads + heads) * hd), float("nan"), dtype=dtype)
        lo, hi = 2 * heads * hd, 3 * heads * hd
        x = buf[:, lo:hi].view(tokens, heads, hd)
        mask = torch.zeros(buf.shape, dtype=torch.bool)
        mask[:, lo:hi] = True
    elif layout == "padded_heads":  # head stride hd + 6, unaligned start
        buf = torch.full((tokens, heads, hd + 6), float("nan"), dtype=dtype)
        x = buf[:, :, 3:3 + hd]
        mask = torch.zeros(buf.shape, dtype=torch.bool)
        mask[:, :, 3:3 + hd] = True
    elif layout == "head_major":  # (heads, tokens, hd) storage: token stride hd, head stride tokens * hd
        buf = torch.full((heads, tokens, hd), float("nan"), dtype=dtype)
        x = buf.transpose(0, 1)
        mask = torch.ones(buf.shape, dtype=torch.bool)
    else:
        raise AssertionError(layout)
    assert x.shape == (tokens, heads, hd) and (x.numel() == 0 or x.stride(-1) == 1)
    return x, buf, mask


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal (-0 and +0 differ), except that any NaN equals any NaN (payloads may differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    ia = a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.contiguous().view(torch.int16 if b.element_size() == 2 else torch.int32)
    return torch.equal(ia[~na], ib[~nb])


# ----------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pw_dtypes
def test_rms_norm(cpu_isa, gen, dtype, residual):
    stats = Identical()
    for dim in DIMS:
        w32, w_lowp = weight_for(dim, dtype, gen)
        for rows in ROWS:
            for layout in ("contiguous", "strided"):
                x = randn((rows, dim), dtype, gen, scale=2.0)
                if layout == "strided":
                    x = strided_rows(x)
                x_before = x.clone()
                what = f"rms_norm (rows={rows}, dim={dim}, {layout})"
                if residual:
                    res = randn((rows, dim), dtype, gen)
                    if layout == "strided":
                        res = strided_rows(res, left=1, right=2)
                    h = x + res  # torch's add: rounded once to dtype
                    out = ops.rms_norm(x, w32, EPS, res)
                    assert same_bits(res, h), f"{what}: residual must become round(x + residual) in place"
                else:
                    h = x
                    out = ops.rms_norm(x, w32, EPS)
                assert same_bits(x, x_before), f"{what}: x was modified"
                assert out.shape == (rows, dim) and out.dtype == dtype and out.is_contiguous()
                check_rms_norm(out, h, w32, w_lowp, EPS, stats, what)
    stats.check("rms_norm")


@pw_dtypes
def test_rms_norm_residual_semantics(cpu_isa, gen, dtype):
    # The residual's new value is the rounded sum, written in place into a strided view (the rest of
    # its buffer untouched); out is the norm of that rounded sum, not of the exact sum.
    rows, dim = 9, 40
    w32, w_lowp = weight_for(dim, dtype, gen)
    x = randn((rows, dim), dtype, gen)
    res_vals = randn((rows, dim), dtype, gen, scale=30.0)  # big residual: x + res loses bits of x
    buf = torch.full((rows + 2, dim + 7), float("nan"), dtype=dtype)
    res = buf[1:1 + rows, 4:4 + dim]
    res.copy_(res_vals)
    buf_before = buf.clone()
    out = ops.rms_norm(x, w32, EPS, residual=res)
    want = (x.float() + res_vals.float()).to(dtype)
    assert same_bits(res, want)
    outside = torch.ones(buf.shape, dtype=torch.bool)
    outside[1:1 + rows, 4:4 + dim] = False
    assert same_bits(buf[outside], buf_before[outside]), "residual: wrote outside the view"
    stats = Identical()
    check_rms_norm(out, want, w32, w_lowp, EPS, stats, "out")
    # normalising the rounded sum again from scratch gives the same bits (no hidden extra precision)
    assert same_bits(ops.rms_norm(want, w32, EPS), out)
    # x = 0 and residual = r: out = rms_norm(r), residual unchanged
    r2 = res_vals.clone()
    out2 = ops.rms_norm(torch.zeros_like(x), w32, EPS, r2)
    assert same_bits(r2, res_vals)
    assert same_bits(out2, ops.rms_norm(res_vals, w32, EPS))
    stats.check()


@pw_dtypes
def test_rms_norm_eps_and_zero_rows(cpu_isa, gen, dtype):
    dim = 40
    w32, w_lowp = weight_for(dim, dtype, gen)
    x = randn((4, dim), dtype, gen, scale=1e-3)
    x[2] = 0
    stats = Identical()
    for eps in (0.0, 1e-6, 1e-2, 1.0):
        if eps == 0.0:
            x_in = x[[0, 1, 3]]  # 0 / sqrt(0) is NaN for torch too; leave the zero row out
        else:
            x_in = x
        out = ops.rms_norm(x_in, w32, eps)
        check_rms_norm(out, x_in, w32, w_lowp, eps, stats, f"eps={eps}")
        if eps > 0:
            assert (out[2] == 0).all(), "a zero row normalises to zero"
    stats.check()


# ----------------------------------------------------------------------------- act_and_mul


@pytest.mark.parametrize("act", ACTS)
@pw_dtypes
def test_act_and_mul(cpu_isa, gen, dtype, act):
    stats = Identical()
    for dim in DIMS:
        for rows in ROWS:
            for layout in ("contiguous", "strided"):
                # scale 1.5: gelu_tanh's 1 + tanh cancels for gates below about -4, where torch's float32
                # result and the kernel's both carry relative noise above a bf16 ulp (accepted through
                # check_vs_torch's `scale`); at 1.5, 99.8% of bf16 elements match torch bit for bit
                # (99.2% at 2.0). Far larger gates: test_act_large_gate.
                x = randn((rows, 2 * dim), dtype, gen, scale=1.5)
                if layout == "strided":
                    x = strided_rows(x)
                x_before = x.clone()
                out = ops.act_and_mul(x, act)
                what = f"{act} (rows={rows}, dim={dim}, {layout})"
                assert same_bits(x, x_before), f"{what}: x was modified"
                assert out.shape == (rows, dim) and out.dtype == dtype
                check_act(out, x, act, stats, what)
    stats.check(act)


@pytest.mark.parametrize("act", ACTS)
@pw_dtypes
def test_act_and_mul_strided_out(cpu_isa, gen, dtype, act):
    # _C.act_and_mul into a window of a NaN buffer: exactly out's elements are written.
    rows, dim = 7, 40
    x = strided_rows(randn((rows, 2 * dim), dtype, gen))
    buf = torch.full((rows + 3, dim + 9), float("nan"), dtype=dtype)
    out = buf[2:2 + rows, 5:5 + dim]
    _C.act_and_mul(x, out, act)
    stats = Identical()
    check_act(out, x, act, stats, "out")
    written = torch.zeros(buf.shape, dtype=torch.bool)
    written[2:2 + rows, 5:5 + dim] = True
    assert torch.isnan(buf[~written]).all(), "wrote outside out"
    stats.check()


# ----------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "padded_heads", "head_major"])
@pw_dtypes
def test_rotary(cpu_isa, gen, dtype, layout):
    stats = Identical()
    heads, table_rows = 3, 64
    for hd in HEAD_DIMS:
        cos, sin = rope_tables(table_rows, hd, dtype)
        for tokens in ROWS:
            x, buf, mask = rotary_views(layout, tokens, heads, hd, dtype)
            x.copy_(randn((tokens, heads, hd), dtype, gen, scale=2.0))
            x_before = x.clone()
            buf_before = buf.clone()
            pos = torch.randint(table_rows, (tokens,), generator=gen, dtype=torch.int64)
            if tokens:
                pos[-1] = table_rows - 1  # the table's last row
            cos_before, sin_before, pos_before = cos.clone(), sin.clone(), pos.clone()
            ret = ops.rotary_embedding_(x, cos, sin, pos)
            what = f"rotary (tokens={tokens}, head_dim={hd}, {layout})"
            assert ret is x, f"{what}: returns x"
            assert same_bits(buf[~mask], buf_before[~mask]), f"{what}: wrote outside x"
            assert same_bits(cos, cos_before) and same_bits(sin, sin_before) and torch.equal(pos, pos_before)
            check_rotary(x, x_before, cos, sin, pos, stats, what)
    stats.check("rotary")


@pw_dtypes
def test_rotary_random_tables(cpu_isa, gen, dtype):
    # Arbitrary cos/sin values (not a rotation: |c|, |s| up to ~3), q and k of a fused qkv in turn.
    tokens, hq, hk, hd, table_rows = 37, 4, 2, 40, 11
    cos, sin = randn((table_rows, hd // 2), dtype, gen), randn((table_rows, hd // 2), dtype, gen)
    qkv = randn((tokens, (hq + 2 * hk) * hd), dtype, gen)
    before = qkv.clone()
    q = qkv[:, :hq * hd].view(tokens, hq, hd)
    k = qkv[:, hq * hd:(hq + hk) * hd].view(tokens, hk, hd)
    pos = torch.randint(table_rows, (tokens,), generator=gen, dtype=torch.int64)
    stats = Identical()
    ops.rotary_embedding_(q, cos, sin, pos)
    ops.rotary_embedding_(k, cos, sin, pos)
    check_rotary(q, before[:, :hq * hd].view(tokens, hq, hd), cos, sin, pos, stats, "q")
    check_rotary(k, before[:, hq * hd:(hq + hk) * hd].view(tokens, hk, hd), cos, sin, pos, stats, "k")
    assert same_bits(qkv[:, (hq + hk) * hd:], before[:, (hq + hk) * hd:]), "v was modified"
    stats.check()


def test_rotary_position_zero_is_identity(cpu_isa, gen):
    # cos = 1, sin = 0 at position 0: x comes back bit for bit.
    for dtype in POINTWISE_DTYPES:
        cos, sin = rope_tables(4, 64, dtype)
        x = randn((5, 2, 64), dtype, gen)
        want = x.clone()
        ops.rotary_embedding_(x, cos, sin, torch.zeros(5, dtype=torch.int64))
        assert torch.equal(x, want)


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize("threads", [1, 2])
@pw_dtypes
def test_threaded(cpu_isa, gen, dtype, threads):
    # 300 rows of 576 (and 300 tokens x 4 heads x 128): past the inline limit, so the thread pool
    # splits the rows; same results as torch and, bit for bit, as a single-threaded call.
    set_threads(threads)
    stats = Identical()
    rows, dim = 300, 576
    w32, w_lowp = weight_for(dim, dtype, gen)
    x = strided_rows(randn((rows, dim), dtype, gen))
    res = randn((rows, dim), dtype, gen)
    res0 = res.clone()
    out = ops.rms_norm(x, w32, EPS)
    check_rms_norm(out, x, w32, w_lowp, EPS, stats, "rms_norm")
    out_r = ops.rms_norm(x, w32, EPS, res)
    assert same_bits(res, x + res0)
    check_rms_norm(out_r, res, w32, w_lowp, EPS, stats, "rms_norm residual")

    xa = randn((rows, 2 * dim), dtype, gen)
    outs = {act: ops.act_and_mul(xa, act) for act in ACTS}
    for act in ACTS:
        check_act(outs[act], xa, act, stats, act)

    cos, sin = rope_tables(512, 128, dtype)
    pos = torch.randint(512, (rows,), generator=gen, dtype=torch.int64)
    xr, buf, mask = rotary_views("fused_qkv", rows, 4, 128, dtype)
    xr.copy_(randn((rows, 4, 128), dtype, gen))
    xr_before, buf_before = xr.clone(), buf.clone()
    ops.rotary_embedding_(xr, cos, sin, pos)
    assert same_bits(buf[~mask], buf_before[~mask])
    check_rotary(xr, xr_before, cos, sin, pos, stats, "rotary")
    stats.check()

    if threads != 1:  # the split does not change a single bit
        set_threads(1)
        assert same_bits(ops.rms_norm(x, w32, EPS), out)
        res1 = res0.clone()
        assert same_bits(ops.rms_norm(x, w32, EPS, res1), out_r) and same_bits(res1, res)
        for act in ACTS:
            assert same_bits(ops.act_and_mul(xa, act), outs[act])
        x1 = xr_before.clone()
        assert same_bits(ops.rotary_embedding_(x1, cos, sin, pos), xr)


# ----------------------------------------------------------------------------- empty


@pw_dtypes
def test_empty(cpu_isa, gen, dtype):
    # no rows, or rows of width 0: empty results, nothing touched
    w32, _ = weight_for(40, dtype, gen)
    assert ops.rms_norm(randn((0, 40), dtype, gen), w32, EPS).shape == (0, 40)
    res = torch.zeros((0, 40), dtype=dtype)
    assert ops.rms_norm(randn((0, 40), dtype, gen), w32, EPS, res).shape == (0, 40)
    assert ops.rms_norm(torch.zeros((3, 0), dtype=dtype), torch.zeros(0), EPS).shape == (3, 0)
    assert ops.act_and_mul(torch.zeros((3, 0), dtype=dtype)).shape == (3, 0)
    assert ops.act_and_mul(torch.zeros((0, 80), dtype=dtype), "gelu_tanh").shape == (0, 40)
    cos, sin = rope_tables(4, 64, dtype)
    x = torch.zeros((0, 2, 64), dtype=dtype)
    assert ops.rotary_embedding_(x, cos, sin, torch.zeros(0, dtype=torch.int64)) is x
    x = torch.zeros((3, 0, 64), dtype=dtype)
    ops.rotary_embedding_(x, cos, sin, torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- special values

NAN = float("nan")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pw_dtypes
def test_rms_norm_nan_stays_in_its_row(cpu_isa, gen, dtype, residual):
    rows, dim = 7, 40
    w32, w_lowp = weight_for(dim, dtype, gen)
    stats = Identical()
    for row, col in [(0, 3), (3, 37), (6, 20)]:  # in the 16-lane body and in the tail
        x = randn((rows, dim), dtype, gen)
        res = randn((rows, dim), dtype, gen) if residual else None
        (res if residual else x)[row, col] = NAN
        h = x + res if residual else x
        out = ops.rms_norm(x, w32, EPS, res)
        assert torch.isnan(out[row]).all(), f"NaN at ({row}, {col}): out row {row} should be all NaN"
        keep = torch.arange(rows) != row
        if residual:
            assert same_bits(res, h), "residual: the NaN stays where it was, the rest is the rounded sum"
        check_rms_norm(out[keep], h[keep], w32, w_lowp, EPS, stats, f"rows other than {row}")
    stats.check()


@pytest.mark.parametrize("act", ACTS)
@pw_dtypes
def test_act_and_mul_nan_stays_in_its_element(cpu_isa, gen, dtype, act):
    rows, dim = 5, 40
    stats = Identical()
    for row, col, part in [(0, 3, "gate"), (2, 37, "gate"), (4, 20, "up"), (1, 39, "up")]:
        x = randn((rows, 2 * dim), dtype, gen)
        x[row, col + (dim if part == "up" else 0)] = NAN
        out = ops.act_and_mul(x, act)
        nan = torch.isnan(out)
        assert nan.sum() == 1 and nan[row, col], f"NaN in {part} ({row}, {col}): NaN at {nan.nonzero().tolist()}"
        check_act(out, x, act, stats, f"NaN in {part}")  # NaN positions must match torch's too
    stats.check()


@pw_dtypes
def test_rotary_nan_stays_in_its_pair(cpu_isa, gen, dtype):
    tokens, heads, hd = 4, 3, 40
    cos, sin = rope_tables(16, hd, dtype)
    for t, h, d in [(0, 0, 3), (2, 1, 19), (3, 2, 25)]:  # x1 body, x1 tail, x2
        x = randn((tokens, heads, hd), dtype, gen)
        x[t, h, d] = NAN
        before = x.clone()
        pos = torch.randint(16, (tokens,), generator=gen, dtype=torch.int64)
        ops.rotary_embedding_(x, cos, sin, pos)
        nan = torch.isnan(x)
        j = d % (hd // 2)
        want = torch.zeros_like(nan)
        want[t, h, j] = want[t, h, j + hd // 2] = True
        assert torch.equal(nan, want), f"NaN at ({t}, {h}, {d}): NaN at {nan.nonzero().tolist()}"
        stats = Identical()
        check_rotary(x, before, cos, sin, pos, stats, "rotary")


# Gates at and past float32 exp's overflow (|g| log2(e) > 128 from g = -88.7) and far beyond.
LARGE_GATES = (100.0, -100.0, 88.0, -88.0, 89.0, -89.0, -89.5, -90.0, -104.0, -150.0, -200.0, -1000.0, -1e5,
               -3e38, 1000.0, 3e38, 20.0, -20.0)


@pytest.mark.parametrize("where", ["body", "tail"])
@pytest.mark.parametrize("act", ACTS)
@pw_dtypes
def test_act_large_gate(cpu_isa, gen, dtype, act, where, request):
    # body: rows of 32 gates (two 16-lane vectors); tail: rows of 15 (the scalar tail loop only)
    n, dim = len(LARGE_GATES), 32 if where == "body" else 15
    rows = -(-n // dim)
    flat = torch.zeros(rows * dim)
    flat[:n] = torch.tensor(LARGE_GATES)
    gate = flat.view(rows, dim).to(dtype)
    # |up| in [0.5, 1] (1 for the first few): gate * up stays finite for gates up to 3e38
    up = ((torch.rand(gate.shape, generator=gen) * 0.5 + 0.5) * torch.randn(gate.shape, generator=gen).sign()).to(dtype)
    up[0, :4] = 1.0
    out = ops.act_and_mul(torch.cat([gate, up], dim=1), act)
    for idx in torch.ones(gate.shape, dtype=torch.bool).nonzero().tolist():
        gv, u, o = gate[tuple(idx)].item(), up[tuple(idx)].item(), out[tuple(idx)].item()
        if gv <= -88.0:
            assert abs(o) <= 1e-30, f"{act}({gv}) * {u} = {o} at {idx}, expected (nearly) -0"
        elif gv >= 88.0:
            want = (gate[tuple(idx)] * up[tuple(idx)]).item()
            assert o == want, f"{act}({gv}) * {u} = {o} at {idx}, expected {want}"
    assert torch.isfinite(out).all(), f"non-finite results at gates {gate[~torch.isfinite(out)].tolist()}"
    check_vs_torch(out, act_torch(gate, up, act), scale=(gate.double() * up.double()).abs(),
                   what=f"{act} at large gates")
    # silu(-100) = -0 (or tiny), silu(100) = 100; gelu_tanh the same
    assert abs(out[0, 1].item()) <= 1e-30 and out[0, 0].item() == 100.0


# ----------------------------------------------------------------------------- bad inputs

R, D = 5, 40
TABLE = 16


@pytest.fixture
def t(gen):
    ns = types.SimpleNamespace()
    ns.x = randn((R, D), torch.float32, gen)
    ns.xb = randn((R, D), torch.bfloat16, gen)
    ns.w = randn((D,), torch.float32, gen)
    ns.res = randn((R, D), torch.float32, gen)
    ns.res_b = randn((R, D), torch.bfloat16, gen)
    ns.out = torch.full((R, D), NAN)  # poisoned kernel outputs: a rejected call leaves them NaN
    ns.out_b = torch.full((R, D), NAN, dtype=torch.bfloat16)
    ns.out_half = torch.full((R, D // 2), NAN)
    # x and out inside one buffer
    ns.shared = torch.full((R, 2 * D), NAN)
    ns.shared[:, :D] = ns.x
    # rotary
    ns.xr = randn((3, 2, 8), torch.float32, gen)
    ns.xr_b = randn((3, 2, 8), torch.bfloat16, gen)
    ns.xr_odd = randn((3, 2, 7), torch.float32, gen)
    ns.cos, ns.sin = rope_tables(TABLE, 8, torch.float32)
    ns.pos = torch.tensor([0, 5, TABLE - 1], dtype=torch.int64)
    ns.pos_neg = torch.tensor([0, -1, 2], dtype=torch.int64)
    ns.pos_big = torch.tensor([0, 2, TABLE], dtype=torch.int64)
    return ns






norm, actmul, rope = ops.rms_norm, ops.act_and_mul, ops.rotary_embedding_

# (id, call, exception, regex the message must match: it names the offending argument)
CASES = [
    # rms_norm
    ("norm_x_fp16", lambda t: norm(t.x.half(), t.w, EPS), TypeError, r"^x: .*float16"),
    ("norm_x_fp64", lambda t: norm(t.x.double(), t.w, EPS), TypeError, r"^x: .*float64"),
    ("norm_x_list", lambda t: norm(t.x.tolist(), t.w, EPS), TypeError, r"^x: expected a tensor or array"),
    ("norm_x_1d", lambda t: norm(t.x[0], t.w, EPS), ValueError, r"^x: expected 2 dimensions"),
    ("norm_x_last_stride", lambda t: norm(t.x.t().contiguous().t(), t.w, EPS), ValueError,
     r"^x: the last dimension must be contiguous"),
    ("norm_weight_bf16", lambda t: norm(t.xb, t.w.bfloat16(), EPS), TypeError,
     r"^weight: expected dtype float32, got bfloat16"),
    ("norm_weight_fp64", lambda t: norm(t.x, t.w.double(), EPS), TypeError, r"^weight: expected dtype float32"),
    ("norm_weight_short", lambda t: norm(t.x, t.w[:-1], EPS), ValueError, r"^weight: expected shape \(40,\)"),
    ("norm_weight_2d", lambda t: norm(t.x, t.w[None], EPS), ValueError, r"^weight: expected shape \(40,\)"),
    ("norm_weight_strided", lambda t: norm(t.x, t.w.repeat(2)[::2], EPS), ValueError, r"^weight: must be contiguous"),
    ("norm_weight_none", lambda t: norm(t.x, None, EPS), TypeError, r"^weight: expected a tensor or array"),
    ("norm_eps_negative", lambda t: norm(t.x, t.w, -1e-6, t.res), ValueError, r"^eps: must be >= 0"),
    ("norm_residual_shape", lambda t: norm(t.x, t.w, EPS, t.res[:, :-1]), ValueError,
     r"^residual: expected shape \(5, 40\)"),
    ("norm_residual_rows", lambda t: norm(t.x, t.w, EPS, t.res[:-1]), ValueError, r"^residual: expected shape"),
    ("norm_residual_bf16", lambda t: norm(t.x, t.w, EPS, t.res_b), TypeError,
     r"^residual: expected dtype float32 \(same as x\), got bfloat16"),
    ("norm_residual_fp32_x_bf16", lambda t: norm(t.xb, t.w, EPS, t.res), TypeError,
     r"^residual: expected dtype bfloat16 \(same as x\), got float32"),
    ("norm_residual_last_stride", lambda t: norm(t.x, t.w, EPS, t.res.t().contiguous().t()), ValueError,
     r"^residual: the last dimension must be contiguous"),
    ("norm_residual_is_x", lambda t: norm(t.res, t.w, EPS, t.res), ValueError, r"^residual: must not overlap x"),
    ("norm_residual_overlaps_x", lambda t: norm(t.shared[:, :D], t.w, EPS, t.shared[:, D // 2:D // 2 + D]),
     ValueError, r"^residual: must not overlap x"),
    # _C.rms_norm with a poisoned out
    ("C_norm_out_dtype", lambda t: _C.rms_norm(t.x, t.w, EPS, t.out_b, None), TypeError,
     r"^out: expected dtype float32 \(same as x\)"),
    ("C_norm_out_shape", lambda t: _C.rms_norm(t.x, t.w, EPS, t.out_half, None), ValueError, r"^out: expected shape"),
    ("C_norm_out_overlaps_x", lambda t: _C.rms_norm(t.shared[:, :D], t.w, EPS, t.shared[:, 1:1 + D], None),
     ValueError, r"^out: must not overlap x"),
    ("C_norm_out_overlaps_residual", lambda t: _C.rms_norm(t.x, t.w, EPS, t.shared[:, D // 2:D // 2 + D],
                                                           t.shared[:, :D]),
     ValueError, r"^residual: must not overlap x or out"),
    ("C_norm_weight_shape", lambda t: _C.rms_norm(t.x, t.w[:-1], EPS, t.out, t.res), ValueError, r"^weight: expected"),
    ("C_norm_residual_dtype", lambda t: _C.rms_norm(t.x, t.w, EPS, t.out, t.res_b), TypeError, r"^residual: expected"),
    # act_and_mul
    ("act_x_fp16", lambda t: actmul(t.x.half()), TypeError, r"^x: .*float16"),
    ("act_x_int", lambda t: actmul(t.x.int()), TypeError, r"^x: .*int32"),
    ("act_x_list", lambda t: actmul(t.x.tolist()), TypeError, r"^x: expected a tensor or array"),
    ("act_x_odd", lambda t: actmul(t.x[:, :D - 1]), ValueError, r"^x: the last dimension holds gate then up"),
    ("act_x_1d", lambda t: actmul(t.x[0]), ValueError, r"^x: expected 2 dimensions"),
    ("act_x_3d", lambda t: actmul(t.x[None]), ValueError, r"^x: expected 2 dimensions"),
    ("act_x_last_stride", lambda t: actmul(t.x.t().contiguous().t()), ValueError,
     r"^x: the last dimension must be contiguous"),
    ("act_unknown", lambda t: actmul(t.x, "gelu"), ValueError, r"^act: expected 'silu' or 'gelu_tanh', got 'gelu'"),
    ("act_unknown_case", lambda t: actmul(t.x, "SiLU"), ValueError, r"^act: .*'SiLU'"),
    ("act_not_str", lambda t: actmul(t.x, None), TypeError, r"^act: expected .silu. or .gelu_tanh., got NoneType"),
    ("C_act_out_dtype", lambda t: _C.act_and_mul(t.x, t.out_b[:, :D // 2], "silu"), TypeError,
     r"^out: expected dtype float32 \(same as x\)"),
    ("C_act_out_shape", lambda t: _C.act_and_mul(t.x, t.out, "silu"), ValueError, r"^out: expected shape \(5, 20\)"),
    ("C_act_out_odd_x", lambda t: _C.act_and_mul(t.x[:, :D - 1], t.out_half, "silu"), ValueError,
     r"^x: the last dimension holds gate then up"),
    ("C_act_unknown", lambda t: _C.act_and_mul(t.x, t.out_half, "relu"), ValueError, r"^act: expected"),
    ("C_act_out_overlaps_x", lambda t: _C.act_and_mul(t.shared[:, :D], t.shared[:, D - 5:D - 5 + D // 2], "silu"),
     ValueError, r"^out: must not overlap x"),
    # rotary_embedding_ (x must be unchanged afterwards: snapshot)
    ("rope_x_fp16", lambda t: rope(t.xr.half(), t.cos.half(), t.sin.half(), t.pos), TypeError, r"^x: .*float16"),
    ("rope_x_list", lambda t: rope(t.xr.tolist(), t.cos, t.sin, t.pos), TypeError, r"^x: expected a tensor or array"),
    ("rope_x_2d", lambda t: rope(t.xr[0], t.cos, t.sin, t.pos[:2]), ValueError, r"^x: expected 3 dimensions"),
    ("rope_x_last_stride", lambda t: rope(t.xr.transpose(1, 2), t.cos[:, :1], t.sin[:, :1], t.pos), ValueError,
     r"^x: the last dimension must be contiguous"),
    ("rope_head_dim_odd", lambda t: rope(t.xr_odd, t.cos[:, :3], t.sin[:, :3], t.pos), ValueError,
     r"^x: head_dim must be even"),
    ("rope_pos_negative", lambda t: rope(t.xr, t.cos, t.sin, t.pos_neg), ValueError,
     r"^positions\[1\] = -1 is outside the cos/sin tables \(16 rows\)"),
    ("rope_pos_too_big", lambda t: rope(t.xr, t.cos, t.sin, t.pos_big), ValueError,
     r"^positions\[2\] = 16 is outside the cos/sin tables \(16 rows\)"),
    ("rope_pos_int32", lambda t: rope(t.xr, t.cos, t.sin, t.pos.int()), TypeError,
     r"^positions: expected dtype int64, got int32"),
    ("rope_pos_float", lambda t: rope(t.xr, t.cos, t.sin, t.pos.float()), TypeError,
     r"^positions: expected dtype int64"),
    ("rope_pos_short", lambda t: rope(t.xr, t.cos, t.sin, t.pos[:2]), ValueError, r"^positions: expected shape \(3,\)"),
    ("rope_pos_2d", lambda t: rope(t.xr, t.cos, t.sin, t.pos[None]), ValueError, r"^positions: expected shape"),
    ("rope_pos_strided", lambda t: rope(t.xr, t.cos, t.sin, t.pos.repeat(2)[::2]), ValueError,
     r"^positions: must be contiguous"),
    ("rope_pos_list", lambda t: rope(t.xr, t.cos, t.sin, [0, 1, 2]), TypeError, r"^positions: expected a tensor"),
    ("rope_cos_columns", lambda t: rope(t.xr, t.cos[:, :3], t.sin, t.pos), ValueError,
     r"^cos: expected 4 columns \(head_dim // 2\), got shape \(16, 3\)"),
    ("rope_cos_full_head_dim", lambda t: rope(t.xr, torch.cat([t.cos, t.cos], 1), torch.cat([t.sin, t.sin], 1), t.pos),
     ValueError, r"^cos: expected 4 columns"),
    ("rope_sin_columns", lambda t: rope(t.xr, t.cos, t.sin[:, :3], t.pos), ValueError, r"^sin: expected 4 columns"),
    ("rope_sin_rows", lambda t: rope(t.xr, t.cos, t.sin[:-1], t.pos), ValueError, r"^sin: expected shape \(16, 4\)"),
    ("rope_cos_strided", lambda t: rope(t.xr, t.cos.repeat(1, 2)[:, :4], t.sin, t.pos), ValueError,
     r"^cos: must be contiguous"),
    ("rope_cos_bf16", lambda t: rope(t.xr, t.cos.bfloat16(), t.sin, t.pos), TypeError,
     r"^cos: expected dtype float32 \(same as x\), got bfloat16"),
    ("rope_sin_fp32_x_bf16", lambda t: rope(t.xr_b, t.cos.bfloat16(), t.sin, t.pos), TypeError,
     r"^sin: expected dtype bfloat16 \(same as x\), got float32"),
    ("rope_cos_1d", lambda t: rope(t.xr, t.cos[0], t.sin, t.pos), ValueError, r"^cos: expected 2 dimensions"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(t, call, exc, match):
    check_rejected(t, call, exc, match)


# ----------------------------------------------------------------------------- numpy


def test_numpy(cpu_isa, np_rng):
    # numpy float32 in and out, same results as through torch
    rows, dim = 7, 40
    x = (np_rng.standard_normal((rows, dim)) * 2).astype(np.float32)
    w = (1 + 0.5 * np_rng.standard_normal(dim)).astype(np.float32)
    res = np_rng.standard_normal((rows, dim)).astype(np.float32)
    res0 = res.copy()
    out = ops.rms_norm(x, w, EPS)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (rows, dim)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    assert same_bits(torch.from_numpy(out), ops.rms_norm(xt, wt, EPS))
    out_r = ops.rms_norm(x, w, EPS, res)
    np.testing.assert_array_equal(res, res0 + x)
    assert same_bits(torch.from_numpy(out_r), ops.rms_norm(torch.from_numpy(res), wt, EPS))

    xa = np_rng.standard_normal((rows, 2 * dim)).astype(np.float32)
    for act in ACTS:
        o = ops.act_and_mul(xa, act)
        assert isinstance(o, np.ndarray) and o.dtype == np.float32 and o.shape == (rows, dim)
        assert same_bits(torch.from_numpy(o), ops.act_and_mul(torch.from_numpy(xa), act))

    cos, sin = (c.numpy() for c in rope_tables(32, 64, torch.float32))
    xr = np_rng.standard_normal((rows, 3, 64)).astype(np.float32)
    pos = np_rng.integers(0, 32, rows).astype(np.int64)
    want = ops.rotary_embedding_(torch.from_numpy(xr.copy()), torch.from_numpy(cos), torch.from_numpy(sin),
                                 torch.from_numpy(pos))
    got = ops.rotary_embedding_(xr, cos, sin, pos)
    assert got is xr
    assert same_bits(torch.from_numpy(xr), want)


_NUMPY_ONLY_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    import numpy as np
    from fastinfer import ops
    rng = np.random.default_rng(0)
    rows, dim, eps = 7, 40, 1e-6
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    w = (1 + 0.5 * rng.standard_normal(dim)).astype(np.float32)
    res = rng.standard_normal((rows, dim)).astype(np.float32)
    res0 = res.copy()

    def ref_norm(h):
        h = h.astype(np.float64)
        return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w

    out = ops.rms_norm(x, w, eps)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (rows, dim), (type(out), out.shape)
    err = np.abs(out - ref_norm(x)).max()
    assert err <= 1e-5 * np.abs(ref_norm(x)).max(), f"rms_norm: max error {err:.3g}"
    out = ops.rms_norm(x, w, eps, res)
    assert np.array_equal(res, res0 + x), "residual"
    err = np.abs(out - ref_norm(res)).max()
    assert err <= 1e-5 * np.abs(ref_norm(res)).max(), f"rms_norm residual: max error {err:.3g}"

    xa = (rng.standard_normal((rows, 2 * dim)) * 2).astype(np.float32)
    g, u = xa[:, :dim].astype(np.float64), xa[:, dim:].astype(np.float64)
    refs = {"silu": g / (1 + np.exp(-g)) * u,
            "gelu_tanh": 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u}
    for act, ref in refs.items():
        out = ops.act_and_mul(xa, act)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (rows, dim)
        err = np.abs(out - ref).max()
        assert err <= 1e-5 * np.abs(g * u).max(), f"{act}: max error {err:.3g}"

    ang = np.arange(16)[:, None] * 10000.0 ** (-np.arange(4) * 2 / 8)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    xr = rng.standard_normal((3, 2, 8)).astype(np.float32)
    pos = np.array([0, 7, 15], dtype=np.int64)
    x1, x2 = xr[..., :4].astype(np.float64), xr[..., 4:].astype(np.float64)
    c, s = cos[pos][:, None].astype(np.float64), sin[pos][:, None].astype(np.float64)
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    assert ops.rotary_embedding_(xr, cos, sin, pos) is xr
    err = np.abs(xr - ref).max()
    assert err <= 1e-5 * np.abs(ref).max(), f"rotary: max error {err:.3g}"
    print("ok")
""")


def test_numpy_without_torch():
    res = subprocess.run([sys.executable, "-c", _NUMPY_ONLY_SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0 and res.stdout.strip() == "ok", f"rc={res.returncode}: {res.stderr[-2000:]}"
