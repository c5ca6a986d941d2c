"""ops.pack_linear_weight / ops.linear: the packed CPU dense projection y = x @ W.T + b.

Every result is compared with a float64 reference; the error allowed is twice that of
torch.nn.functional.linear run in the input dtype against the same reference, plus a floor
(reference.assert_close; see `floor`). Outputs are poisoned with NaN before every call: an element
the kernel never writes fails the test. Inputs are fresh random values per test (conftest).
"""

from __future__ import annotations

import itertools
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
from conftest import DTYPE_IDS, requires_cuda
from reference import assert_close, assert_unchanged, check_rejected, randn, snapshot

LINEAR_DTYPES = (torch.float32, torch.bfloat16)
linear_dtypes = pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=lambda d: DTYPE_IDS[d])
PANEL = 64  # kLinearPanel (csrc/include/fastinfer/linear.h)

MS = (1, 5, 6, 7, 13, 64, 100)  # rows: single, around the 6-row tile, one and several tiles
NS = (1, 63, 65, 130)  # outputs: none a multiple of the 64-output panel
KS = (1, 33, 64, 577)  # inputs: odd (bf16 pads to even) and even
# float32: the kernels add the k products of an output one after another into one float32
# accumulator (bit-identical to that loop), whose error is a few u * sum_k |x_k w_k| (u = 2^-24);
# torch's sgemm sums in blocks and is typically 2-3x more accurate, so "twice torch's error"
# alone fails about one float32 shape in seven. Measured over 5000 random shapes: kernel error
# - 2 * torch's <= 2.4 u * sum|x w|, kernel error alone <= 4.9 u * sum|x w|. The floor is 8 u * that
# sum: scaling every float32 output by (1 + 2^-18) still fails the tests.
U32 = 2.0 ** -24
FP32_FLOOR_ROUNDINGS = 8
# bf16: the output rounding dominates and twice torch's error holds as is; the floor only
# covers an error that is zero by chance (a single exact product, k = 1).
BF16_FLOOR = 1e-6


# ----------------------------------------------------------------------------- helpers


def _poisoned_empty(like, shape):
    if isinstance(like, torch.Tensor):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return np.full(shape, np.nan, dtype=like.dtype)


@pytest.fixture(autouse=True)
def _poison_linear_outputs(monkeypatch):
    """ops allocates out (and packed) with an uninitialised empty: make it NaN, so an element
    the kernels never write shows up as NaN."""
    monkeypatch.setattr(ops, "_empty", _poisoned_empty)


def ref_and_lowp(x, w, b):
    """float64 reference and F.linear in the input dtype (the error the tolerance is tied to)."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    return ref, F.linear(x, w, b)


def floor(x, w, b) -> float:
    """Added to twice F.linear's error: a few float32 roundings at the scale of the largest
    sum_k |x_k w_k| + |b| for float32, a tiny absolute floor for bf16. A real fault (a wrong
    weight, a skipped or doubled product) is orders of magnitude larger."""
    if x.dtype != torch.float32:
        return BF16_FLOOR
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    return FP32_FLOOR_ROUNDINGS * U32 * (scale.max().item() if scale.numel() else 0.0)


def check_linear(out, x, w, b, what="out"):
    ref, lowp = ref_and_lowp(x, w, b)
    assert out.dtype == x.dtype, f"{what}: dtype {out.dtype}, expected {x.dtype}"
    assert_close(out, ref, lowp, floor=floor(x, w, b), what=what)


def strided_rows(x: torch.Tensor, left: int = 3, right: int = 5) -> torch.Tensor:
    """x's values as a column slice of a wider NaN-filled buffer: row stride > k, last stride 1,
    a start that is not 64-byte aligned, and NaN right after every row (a kernel that reads
    past k, e.g. to pad odd k for bf16 pairs, turns the row into NaN)."""
    m, k = x.shape
    buf = torch.full((m, left + k + right), float("nan"), dtype=x.dtype)
    view = buf[:, left:left + k]
    view.copy_(x)
    assert view.stride() == (left + k + right, 1)
    return view


def set_threads(n: int) -> None:
    fastinfer.set_num_threads(n)
    assert fastinfer.get_num_threads() == n


# ----------------------------------------------------------------------------- results


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("x_layout", ["contiguous", "strided"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", MS, ids=lambda m: f"m{m}")
@linear_dtypes
def test_linear(cpu_isa, gen, dtype, m, bias, x_layout, threads):
    set_threads(threads)
    for n, k in itertools.product(NS, KS):
        w = randn((n, k), dtype, gen)
        b = randn((n,), dtype, gen) if bias else None
        x = randn((m, k), dtype, gen)
        if x_layout == "strided":
            x = strided_rows(x)
        packed = ops.pack_linear_weight(w)
        assert packed.shape == (_C.linear_packed_numel(n, k, str(dtype).replace("torch.", "")),)
        assert packed.dtype == dtype
        out = ops.linear(x, packed, n, b)
        assert out.shape == (m, n)
        check_linear(out, x, w, b, what=f"out (n={n}, k={k})")


@pytest.mark.parametrize("m", [1, 7, 64])
@linear_dtypes
def test_out_float32(cpu_isa, gen, dtype, m):
    """out_float32 returns the float32 sums unrounded: rounding them gives the dtype result bit for bit,
    and against float64 they are as close as float32 accumulation allows."""
    for n, k in ((130, 577), (1000, 64)):
        w, b, x = randn((n, k), dtype, gen), randn((n,), dtype, gen), randn((m, k), dtype, gen)
        packed = ops.pack_linear_weight(w)
        wide = ops.linear(x, packed, n, b, out_float32=True)
        assert wide.dtype == torch.float32 and wide.shape == (m, n)
        assert torch.equal(wide.to(dtype), ops.linear(x, packed, n, b))
        ref = x.double() @ w.double().T + b.double()
        scale = (x.double().abs() @ w.double().abs().T).max().item()
        assert (wide.double() - ref).abs().max().item() <= 8 * 2.0 ** -24 * scale + 1e-6


# (m, n, k): shapes where 2 threads take the parallel path (m*n*k >= 2^17), one per way the
# driver cuts the work: all rows in one task per panel (decode, >= 8 panels per thread), row
# chunks of 48, and chunks shrunk to single 6-row tiles because there are few panels.
THREADED_SHAPES = [(1, 1000, 577), (3, 1100, 65), (50, 130, 577), (200, 1000, 64), (100, 65, 33), (17, 1, 9000)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", THREADED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@linear_dtypes
def test_linear_threaded_shapes(cpu_isa, gen, dtype, shape, threads):
    set_threads(threads)
    m, n, k = shape
    w, b, x = randn((n, k), dtype, gen), randn((n,), dtype, gen), randn((m, k), dtype, gen)
    check_linear(ops.linear(x, ops.pack_linear_weight(w), n, b), x, w, b)


@pytest.mark.parametrize("threads", [1, 2])
@linear_dtypes
def test_C_strided_out(cpu_isa, gen, dtype, threads):
    # x and out are both windows into bigger NaN buffers: the kernel writes exactly out's elements.
    set_threads(threads)
    for m, n, k in [(13, 130, 577), (7, 65, 33), (1, 63, 64), (100, 1, 1)]:
        w, b = randn((n, k), dtype, gen), randn((n,), dtype, gen)
        x = strided_rows(randn((m, k), dtype, gen), left=1, right=2)
        buf = torch.full((m + 3, n + 7), float("nan"), dtype=dtype)
        out = buf[2:2 + m, 5:5 + n]
        _C.linear(x, ops.pack_linear_weight(w), b, out)
        check_linear(out, x, w, b, what=f"out (m={m}, n={n}, k={k})")
        written = torch.zeros(buf.shape, dtype=torch.bool)
        written[2:2 + m, 5:5 + n] = True
        assert torch.isnan(buf[~written]).all(), f"(m={m}, n={n}, k={k}): wrote outside out"


@linear_dtypes
def test_C_out_rows_every_other(cpu_isa, gen, dtype):
    # out's rows every other row of a buffer (row stride 2n): the rows between stay NaN.
    m, n, k = 9, 70, 40
    w, x = randn((n, k), dtype, gen), randn((m, k), dtype, gen)
    buf = torch.full((2 * m, n), float("nan"), dtype=dtype)
    _C.linear(x, ops.pack_linear_weight(w), None, buf[::2])
    check_linear(buf[::2], x, w, None)
    assert torch.isnan(buf[1::2]).all()


@linear_dtypes
def test_leading_dims(gen, dtype):
    # x (..., k): a 1-D x gives (n,), a 3-D x gives (a, b, n).
    n, k = 65, 33
    w, b = randn((n, k), dtype, gen), randn((n,), dtype, gen)
    packed = ops.pack_linear_weight(w)
    x3 = randn((2, 3, k), dtype, gen)
    out3 = ops.linear(x3, packed, n, b)
    assert out3.shape == (2, 3, n)
    check_linear(out3, x3, w, b)
    x1 = randn((k,), dtype, gen)
    out1 = ops.linear(x1, packed, n, b)
    assert out1.shape == (n,)
    check_linear(out1, x1, w, b)


@linear_dtypes
def test_empty(cpu_isa, gen, dtype):
    # m = 0: an empty result; n = 0: no outputs; k = 0: the sum is empty, so out = bias (or 0).
    w, b = randn((65, 33), dtype, gen), randn((65,), dtype, gen)
    packed = ops.pack_linear_weight(w)
    out = ops.linear(randn((0, 33), dtype, gen), packed, 65, b)
    assert out.shape == (0, 65) and out.dtype == dtype
    assert ops.linear(randn((2, 0, 33), dtype, gen), packed, 65).shape == (2, 0, 65)
    out = ops.linear(randn((4, 33), dtype, gen), ops.pack_linear_weight(randn((0, 33), dtype, gen)), 0)
    assert out.shape == (4, 0)
    p0 = ops.pack_linear_weight(randn((65, 0), dtype, gen))
    assert p0.shape == (0,)
    assert torch.equal(ops.linear(randn((4, 0), dtype, gen), p0, 65, b), b.expand(4, 65))
    assert torch.equal(ops.linear(randn((4, 0), dtype, gen), p0, 65), torch.zeros(4, 65, dtype=dtype))


@linear_dtypes
@pytest.mark.parametrize("n,k", [(1, 1), (65, 33), (130, 64), (64, 7)])
def test_pack_layout(gen, dtype, n, k):
    # The layout linear.h documents, zero padding included (packed starts out as NaN).
    w = strided_rows(randn((n, k), dtype, gen))  # rows strided: the packer reads the row stride
    packed = ops.pack_linear_weight(w)
    panels = (n + PANEL - 1) // PANEL
    packed_k = k + k % 2 if dtype == torch.bfloat16 else k
    wp = torch.zeros((panels * PANEL, packed_k), dtype=dtype)
    wp[:n, :k] = w
    if dtype == torch.float32:  # [panels][K][64]
        want = wp.view(panels, PANEL, k).transpose(1, 2)
    else:  # [panels][ceil(K/2)][64][2]
        want = wp.view(panels, PANEL, (k + 1) // 2, 2).transpose(1, 2)
    assert torch.equal(packed, want.reshape(-1))


# ----------------------------------------------------------------------------- numpy


@pytest.mark.parametrize("m", [1, 7, 100])
def test_numpy(cpu_isa, np_rng, m):
    n, k = 130, 33
    w = np_rng.standard_normal((n, k)).astype(np.float32)
    b = np_rng.standard_normal((n,)).astype(np.float32)
    x = np_rng.standard_normal((m, k)).astype(np.float32)
    packed = ops.pack_linear_weight(w)
    assert isinstance(packed, np.ndarray) and packed.dtype == np.float32
    out = ops.linear(x, packed, n, b)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (m, n)
    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
    check_linear(torch.from_numpy(out), xt, wt, bt)


_NUMPY_ONLY_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    import numpy as np
    from fastinfer import ops
    rng = np.random.default_rng(0)
    n, k = 130, 577
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((7, k)).astype(np.float32)
    out = ops.linear(x, ops.pack_linear_weight(w), n, b)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (7, n), (type(out), out.shape)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    lowp = (x @ w.T + b).astype(np.float64)
    scale = (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T + np.abs(b)).max()
    err, tol = np.abs(out - ref).max(), 2 * np.abs(lowp - ref).max() + 8 * 2.0 ** -24 * scale  # as floor()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"
    print("ok")
""")


def test_numpy_without_torch():
    res = subprocess.run([sys.executable, "-c", _NUMPY_ONLY_SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0 and res.stdout.strip() == "ok", f"rc={res.returncode}: {res.stderr[-2000:]}"


# ----------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("m", [1, 7, 13])
@linear_dtypes
def test_nonfinite_x_stays_in_its_row(cpu_isa, gen, dtype, m):
    n, k = 130, 33
    w, b = randn((n, k), dtype, gen), randn((n,), dtype, gen)
    packed = ops.pack_linear_weight(w)
    for row, value in [(0, float("nan")), (m - 1, float("inf")), (m // 2, float("-inf"))]:
        x = randn((m, k), dtype, gen)
        x[row, int(torch.randint(k, (1,), generator=gen))] = value
        out = ops.linear(x, packed, n, b)
        bad = torch.zeros(m, dtype=torch.bool)
        bad[row] = True
        if value != value:
            assert torch.isnan(out[row]).all(), f"NaN in x row {row}: out row {row} should be all NaN"
        else:  # inf times weights of either sign: +-inf everywhere in the row
            assert (~torch.isfinite(out[row])).all(), f"{value} in x row {row}: out row {row} should be non-finite"
        check_linear(out[~bad], x[~bad], w, b, what=f"rows other than {row} ({value} in x)")


@linear_dtypes
def test_nan_weight_stays_in_its_column(cpu_isa, gen, dtype):
    m, n, k = 7, 130, 33
    w, x = randn((n, k), dtype, gen), randn((m, k), dtype, gen)
    w[66, 5] = float("nan")
    out = ops.linear(x, ops.pack_linear_weight(w), n)
    assert torch.isnan(out[:, 66]).all()
    keep = torch.arange(n) != 66
    check_linear(out[:, keep], x, w[keep], None)


# ----------------------------------------------------------------------------- bad inputs

M, N, K = 5, 65, 33


@pytest.fixture
def t(gen):
    ns = types.SimpleNamespace()
    ns.w = randn((N, K), torch.float32, gen)
    ns.x = randn((M, K), torch.float32, gen)
    ns.bias = randn((N,), torch.float32, gen)
    ns.packed = ops.pack_linear_weight(ns.w)
    ns.xb = randn((M, K), torch.bfloat16, gen)
    ns.packed_b = ops.pack_linear_weight(ns.w.bfloat16())
    # raw kernel outputs, poisoned: a rejected call must leave them as they are
    ns.out = torch.full((M, N), float("nan"))
    ns.out_b = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    ns.out_n64 = torch.full((M, N - 1), float("nan"))
    ns.out_rows4 = torch.full((M - 1, N), float("nan"))
    ns.out_3d = torch.full((1, M, N), float("nan"))
    ns.out_t = torch.full((N, M), float("nan"))  # .t(): last stride != 1
    ns.pack_buf = torch.full((ns.packed.numel(),), float("nan"))
    ns.pack_buf_small = torch.full((ns.packed.numel() - 64,), float("nan"))
    ns.pack_buf_b = torch.full((ns.packed.numel(),), float("nan"), dtype=torch.bfloat16)
    ns.pack_buf_2x = torch.full((2 * ns.packed.numel(),), float("nan"))
    # x and out inside one buffer (x in columns 0..32, out where given)
    ns.shared = torch.full((M, 2 * N + K), float("nan"))
    ns.shared[:, :K] = ns.x
    return ns






lin, pack = ops.linear, ops.pack_linear_weight

# (id, call, exception, regex the message must match: it names the offending argument)
CASES = [
    # ops.pack_linear_weight
    ("pack_weight_1d", lambda t: pack(t.w[0]), ValueError, r"^weight: expected 2 dimensions"),
    ("pack_weight_3d", lambda t: pack(t.w[None]), ValueError, r"^weight: expected 2 dimensions"),
    ("pack_weight_fp16", lambda t: pack(t.w.half()), TypeError, r"^weight: .*float16"),
    ("pack_weight_fp64", lambda t: pack(t.w.double()), TypeError, r"^weight: .*float64"),
    ("pack_weight_int", lambda t: pack(t.w.int()), TypeError, r"^weight: .*int32"),
    ("pack_weight_list", lambda t: pack(t.w.tolist()), TypeError, r"^weight: expected a tensor or array"),
    ("pack_weight_last_stride", lambda t: pack(t.w.t().contiguous().t()), ValueError,
     r"^weight: the last dimension must be contiguous"),
    # _C.linear_pack / _C.linear_packed_numel
    ("C_pack", lambda t: _C.linear_pack(t.w, t.pack_buf_small), ValueError,
     r"^packed: expected shape \(4224,\) for a packed \(65, 33\) float32 weight"),
    ("C_pack_dtype", lambda t: _C.linear_pack(t.w, t.pack_buf_b), TypeError, r"^packed: expected dtype float32"),
    ("C_pack_2d", lambda t: _C.linear_pack(t.w, t.pack_buf[:, None]), ValueError, r"^packed: expected shape"),
    ("C_pack_strided", lambda t: _C.linear_pack(t.w, t.pack_buf_2x[::2]), ValueError, r"^packed: must be contiguous"),
    ("C_pack_weight_fp16", lambda t: _C.linear_pack(t.w.half(), t.pack_buf.half()), TypeError, r"^weight: .*float16"),
    ("C_pack_weight_1d", lambda t: _C.linear_pack(t.w[0], t.pack_buf), ValueError, r"^weight: expected 2 dimensions"),
    ("C_pack_weight_last_stride", lambda t: _C.linear_pack(t.w.t().contiguous().t(), t.pack_buf), ValueError,
     r"^weight: the last dimension must be contiguous"),
    ("C_numel_dtype", lambda t: _C.linear_packed_numel(N, K, "float16"), ValueError, r"^linear_packed_numel: dtype"),
    ("C_numel_negative", lambda t: _C.linear_packed_numel(-1, K, "float32"), ValueError, r"^linear_packed_numel: n and k"),
    # ops.linear
    ("x_fp16", lambda t: lin(t.x.half(), t.packed, N), TypeError, r"^x: .*float16"),
    ("x_list", lambda t: lin(t.x.tolist(), t.packed, N), TypeError, r"^x: expected a tensor or array"),
    ("x_last_stride", lambda t: lin(t.x.t().contiguous().t(), t.packed, N), ValueError,
     r"^x: the last dimension must be contiguous"),
    ("x_bf16_packed_fp32", lambda t: lin(t.xb, t.packed, N), TypeError,
     r"^packed_weight: expected dtype bfloat16 .*got float32"),
    ("x_fp32_packed_bf16", lambda t: lin(t.x, t.packed_b, N), TypeError,
     r"^packed_weight: expected dtype float32 .*got bfloat16"),
    ("out_features_wrong", lambda t: lin(t.x, t.packed, N - 1), ValueError,
     r"^packed_weight: expected shape \(2112,\) for a packed \(64, 33\)"),
    ("in_features_wrong", lambda t: lin(t.x[:, :K - 1], t.packed, N), ValueError,
     r"^packed_weight: expected shape \(4096,\) for a packed \(65, 32\)"),
    ("bias_short", lambda t: lin(t.x, t.packed, N, t.bias[:-1]), ValueError, r"^bias: expected shape \(65,\)"),
    ("bias_2d", lambda t: lin(t.x, t.packed, N, t.bias[None]), ValueError, r"^bias: expected shape \(65,\)"),
    ("bias_bf16", lambda t: lin(t.x, t.packed, N, t.bias.bfloat16()), TypeError, r"^bias: expected dtype float32"),
    ("bias_fp64", lambda t: lin(t.x, t.packed, N, t.bias.double()), TypeError, r"^bias: .*float64"),
    ("bias_strided", lambda t: lin(t.x, t.packed, N, t.bias.repeat(2)[::2]), ValueError, r"^bias: must be contiguous"),
    ("bias_list", lambda t: lin(t.x, t.packed, N, t.bias.tolist()), TypeError, r"^bias: expected a tensor or array"),
    # _C.linear: every check, with a poisoned out that must stay poisoned
    ("C_x_fp16", lambda t: _C.linear(t.x.half(), t.packed, None, t.out), TypeError, r"^x: .*float16"),
    ("C_x_int", lambda t: _C.linear(t.x.int(), t.packed, None, t.out), TypeError, r"^x: .*int32"),
    ("C_x_none", lambda t: _C.linear(None, t.packed, None, t.out), TypeError, r"^x: expected a tensor or array"),
    ("C_x_1d", lambda t: _C.linear(t.x[0], t.packed, None, t.out), ValueError, r"^x: expected 2 dimensions"),
    ("C_x_3d", lambda t: _C.linear(t.x[None], t.packed, None, t.out), ValueError, r"^x: expected 2 dimensions"),
    ("C_x_last_stride", lambda t: _C.linear(t.x.t().contiguous().t(), t.packed, None, t.out), ValueError,
     r"^x: the last dimension must be contiguous"),
    ("C_x_requires_grad", lambda t: _C.linear(t.x.clone().requires_grad_(), t.packed, None, t.out), TypeError,
     r"^x: could not export through DLPack"),
    ("C_packed_dtype", lambda t: _C.linear(t.xb, t.packed, None, t.out_b), TypeError, r"^packed_weight: expected dtype"),
    ("C_packed_size", lambda t: _C.linear(t.x, t.packed, None, t.out_n64), ValueError, r"^packed_weight: expected shape"),
    ("C_packed_2d", lambda t: _C.linear(t.x, t.packed[:, None], None, t.out), ValueError, r"^packed_weight: expected shape"),
    ("C_packed_strided", lambda t: _C.linear(t.x, t.packed.repeat(2)[::2], None, t.out), ValueError,
     r"^packed_weight: must be contiguous"),
    ("C_packed_none", lambda t: _C.linear(t.x, None, None, t.out), TypeError, r"^packed_weight: expected a tensor"),
    ("C_bias_short", lambda t: _C.linear(t.x, t.packed, t.bias[:-1], t.out), ValueError, r"^bias: expected shape"),
    ("C_bias_dtype", lambda t: _C.linear(t.x, t.packed, t.bias.bfloat16(), t.out), TypeError, r"^bias: expected dtype"),
    ("C_bias_strided", lambda t: _C.linear(t.x, t.packed, t.bias.repeat(2)[::2], t.out), ValueError,
     r"^bias: must be contiguous"),
    ("C_out_dtype", lambda t: _C.linear(t.x, t.packed, None, t.out_b), TypeError,
     r"^out: expected dtype float32 \(same as x\), got bfloat16"),
    ("C_out_fp16_x_bf16", lambda t: _C.linear(t.xb, t.packed_b, None, t.out.half()), TypeError, r"^out: expected dtype"),
    ("C_out_rows", lambda t: _C.linear(t.x, t.packed, None, t.out_rows4), ValueError,
     r"^out: expected 5 rows \(as x\), got shape \(4, 65\)"),
    ("C_out_3d", lambda t: _C.linear(t.x, t.packed, None, t.out_3d), ValueError, r"^out: expected 2 dimensions"),
    ("C_out_last_stride", lambda t: _C.linear(t.x, t.packed, None, t.out_t.t()), ValueError,
     r"^out: the last dimension must be contiguous"),
    ("C_out_none", lambda t: _C.linear(t.x, t.packed, None, None), TypeError, r"^out: expected a tensor or array"),
    ("C_out_overlaps_x", lambda t: _C.linear(t.shared[:, :K], t.packed, None, t.shared[:, K - 3:K - 3 + N]),
     ValueError, r"^out: must not overlap x"),
    ("C_out_is_x", lambda t: _C.linear(t.shared[:, :N], pack(torch.zeros(N, N)), None, t.shared[:, :N]),
     ValueError, r"^out: must not overlap x"),
    ("C_out_shifted_rows", lambda t: _C.linear(t.shared[:M - 1, :K], t.packed, None, t.shared[1:, :N]),
     ValueError, r"^out: must not overlap x"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(t, call, exc, match):
    check_rejected(t, call, exc, match)


def test_out_next_to_x_is_accepted(gen):
    # Overlap is refused; adjacent (x's last element right before out's first) is not overlap.
    x = randn((1, K), torch.float32, gen)
    w = randn((N, K), torch.float32, gen)
    buf = torch.full((K + N,), float("nan"))
    buf[:K] = x[0]
    _C.linear(buf[:K][None], ops.pack_linear_weight(w), None, buf[K:][None])
    check_linear(buf[K:][None], x, w, None)
    assert torch.equal(buf[:K], x[0])


@requires_cuda
@pytest.mark.parametrize("arg", ["x", "packed_weight", "bias", "out"])
def test_non_cpu_rejected(t, arg):
    args = {"x": t.x, "packed_weight": t.packed, "bias": t.bias, "out": t.out}
    args[arg] = args[arg].cuda()
    before = snapshot(t)
    with pytest.raises(ValueError, match=rf"^{arg}: the packed linear runs on the CPU"):
        _C.linear(args["x"], args["packed_weight"], args["bias"], args["out"])
    assert_unchanged(t, before)
    if arg == "out":
        assert torch.isnan(args["out"]).all().item()
