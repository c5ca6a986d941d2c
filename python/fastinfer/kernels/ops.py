"""Low-level ops for the engine (vLLM's meanings, flash-attn's cache layout); public as ``fastinfer.ops``.

Cache write, packed CPU linear, RMSNorm, gated activation and rotary embedding: one kernel call
each, outputs allocated like the inputs (torch or numpy).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinfer import _C
from fastinfer.kernels.arrays import (as_index, as_index_traceable, float_arg, int_arg, is_torch, kernel_view,
                                      launch_kwargs, require_array)

__all__ = ["reshape_and_cache", "pack_linear_weight", "linear", "QuantizedPacked", "QuantizedParts", "QUANT_TYPES",
           "dequantize_rows", "rms_norm", "act_and_mul", "rotary_embedding_"]

# GGUF block formats the CPU linear runs natively: elements per block and bytes per block.
QUANT_TYPES = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q4_k": (256, 144),
               "q5_k": (256, 176), "q6_k": (256, 210)}


def reshape_and_cache(key: Any, value: Any, k_cache: Any, v_cache: Any, slot_mapping: Any) -> None:
    """Write each token's key/value into its cache slot, in place.

    Parameters
    ----------
    key, value : (num_tokens, nheads_k, headdim)
    k_cache, v_cache : (num_blocks, block_size, nheads_k, headdim), any block_size >= 1
    slot_mapping : (num_tokens,) int64 (int32 is converted); token i goes to block
        slot_mapping[i] // block_size, offset slot_mapping[i] % block_size; negative = skip
    Under torch.compile this is the custom op ``torch.ops.fastinfer.reshape_and_cache``
    (declared as mutating the caches), so tracing does not break the graph.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(key, torch.Tensor) and torch.compiler.is_compiling():
        from fastinfer import torch_ops  # noqa: F401  (registers torch.ops.fastinfer.*)

        torch.ops.fastinfer.reshape_and_cache(key, value, k_cache, v_cache,
                                              as_index_traceable(slot_mapping, key, "int64", name="slot_mapping"))
        return
    stream = launch_kwargs(key).get("stream", 0)
    _C.reshape_and_cache(kernel_view(key), kernel_view(value), kernel_view(k_cache), kernel_view(v_cache),
                         kernel_view(as_index(slot_mapping, key, "int64", name="slot_mapping")), stream=stream)


def _empty(like: Any, shape: tuple[int, ...]) -> Any:
    if is_torch(like):
        import torch

        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return np.empty(shape, dtype=like.dtype)


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


@dataclass(frozen=True, slots=True)
class QuantizedPacked:
    """A quantised weight packed by ``pack_linear_weight(raw, qtype=...)``: what :func:`linear` needs."""

    data: Any  # 1-D uint8 (the framework of the raw blocks), _C.qlinear_packed_bytes(out, in, qtype) bytes
    qtype: str  # a QUANT_TYPES key: "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k" or "q6_k"
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) if hasattr(self.data, "nbytes") else int(self.data.numel())


@dataclass(frozen=True)
class QuantizedParts:
    """A projection whose consecutive output rows are quantised in different block types (a fused q/k/v of
    a Q4_K_M file: q and k in one type, v in another), each part packed on its own: what :func:`linear`
    runs as one projection, writing each part's columns."""

    parts: tuple  # QuantizedPacked, in output order, all with the same in_features

    def __post_init__(self) -> None:
        if not self.parts or not all(isinstance(p, QuantizedPacked) for p in self.parts):
            raise TypeError("parts: expected one or more QuantizedPacked")
        if len({p.in_features for p in self.parts}) != 1:
            raise ValueError(f"parts: in_features differ: {[p.in_features for p in self.parts]}")

    @property
    def qtype(self) -> str:
        return "+".join(p.qtype for p in self.parts)

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def quant_type_name(qtype: Any) -> str:
    """"q4_1" from "q4_1", "Q4_1" or gguf's GGMLQuantizationType.Q4_1."""
    name = getattr(qtype, "name", qtype)
    if not isinstance(name, str):
        raise TypeError(f"qtype: expected a GGUF type name such as 'q4_1', got {qtype!r}")
    return name.lower()


def pack_linear_weight(weight: Any, qtype: Any = None, name: str = "weight") -> Any:
    """Repack a projection weight for :func:`linear` (done once, at model load).

    Parameters
    ----------
    weight : (out_features, in_features) float32 or bfloat16, on the CPU, rows contiguous; or, with
        ``qtype``, the GGUF-quantised weight as its raw blocks: (out_features, bytes per row) uint8,
        one row of blocks per output (what gguf's reader and ``gguf.quants.quantize`` give)
    qtype : None for a float weight, else its GGUF block type, one of QUANT_TYPES: "q8_0", "q4_0", "q4_1",
        "q5_0", "q4_k", "q5_k" or "q6_k" (any case, or gguf's GGMLQuantizationType); another type is a ValueError
        naming ``name`` and the type
    name : the tensor's name in error messages

    Returns
    -------
    packed : for a float weight, 1-D, same dtype and framework, ``_C.linear_packed_numel(out, in, dtype)``
        elements: 64-output panels, each contiguous, so a decode step streams the weights in memory
        order. For a quantised weight, a :class:`QuantizedPacked` whose ``data`` holds the blocks
        repacked into 8-row interleaved panels (``_C.qlinear_packed_bytes`` bytes), still quantised.
    """
    require_array(weight, "weight")
    if qtype is not None:
        return _pack_quantized(weight, quant_type_name(qtype), name)
    if len(weight.shape) != 2:
        raise ValueError(f"weight: expected 2 dimensions (out_features, in_features), got shape {tuple(weight.shape)}")
    dtype = _dtype_name(weight)
    if dtype not in ("float32", "bfloat16"):
        raise TypeError(f"weight: the CPU linear takes float32 or bfloat16, got {dtype}")
    n, k = (int(s) for s in weight.shape)
    packed = _empty(weight, (_C.linear_packed_numel(n, k, dtype),))
    _C.linear_pack(kernel_view(weight), kernel_view(packed))
    return packed


def _pack_quantized(raw: Any, qtype: str, name: str) -> QuantizedPacked:
    if qtype not in QUANT_TYPES:
        raise ValueError(f"{name}: {qtype} has no native CPU kernel (native: {', '.join(QUANT_TYPES)}); dequantise "
                         "it first")
    if len(raw.shape) != 2:
        raise ValueError(f"{name}: expected the raw blocks as (out_features, bytes per row), got shape "
                         f"{tuple(raw.shape)}")
    if _dtype_name(raw) != "uint8":
        raise TypeError(f"{name}: expected the raw {qtype} blocks as uint8, got {_dtype_name(raw)}")
    elems, block_bytes = QUANT_TYPES[qtype]
    n, row_bytes = (int(s) for s in raw.shape)
    if row_bytes % block_bytes:
        raise ValueError(f"{name}: {row_bytes} bytes per row is not a whole number of {qtype} blocks "
                         f"({block_bytes} bytes each)")
    k = row_bytes // block_bytes * elems
    if k == 0:
        raise ValueError(f"{name}: rows of 0 bytes")
    size = _C.qlinear_packed_bytes(n, k, qtype)
    if isinstance(raw, np.ndarray) and not raw.flags.writeable:  # gguf's memory map: DLPack cannot export it
        raw = np.array(raw)
    if is_torch(raw):
        import torch

        data = torch.empty(size, dtype=torch.uint8, device=raw.device)
    else:
        data = np.empty(size, dtype=np.uint8)
    _C.qlinear_pack(kernel_view(raw), qtype, k, kernel_view(data), name)
    return QuantizedPacked(data, qtype, n, k)


def dequantize_rows(packed_weight: QuantizedPacked, ids: Any) -> Any:
    """Rows ``ids`` of a quantised weight packed by :func:`pack_linear_weight`, dequantised as gguf does.

    Parameters
    ----------
    packed_weight : a :class:`QuantizedPacked` of any of QUANT_TYPES
    ids : (count,) integer row indices in [0, out_features), CPU, numpy or torch

    Returns
    -------
    (count, in_features) float32, of the framework of ``packed_weight.data`` (an embedding lookup in a
    quantised table that the tied output head shares).
    """
    if not isinstance(packed_weight, QuantizedPacked):
        raise TypeError(f"packed_weight: expected a QuantizedPacked, got {type(packed_weight).__name__}")
    k = packed_weight.in_features
    if is_torch(packed_weight.data):
        import torch

        ids = torch.as_tensor(ids, dtype=torch.int64).contiguous()
        out = torch.empty((int(ids.numel()), k), dtype=torch.float32)
    else:
        ids = np.ascontiguousarray(np.asarray(ids), dtype=np.int64)
        out = np.empty((int(ids.size), k), dtype=np.float32)
    if len(ids.shape) != 1:
        raise ValueError(f"ids: expected one dimension (count,), got shape {tuple(ids.shape)}")
    _C.qlinear_rows(kernel_view(packed_weight.data), packed_weight.qtype, packed_weight.out_features,
                    packed_weight.in_features, kernel_view(ids), kernel_view(out))
    return out


def linear(x: Any, packed_weight: Any, out_features: int, bias: Any = None, out_float32: bool = False,
           activations: str = "int8") -> Any:
    """``x @ W.T + bias`` on the CPU with W packed by :func:`pack_linear_weight`; float32 accumulation,
    rounded once to x's dtype (the same result as torch's bf16 matmul up to summation order).

    Parameters
    ----------
    x : (..., in_features) float32 or bfloat16, CPU, last axis contiguous
    packed_weight : from ``pack_linear_weight`` of an (out_features, in_features) weight of x's dtype, or
        the QuantizedPacked of a quantised one (see ``activations``), or a QuantizedParts (each part writes
        its own columns)
    out_features : rows of the original weight
    bias : (out_features,) of x's dtype, or None
    out_float32 : return float32 whatever x's dtype: the float32 sums unrounded (logits from a bf16
        head, without a second pass to convert them)
    activations : with a quantised weight, ``"int8"`` quantises x to int8 per 32-block on the fly
        (ggml's scheme: integer dot products, for decode), ``"float"`` keeps x and dequantises each
        8-row sub-panel of W once per call (bf16 weights with bf16 x where the CPU has bf16 dot
        products, else float32: the dequantised model's numbers, for prompt rows). Either way a row's
        result does not depend on the other rows. Ignored for float weights.

    Returns
    -------
    (..., out_features), a new array of x's framework, of x's dtype (float32 with ``out_float32``).
    """
    require_array(x, "x")
    out_features = int_arg(out_features, "out_features")
    if activations not in ("int8", "float"):
        raise ValueError(f"activations: expected 'int8' or 'float', got {activations!r}")
    quantized = isinstance(packed_weight, (QuantizedPacked, QuantizedParts))
    if quantized and out_features != packed_weight.out_features:
        raise ValueError(f"out_features: the packed weight has {packed_weight.out_features}, got {out_features}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]) if len(x.shape) != 2 else x
    shape = (x2.shape[0], out_features)
    if out_float32 and is_torch(x):
        import torch

        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif out_float32:
        out = np.empty(shape, dtype=np.float32)
    else:
        out = _empty(x, shape)
    if isinstance(packed_weight, QuantizedParts):
        col = 0
        for part in packed_weight.parts:
            cols = slice(col, col + part.out_features)
            _C.qlinear(kernel_view(x2), kernel_view(part.data), part.qtype, None if bias is None else kernel_view(bias[cols]),
                       kernel_view(out[:, cols]), activations)
            col += part.out_features
    elif quantized:
        _C.qlinear(kernel_view(x2), kernel_view(packed_weight.data), packed_weight.qtype, kernel_view(bias),
                   kernel_view(out), activations)
    else:
        _C.linear(kernel_view(x2), kernel_view(packed_weight), kernel_view(bias), kernel_view(out))
    return out.reshape(*lead, out_features) if len(lead) != 1 else out


def rms_norm(x: Any, weight: Any, eps: float, residual: Any = None) -> Any:
    """RMSNorm of the rows of x on the CPU, float32 math rounded once (torch's ``F.rms_norm``).

    Parameters
    ----------
    x : (rows, dim) float32 or bfloat16, last axis contiguous
    weight : (dim,) float32 multiplier (Gemma's ``1 + w`` precomputed)
    residual : (rows, dim) of x's dtype, or None. When given, ``residual += x`` first (rounded to the
        dtype, in place: the new residual stream) and the sum is normalised instead of x.

    Returns
    -------
    out : (rows, dim), a new array of x's dtype.
    """
    require_array(x, "x")
    eps = float_arg(eps, "eps")
    out = _empty(x, tuple(x.shape))
    _C.rms_norm(kernel_view(x), kernel_view(weight), eps, kernel_view(out), kernel_view(residual))
    return out


def act_and_mul(x: Any, act: str = "silu") -> Any:
    """``act(gate) * up`` for x = [gate | up] (rows, 2 * dim), as torch computes it op by op
    (activation rounded to x's dtype, then the product rounded): one pass instead of three.
    act : "silu" or "gelu_tanh". Returns (rows, dim)."""
    require_array(x, "x")
    if not isinstance(act, str):
        raise TypeError(f"act: expected 'silu' or 'gelu_tanh', got {type(act).__name__}")
    out = _empty(x, (x.shape[0], x.shape[-1] // 2) if len(x.shape) == 2 else tuple(x.shape))
    _C.act_and_mul(kernel_view(x), kernel_view(out), act)
    return out


def rotary_embedding_(x: Any, cos: Any, sin: Any, positions: Any) -> Any:
    """Rotate-half rotary embedding (Hugging Face layout) of x in place; returns x.

    Parameters
    ----------
    x : (tokens, heads, head_dim), last axis contiguous (other strides free: a view into a fused qkv works)
    cos, sin : (table_rows, head_dim // 2) of x's dtype, contiguous
    positions : (tokens,) int64, each in [0, table_rows)
    Each product and the sum are rounded to x's dtype, as the torch expression ``x1 * cos - x2 * sin`` is.
    """
    require_array(x, "x")
    _C.rotary_embedding(kernel_view(x), kernel_view(cos), kernel_view(sin), kernel_view(positions))
    return x
