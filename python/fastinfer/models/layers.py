"""Building blocks shared by the decoders: RMSNorm, rotary embedding, gated MLP, paged attention.

Projections that read the same input are fused (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``);
``load_weights`` in the model maps Hugging Face's separate tensors into their slices.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastinfer.kernels.attention
import fastinfer.ops
from fastinfer.models.attention_metadata import AttentionMetadata


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    # Weights are always overwritten by a loader, so they are allocated without initialisation.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def use_cpu_kernels(x: torch.Tensor) -> bool:
    """fastinfer's fused CPU ops replace torch's (same roundings) for inference on CPU tensors."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not x.requires_grad \
        and not torch.compiler.is_compiling()


_rows_cache = torch.arange(0)


def token_rows(t: int) -> torch.Tensor:
    """arange(t) int64 (cached): rotary tables gathered per token are indexed by row."""
    global _rows_cache
    if _rows_cache.numel() < t:
        _rows_cache = torch.arange(max(t, 2 * _rows_cache.numel(), 256))
    return _rows_cache[:t]


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, offset: bool) -> torch.Tensor:
    """RMS-normalise the last axis of x and multiply by ``scale``.

    Llama style (``offset=False``, ``scale`` = weight in x's dtype): torch's rms_norm, which accumulates in
    float32 and rounds once (Hugging Face rounds before the weight multiply: within one bf16 ulp).
    Gemma style (``offset=True``, ``scale`` = float32 ``1 + weight``): float32 throughout, rounded once,
    exactly as Hugging Face. ``scale`` may have more axes than one (the stacked per-head q/k norms).
    """
    dim = (x.shape[-1],)
    h = x.float() if offset else x
    h = F.rms_norm(h, dim, scale, eps) if scale.ndim == 1 else F.rms_norm(h, dim, None, eps) * scale
    return h.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a (dim,) weight; ``offset=True`` is Gemma's ``1 + weight`` variant. x : (..., dim)."""

    def __init__(self, dim: int, *, eps: float, offset: bool = False, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = empty_param(dim, dtype=dtype, device=device)
        self.eps, self.offset = eps, offset
        self.scale: torch.Tensor = self.weight.data  # a plain tensor: a Parameter here would register twice
        self.scale32: Optional[torch.Tensor] = None  # float32 multiplier for the CPU kernel

    def post_load(self) -> None:
        """Precompute the multiplier once the weight is loaded."""
        self.scale = (1.0 + self.weight.float()) if self.offset else self.weight.data
        self.scale32 = self.scale.float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale32 is not None and x.ndim == 2 and use_cpu_kernels(x):
            return fastinfer.ops.rms_norm(x, self.scale32, self.eps)
        return rms_norm(x, self.scale, self.eps, self.offset)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x). On the CPU kernel path the sum is written into
        ``residual`` in place (one pass, no new tensor); elsewhere a new tensor is returned."""
        if self.scale32 is not None and x.ndim == 2 and use_cpu_kernels(x) and residual.dtype == x.dtype:
            return fastinfer.ops.rms_norm(x, self.scale32, self.eps, residual=residual), residual
        residual = residual + x
        return self(residual), residual


def _inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies (head_dim // 2,) float32 and the cos/sin multiplier, as transformers computes them."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, factor, scaling)
    raise ValueError(f"rope_type {kind!r} is not supported")


def _yarn(dim: int, base: float, factor: float, s: dict) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        attn = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]) \
            if s.get("mscale") and s.get("mscale_all_dim") else mscale(factor)
    orig = s["original_max_position_embeddings"]

    def corr(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr(s.get("beta_fast") or 32), corr(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    pos = base ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra, float(attn)


class RotaryEmbedding(nn.Module):
    """cos/sin tables (positions, head_dim // 2) in the model dtype, grown on demand and indexed by position.

    Entries are computed in float32 and rounded once, as Hugging Face rounds its per-call cos/sin.
    """

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict], dtype: torch.dtype, device) -> None:
        super().__init__()
        self.inv_freq, self.attention_scaling = _inv_freq(head_dim, theta, scaling)
        self.inv_freq = self.inv_freq.to(device)
        self.cos = self.sin = torch.empty(0, head_dim // 2, dtype=dtype, device=device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions : (T,) int64 -> cos, sin (T, 1, head_dim // 2) (broadcast over heads)."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            n = max(need, 2 * self.cos.shape[0], 256)
            freqs = torch.arange(n, device=self.inv_freq.device).float()[:, None] * self.inv_freq
            dtype = self.cos.dtype
            self.cos = (freqs.cos() * self.attention_scaling).to(dtype)
            self.sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return self.cos[positions, None], self.sin[positions, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary (Hugging Face layout). x : (T, heads, head_dim); cos, sin : (T, 1, head_dim // 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up in one matmul. x : (T, hidden) -> (T, hidden)."""

    def __init__(self, hidden: int, inter: int, act: str, bias: bool, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inter, bias, dtype, device)
        self.down_proj = Linear(inter, hidden, bias, dtype, device)
        self.inter = inter
        self.gelu = act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor, float_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float_rows: see ``Linear.forward``."""
        gate_up = self.gate_up_proj(x, float_rows=float_rows)
        if gate_up.ndim == 2 and use_cpu_kernels(gate_up):
            return self.down_proj(fastinfer.ops.act_and_mul(gate_up, "gelu_tanh" if self.gelu else "silu"),
                                  float_rows=float_rows)
        gate, up = gate_up.split(self.inter, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * up, float_rows=float_rows)


class Linear(nn.Module):
    """y = x @ weight.T (+ bias), weight (out, in) as in torch.nn.Linear, allocated uninitialised.

    ``pack()`` (the engine calls it on CPU) moves the weight into fastinfer's panel layout and runs
    the projection with fastinfer's CPU kernel: a decode step then streams the weights once, in
    memory order, on fastinfer's thread pool.
    """

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = empty_param(n_out, n_in, dtype=dtype, device=device)
        self.bias = empty_param(n_out, dtype=dtype, device=device) if bias else None
        self.out_features = n_out
        # 1-D panel layout set by pack(), or the quantised weight (ops.QuantizedPacked) set at load
        self.packed: Optional[Any] = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Linear":
        """A bias-free projection sharing ``weight`` (the tied output head)."""
        m = cls(0, 0, False, weight.dtype, weight.device)
        m.weight = nn.Parameter(weight.detach(), requires_grad=False)
        m.out_features = weight.shape[0]
        return m

    @classmethod
    def from_quantized(cls, packed: "fastinfer.ops.QuantizedPacked", dtype: torch.dtype) -> "Linear":
        """A bias-free projection over a quantised packed weight (shared, e.g. the tied head's embedding)."""
        m = cls(0, 0, False, dtype, "cpu")
        m.packed, m.out_features = packed, packed.out_features
        return m

    @property
    def quantized(self) -> bool:
        return isinstance(self.packed, (fastinfer.ops.QuantizedPacked, fastinfer.ops.QuantizedParts))

    def pack(self, free_weight: bool = True) -> bool:
        """Pack for the CPU kernel; returns False (and changes nothing) where it does not apply.
        With ``free_weight`` the unpacked weight's storage is released (it is not used again)."""
        if self.quantized:  # packed at load
            return True
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or w.ndim != 2:
            return False
        self.packed = fastinfer.ops.pack_linear_weight(w.data.contiguous())
        if free_weight:
            self.weight.data = torch.empty(0, dtype=w.dtype, device=w.device)
        return True

    def forward(self, x: torch.Tensor, out_float32: bool = False, activations: str = "int8",
                float_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype, or float32 with ``out_float32`` (unrounded on the packed path).

        ``activations`` ("int8" or "float"): how a quantised weight treats x (``fastinfer.ops.linear``).
        ``float_rows`` : (T,) bool for x (T, in), or None: rows whose activations stay float whatever
        ``activations`` says (prompt tokens, ``AttentionMetadata.prompt_rows``); ignored by float weights."""
        if self.quantized and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
                and not x.requires_grad:
            if float_rows is not None and activations != "float" and bool(float_rows.any()):
                if bool(float_rows.all()):
                    activations = "float"
                else:  # the two kinds of rows apart, as the native decoder runs them
                    out = torch.empty((x.shape[0], self.out_features), device=x.device,
                                      dtype=torch.float32 if out_float32 else x.dtype)
                    out[float_rows] = self.forward(x[float_rows], out_float32, "float")
                    rest = ~float_rows
                    out[rest] = self.forward(x[rest], out_float32, activations)
                    return out
            return fastinfer.ops.linear(x.contiguous(), self.packed, self.out_features, self.bias, out_float32,
                                        activations)
        if self.packed is not None and not self.quantized and x.dtype == self.packed.dtype and not x.requires_grad:
            return fastinfer.ops.linear(x.contiguous(), self.packed, self.out_features, self.bias, out_float32)
        if self.packed is not None:
            kind = self.packed.qtype if self.quantized else self.packed.dtype
            raise RuntimeError(f"this projection was packed for the CPU kernel ({kind}); it cannot run "
                               f"on {x.dtype} input{' that requires grad' if x.requires_grad else ''}")
        y = F.linear(x, self.weight, self.bias)
        return y.float() if out_float32 else y


class Attention(nn.Module):
    """Self-attention over a paged KV cache, for a flattened batch of prefill chunks and decodes.

    q/k/v come from one ``qkv_proj`` matmul; with ``qk_norm`` q and k are RMS-normalised per head
    (one norm call: the q and k weights are stacked per head); rotary is applied to q and k together.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, norm_eps: float, norm_offset: bool, scale: float, window: Optional[int],
                 softcap: Optional[float], dtype: torch.dtype, device) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv_proj = Linear(hidden, (heads + 2 * kv_heads) * head_dim, qkv_bias, dtype, device)
        self.o_proj = Linear(heads * head_dim, hidden, o_bias, dtype, device)
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, offset=norm_offset, dtype=dtype, device=device)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, offset=norm_offset, dtype=dtype, device=device)
        self.qk_scale: Optional[torch.Tensor] = None  # (heads + kv_heads, head_dim): q and k norms in one call
        self.scale = scale
        self.window = (window - 1, 0) if window else (-1, -1)  # HF keeps keys with q_pos - k_pos < window
        self.softcap = float(softcap or 0.0)

    def post_load(self) -> None:
        if self.q_norm is not None:
            self.q_norm.post_load()
            self.k_norm.post_load()
            self.qk_scale = torch.cat([self.q_norm.scale.expand(self.heads, -1),
                                       self.k_norm.scale.expand(self.kv_heads, -1)])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """x : (T, hidden); cos, sin : (T, 1, head_dim // 2); kv_cache : (k, v) each
        (num_blocks, block_size, kv_heads, head_dim) -> (T, hidden)."""
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x, float_rows=meta.prompt_rows)
        n_qk = self.heads + self.kv_heads
        qk = qkv[:, : n_qk * d].view(t, n_qk, d)
        v = qkv[:, n_qk * d:].view(t, self.kv_heads, d)
        if self.qk_scale is not None:
            qk = rms_norm(qk, self.qk_scale, self.q_norm.eps, self.q_norm.offset)
        if use_cpu_kernels(qk):  # in place, into qkv
            qk = fastinfer.ops.rotary_embedding_(qk, cos.view(t, -1), sin.view(t, -1), token_rows(t))
        else:
            qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, : self.heads], qk[:, self.heads:]
        k_cache, v_cache = kv_cache
        fastinfer.ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = fastinfer.kernels.attention.flash_attn_varlen_func(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
            softmax_scale=self.scale, causal=True, window_size=self.window, softcap=self.softcap,
            block_table=meta.block_table)
        return self.o_proj(out.view(t, self.heads * d), float_rows=meta.prompt_rows)
