"""Windows at or past the sequence ends (up to 2**31 - 1) behave exactly like -1 (issue 21).

Query t of a sequence of sq queries and sk keys sits at key position i = t + sk - sq and sees keys
[i - left, i + right]: a left window >= sk - 1 and a right window >= sq - 1 exclude no key. The
backends turn such windows into -1 once per call (the longest sequence of the call decides), so
the results are bit-identical to the unbounded call, forward and backward, on every CPU SIMD level.
The first window that does exclude a key (length - 2) is checked against the float64 reference,
and so are windows between the per-sequence thresholds of a varlen batch (left as they are).
Before the fix, (2**31 - 1, 0) gave gradients off by up to 13 and (-1, 2**31 - 1) a wrong forward.
"""

from __future__ import annotations

import pytest
import torch

import fastinfer
import fastinfer.kernels.backward
from fastinfer import _C
from fastinfer.kernels.backward import attention_backward
from conftest import _poisoned_like, requires_cuda
from reference import attention_ref, attention_ref_paged, attention_ref_varlen, check, cu_seqlens, paged_cache, randn
from reference_backward import attention_grads_ref, attention_grads_ref_varlen, check_grads

INT32_MAX = 2**31 - 1
H, HK, D = 4, 2, 32
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


@pytest.fixture(autouse=True)
def _poison_grads(monkeypatch):
    """dq/dk/dv come from an uninitialised `empty`: make them NaN so unwritten elements show."""
    monkeypatch.setattr(fastinfer.kernels.backward, "empty_like", _poisoned_like)


@pytest.fixture(autouse=True)
def _single_threaded_reference():
    """The float64 references are tiny: torch's intra-op threads only add spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unbounded_equivalents(length: int) -> dict[str, int]:
    """Windows on a side whose sequence length is `length` that exclude no key (threshold length - 1)."""
    vals = {"int32_max": INT32_MAX, "int32_max-1": INT32_MAX - 1, "len+1": length + 1, "len": length,
            "len-1": length - 1}
    return {name: w for name, w in vals.items() if w >= 0}


def with_side(side: str, w: int, other: int) -> tuple[int, int]:
    return (w, other) if side == "left" else (other, w)


def assert_identical(got, want, what: str):
    for name, g, x in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if g is None:
            continue
        assert torch.equal(g, x), f"{what}: {name} differs from the unbounded call (max diff {(g - x).abs().max()})"


# ----------------------------------------------------------------------------- dense, every ISA

# (seqlen_q, seqlen_k): fewer queries than keys, more, equal at a tile edge, decode (right window 0 =
# len - 1 is unbounded there), a single key (left window 0 is unbounded there).
SHAPES = [(37, 70), (70, 37), (65, 65), (1, 130), (17, 1)]
# (side under test, the other side's window): the reported failures were (W, 0) and (-1, W).
SIDES = [("left", -1), ("left", 0), ("right", -1), ("right", 3)]


def dense_run(q, k, v, dout, window):
    out, lse, _ = fastinfer.flash_attn_func(q, k, v, window_size=window, return_attn_probs=True)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, window_size=window)
    return out, lse, dq, dk, dv


def dense_inputs(gen, dtype, sq, sk):
    q, k, v = randn((2, sq, H, D), dtype, gen), randn((2, sk, HK, D), dtype, gen), randn((2, sk, HK, D), dtype, gen)
    return q, k, v, randn((2, sq, H, D), dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sq,sk", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("side,other", SIDES, ids=lambda s: str(s))
def test_dense_window_past_the_sequence_is_unbounded(cpu_isa, gen, dtype, sq, sk, side, other):
    q, k, v, dout = dense_inputs(gen, dtype, sq, sk)
    want = dense_run(q, k, v, dout, with_side(side, -1, other))
    length = sk if side == "left" else sq
    for name, w in unbounded_equivalents(length).items():
        assert_identical(dense_run(q, k, v, dout, with_side(side, w, other)), want, f"{side} window {name} = {w}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sq,sk", [s for s in SHAPES if min(s) > 1], ids=lambda s: str(s))
@pytest.mark.parametrize("side,other", SIDES, ids=lambda s: str(s))
def test_dense_first_window_that_excludes_a_key(gen, dtype, sq, sk, side, other):
    """length - 2 is a real window (the normalisation stops at length - 1): against the reference."""
    q, k, v, dout = dense_inputs(gen, dtype, sq, sk)
    window = with_side(side, (sk if side == "left" else sq) - 2, other)
    got = dense_run(q, k, v, dout, window)
    assert not torch.equal(got[0], dense_run(q, k, v, dout, with_side(side, -1, other))[0]), "must exclude a key"
    check(got[0], got[1], lambda upcast: attention_ref(q, k, v, window_size=window, upcast=upcast))
    check_grads(got[2:], lambda upcast: attention_grads_ref(q, k, v, dout, window_size=window, upcast=upcast))


@pytest.mark.parametrize("window", [(INT32_MAX, 0), (-1, INT32_MAX), (INT32_MAX, INT32_MAX), (INT32_MAX - 1, 0)],
                         ids=str)
def test_dense_extremes_match_the_reference(gen, window):
    """The two reported symptoms, against float64 autograd (not only against the -1 call)."""
    q, k, v = randn((1, 70, H, D), torch.float32, gen), randn((1, 70, HK, D), torch.float32, gen), \
        randn((1, 70, HK, D), torch.float32, gen)
    dout = randn((1, 70, H, D), torch.float32, gen)
    out, lse, dq, dk, dv = dense_run(q, k, v, dout, window)
    check(out, lse, lambda upcast: attention_ref(q, k, v, window_size=window, upcast=upcast))
    check_grads((dq, dk, dv), lambda upcast: attention_grads_ref(q, k, v, dout, window_size=window, upcast=upcast))


def test_causal_flag_with_an_extreme_left_window(gen):
    q, k, v = randn((1, 40, H, D), torch.float32, gen), randn((1, 90, HK, D), torch.float32, gen), \
        randn((1, 90, HK, D), torch.float32, gen)
    dout = randn((1, 40, H, D), torch.float32, gen)
    out, lse, _ = fastinfer.flash_attn_func(q, k, v, causal=True, window_size=(INT32_MAX, INT32_MAX),
                                            return_attn_probs=True)
    grads = attention_backward(dout, q, k, v, out, lse, causal=True, window_size=(INT32_MAX, INT32_MAX))
    assert_identical((out, lse, *grads), dense_run(q, k, v, dout, (-1, 0)), "causal with (INT32_MAX, INT32_MAX)")


def test_torch_autograd_with_extreme_windows(gen):
    """flash_attn_func on tensors that need gradients (the torch custom op and its backward)."""
    base = [randn((1, 50, H, D), torch.float32, gen), randn((1, 80, HK, D), torch.float32, gen),
            randn((1, 80, HK, D), torch.float32, gen)]
    dout = randn((1, 50, H, D), torch.float32, gen)

    def grads(window):
        leaves = [t.clone().requires_grad_(True) for t in base]
        out = fastinfer.flash_attn_func(*leaves, window_size=window)
        out.backward(dout)
        return (out.detach(), None, *(t.grad for t in leaves))

    assert_identical(grads((INT32_MAX, 0)), grads((-1, 0)), "autograd (INT32_MAX, 0)")
    assert_identical(grads((-1, INT32_MAX)), grads((-1, -1)), "autograd (-1, INT32_MAX)")
    assert_identical(grads((79, 49)), grads((-1, -1)), "autograd (seqlen_k - 1, seqlen_q - 1)")


# ----------------------------------------------------------------------------- varlen and paged, every ISA

LENS_Q, LENS_K = [37, 1, 0, 70, 9], [70, 130, 5, 37, 0]


def varlen_run(q, k, v, dout, cq, ck, window):
    mq, mk = max(LENS_Q), max(LENS_K)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, window_size=window, return_attn_probs=True)
    grads = attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq,
                               max_seqlen_k=mk, window_size=window)
    return (out, lse, *grads)


def varlen_inputs(gen, dtype, d=D):
    q, k, v = randn((sum(LENS_Q), H, d), dtype, gen), randn((sum(LENS_K), HK, d), dtype, gen), \
        randn((sum(LENS_K), HK, d), dtype, gen)
    return q, k, v, randn((sum(LENS_Q), H, d), dtype, gen), cu_seqlens(LENS_Q), cu_seqlens(LENS_K)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("side,other", SIDES, ids=lambda s: str(s))
def test_varlen_window_past_every_sequence_is_unbounded(cpu_isa, gen, dtype, side, other):
    q, k, v, dout, cq, ck = varlen_inputs(gen, dtype)
    want = varlen_run(q, k, v, dout, cq, ck, with_side(side, -1, other))
    length = max(LENS_K) if side == "left" else max(LENS_Q)
    for name, w in unbounded_equivalents(length).items():
        assert_identical(varlen_run(q, k, v, dout, cq, ck, with_side(side, w, other)), want,
                         f"varlen {side} window {name} = {w}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("side,other", SIDES, ids=lambda s: str(s))
def test_varlen_window_past_some_sequences(gen, dtype, side, other):
    """Past the ends of some sequences but not of the longest: left as it is, exact per sequence."""
    q, k, v, dout, cq, ck = varlen_inputs(gen, dtype)
    lens = LENS_K if side == "left" else LENS_Q
    for w in sorted({n - 1 for n in lens if n >= 1} | {max(lens) - 2}):
        window = with_side(side, w, other)
        got = varlen_run(q, k, v, dout, cq, ck, window)
        check(got[0], got[1], lambda upcast: attention_ref_varlen(q, k, v, cq, ck, window_size=window, upcast=upcast))
        check_grads(got[2:], lambda upcast: attention_grads_ref_varlen(q, k, v, dout, cq, ck, window_size=window,
                                                                       upcast=upcast))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("side,other", SIDES, ids=lambda s: str(s))
def test_paged_window_past_every_sequence_is_unbounded(cpu_isa, gen, dtype, block_size, side, other):
    lq, lk = [1, 0, 13, 6], [20, 7, 300, 0]
    kc, vc, table = paged_cache(gen, dtype, lk, block_size, HK, D)
    q = randn((sum(lq), H, D), dtype, gen)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)

    def run(window):
        out, lse, _ = fastinfer.flash_attn_varlen_func(q, kc, vc, cq, ck, max(lq), max(lk), window_size=window,
                                                       block_table=table, return_attn_probs=True)
        return out, lse

    base = with_side(side, -1, other)
    want = run(base)
    check(*want, lambda upcast: attention_ref_paged(q, kc, vc, cq, lk, table, window_size=base, upcast=upcast))
    length = max(lk) if side == "left" else max(lq)
    for name, w in unbounded_equivalents(length).items():
        assert_identical(run(with_side(side, w, other)), want, f"paged {side} window {name} = {w}")
    window = with_side(side, 19, other)  # past the end of the 20-key sequence, not of the 300-key one
    check(*run(window), lambda upcast: attention_ref_paged(q, kc, vc, cq, lk, table, window_size=window, upcast=upcast))


@pytest.mark.parametrize("snew", [0, 3], ids=lambda n: f"new{n}")
@pytest.mark.parametrize("window", [(INT32_MAX, 0), (INT32_MAX - 1, 0), (INT32_MAX, INT32_MAX)], ids=str)
def test_kvcache_extreme_windows(cpu_isa, gen, snew, window):
    """flash_attn_with_kvcache (a paged cache, keys appended first): the extremes match (-1, right)."""
    lens = torch.tensor([0, 45, 300], dtype=torch.int32)
    kc0, vc0, table = paged_cache(gen, torch.bfloat16, (lens + snew).tolist(), 16, HK, D)
    q = randn((3, 4, H, D), torch.bfloat16, gen)
    knew = randn((3, snew, HK, D), torch.bfloat16, gen) if snew else None
    vnew = randn((3, snew, HK, D), torch.bfloat16, gen) if snew else None

    def run(w):
        kc, vc = kc0.clone(), vc0.clone()
        return fastinfer.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens, block_table=table,
                                                 window_size=w, return_softmax_lse=True)

    unbounded = (-1, -1 if window[1] == INT32_MAX else window[1])
    assert_identical(run(window), run(unbounded), f"kvcache {window}")


# ----------------------------------------------------------------------------- CUDA (with a device)
# The host normalises against the lengths' bounds (dense: the lengths themselves, varlen: the packed row
# counts), so the extremes are the unbounded launch; the emulated self-tests check the same without a GPU.


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim", [64, 128])
@pytest.mark.parametrize("sq,sk", [(37, 70), (70, 37)], ids=str)
def test_cuda_dense_extremes_are_unbounded(gen, dtype, headdim, sq, sk):
    q, k, v = (randn((2, n, h, headdim), dtype, gen).cuda() for n, h in ((sq, H), (sk, HK), (sk, HK)))
    dout = randn((2, sq, H, headdim), dtype, gen).cuda()
    for window, unbounded in [((INT32_MAX, 0), (-1, 0)), ((-1, INT32_MAX), (-1, -1)), ((sk - 1, sq - 1), (-1, -1)),
                              ((INT32_MAX - 1, INT32_MAX), (-1, -1))]:
        assert_identical(dense_run(q, k, v, dout, window), dense_run(q, k, v, dout, unbounded), f"cuda {window}")


@requires_cuda
def test_cuda_varlen_and_kvcache_extremes_are_unbounded(gen):
    q, k, v, dout, cq, ck = (x.cuda() for x in varlen_inputs(gen, torch.bfloat16, 64))  # a compiled head dim
    assert_identical(varlen_run(q, k, v, dout, cq, ck, (INT32_MAX, INT32_MAX)),
                     varlen_run(q, k, v, dout, cq, ck, (-1, -1)), "cuda varlen")
    lens = torch.tensor([0, 45, 300], dtype=torch.int32)
    kc, vc, table = paged_cache(gen, torch.bfloat16, lens.tolist(), 16, HK, 64)
    q = randn((3, 4, H, 64), torch.bfloat16, gen)

    def run(w):
        return fastinfer.flash_attn_with_kvcache(q.cuda(), kc.cuda(), vc.cuda(), cache_seqlens=lens.cuda(),
                                                 block_table=table.cuda(), window_size=w, return_softmax_lse=True)

    assert_identical(run((INT32_MAX, 0)), run((-1, 0)), "cuda kvcache")


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("call", ["flash_attn_func", "torch_op", "varlen", "kvcache", "backward"])
def test_window_arguments_checked_by_name(gen, call):
    """Every window up to 2**31 - 1 is accepted; below -1 or past int32 is refused naming window_size."""
    q, k, v = randn((1, 5, H, D), torch.float32, gen), randn((1, 7, HK, D), torch.float32, gen), \
        randn((1, 7, HK, D), torch.float32, gen)
    cq, ck = cu_seqlens([5]), cu_seqlens([7])

    def run(window):
        if call == "flash_attn_func":
            return fastinfer.flash_attn_func(q, k, v, window_size=window)
        if call == "torch_op":
            return fastinfer.flash_attn_func(q.clone().requires_grad_(True), k, v, window_size=window)
        if call == "varlen":
            return fastinfer.flash_attn_varlen_func(q[0], k[0], v[0], cq, ck, 5, 7, window_size=window)
        if call == "kvcache":
            return fastinfer.flash_attn_with_kvcache(q, k.clone(), v.clone(), window_size=window)
        out, lse, _ = fastinfer.flash_attn_func(q, k, v, return_attn_probs=True)
        return attention_backward(torch.ones_like(q), q, k, v, out, lse, window_size=window)[0]

    for window in [(INT32_MAX, INT32_MAX), (INT32_MAX, -1), (0, INT32_MAX - 1)]:
        assert torch.isfinite(run(window)).all()
    for window in [(-2, 0), (0, -2), (-(2**31), -1), (2**31, 0), (0, 2**40)]:
        with pytest.raises(ValueError, match=r"^window_size: expected two ints in \[-1, 2\*\*31-1\]"):
            run(window)


def test_options_window_fields_checked_by_name():
    opt = _C.AttentionOptions()
    opt.window_left = INT32_MAX
    opt.window_right = INT32_MAX
    assert (opt.window_left, opt.window_right) == (INT32_MAX, INT32_MAX)
    for field in ("window_left", "window_right"):
        for bad in (-2, 2**31):
            with pytest.raises(ValueError, match=f"^{field}"):
                setattr(opt, field, bad)
