"""ops.pack_linear_weight(raw, qtype=...) / ops.linear on GGUF-quantised weights (q8_0, q4_0, q4_1).

The weights are made with the ``gguf`` package's own quantize, and the reference uses its own dequantize,
in float64. Up to 16 rows the kernel quantises the activations to int8 per 32-block (ggml's scheme) and sums
integers exactly, so it must equal the float64 product of the same quantised activations with the
dequantised weights to about float32 rounding (<= 1e-5 of the largest output); against the float
activations it is within the activation quantisation error. Above 16 rows each panel is dequantised and
the float kernel runs: the float64 product of the float activations. Every level of the CPU SIMD ladder
runs each case (cpu_isa fixture); outputs are poisoned with NaN first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinfer import _C, ops

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QTYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
DOT_MAX_ROWS = 16  # kDotMaxRows (csrc/cpu/qlinear_dispatch.cpp)


def quantized(rng: np.random.Generator, n: int, k: int, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw blocks (n, row bytes) uint8, gguf's dequantisation (n, k) float64)."""
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
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(8, 32), (70, 64), (130, 256), (64, 96)])
def test_small_batches_equal_the_same_quantised_activations(cpu_isa, np_rng, qtype, m, n, k):
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    x = np_rng.standard_normal((m, k)).astype(np.float32)
    got = run(torch.from_numpy(x), packed, n)
    assert rel_err(got, quantized_activations(x) @ w.T) <= 1e-5
    assert rel_err(got, x.astype(np.float64) @ w.T) <= 3e-2  # int8 activations: about 1 / 127 per block


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("m", [17, 40, 100])
def test_large_batches_equal_the_dequantised_weights(cpu_isa, np_rng, qtype, m):
    n, k = 130, 192
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(raw, qtype=qtype)
    x = np_rng.standard_normal((m, k)).astype(np.float32)
    got = run(torch.from_numpy(x), packed, n)
    assert rel_err(got, x.astype(np.float64) @ w.T) <= 1e-5


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("m", [1, 5, 33])
def test_bfloat16_activations_bias_and_float32_out(cpu_isa, np_rng, qtype, m):
    n, k = 72, 128
    raw, w = quantized(np_rng, n, k, qtype)
    packed = ops.pack_linear_weight(torch.from_numpy(raw), qtype=qtype)
    assert isinstance(packed.data, torch.Tensor)
    x = torch.from_numpy(np_rng.standard_normal((m, k)).astype(np.float32)).bfloat16()
    bias = torch.from_numpy(np_rng.standard_normal(n).astype(np.float32)).bfloat16()
    xd = x.double().numpy()
    ref = (quantized_activations(xd) if m <= DOT_MAX_ROWS else xd) @ w.T + bias.double().numpy()
    got32 = run(x, packed, n, bias=bias, out_float32=True)
    assert got32.dtype == torch.float32
    # large batches run the bf16 kernel on bf16-rounded weights: bf16's own error
    assert rel_err(got32, ref) <= (1e-5 if m <= DOT_MAX_ROWS else 1e-2)
    got = run(x, packed, n, bias=bias)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 1e-2


def test_isas_agree(np_rng):
    """Every level's integer sums are exact: the levels differ only in float rounding."""
    import fastinfer
    from conftest import SUPPORTED_ISAS

    raw, _ = quantized(np_rng, 96, 512, "q4_1")
    packed = ops.pack_linear_weight(raw, qtype="q4_1")
    x = torch.from_numpy(np_rng.standard_normal((2, 512)).astype(np.float32))
    outs = []
    for isa in SUPPORTED_ISAS:
        fastinfer.set_cpu_isa(isa)
        outs.append(run(x, packed, 96))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


def test_threads_do_not_change_the_result(np_rng):
    import fastinfer

    raw, _ = quantized(np_rng, 1000, 256, "q8_0")
    packed = ops.pack_linear_weight(raw, qtype="q8_0")
    x = torch.from_numpy(np_rng.standard_normal((3, 256)).astype(np.float32))
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
    for qtype, extra in (("q8_0", 1.0), ("q4_0", 20 / 18), ("q4_1", 1.0)):
        raw, _ = quantized(np_rng, 256, 1024, qtype)
        packed = ops.pack_linear_weight(raw, qtype=qtype)
        assert packed.nbytes == pytest.approx(raw.nbytes * extra)  # q4_0 stores its -8 d offset


# ----------------------------------------------------------------------------------------------- bad input


def test_corrupt_block_is_refused_naming_the_tensor_and_row(np_rng):
    raw, _ = quantized(np_rng, 10, 64, "q4_1")
    raw[7, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # the first block's scale
    with pytest.raises(ValueError, match=r"blk\.2\.attn_v\.weight: row 7 .*not finite"):
        ops.pack_linear_weight(raw, qtype="q4_1", name="blk.2.attn_v.weight")
    raw2, _ = quantized(np_rng, 10, 64, "q4_0")
    raw2[3, 18:20] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)  # the second block
    with pytest.raises(ValueError, match="row 3"):
        ops.pack_linear_weight(raw2, qtype="q4_0")


def test_size_not_a_multiple_of_the_block(np_rng):
    raw, _ = quantized(np_rng, 4, 64, "q8_0")
    with pytest.raises(ValueError, match="whole number of q8_0 blocks"):
        ops.pack_linear_weight(raw[:, :50], qtype="q8_0", name="w")
    packed = np.zeros(_C.qlinear_packed_bytes(4, 64, "q8_0"), np.uint8)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.qlinear_pack(raw, "q8_0", 60, packed)
    with pytest.raises(ValueError, match="68 bytes"):
        _C.qlinear_pack(raw[:, :34], "q8_0", 64, packed)


@pytest.mark.parametrize("qtype", ["q6_k", "q5_k", "q4_k", "f16", "iq2_xs"])
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
