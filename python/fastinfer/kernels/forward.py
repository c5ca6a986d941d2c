"""The attention forward kernel calls: allocate out (and lse), hand the views to ``_C``.

Shared by the flash-attn API (``fastinfer.kernels.attention``, the direct path) and the torch
custom ops (``fastinfer.torch_ops``), so each kernel call is spelled once. Inputs arrive
checked and converted (index tensors int32, ALiBi slopes float32, options built by
``fastinfer.kernels.options.attention_options``); the kernels' own checks do the rest.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from fastinfer import _C
from fastinfer.kernels.arrays import empty_float32, empty_like, kernel_view, launch_kwargs

Tensor = Any  # torch.Tensor or numpy.ndarray (anything with __dlpack__)

__all__ = ["run_dense", "run_varlen", "run_kvcache"]


def run_dense(q: Tensor, k: Tensor, v: Tensor, options: "_C.AttentionOptions", alibi_slopes: Optional[Tensor] = None,
              with_lse: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Dense attention: q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D), lse (B, H, Sq) float32 or None."""
    out = empty_like(q)
    lse = empty_float32(q, (q.shape[0], q.shape[2], q.shape[1])) if with_lse else None
    _C.attention_forward(kernel_view(q), kernel_view(k), kernel_view(v), kernel_view(out), lse=kernel_view(lse),
                         alibi_slopes=kernel_view(alibi_slopes), options=options, **launch_kwargs(q))
    return out, lse


def run_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
               options: "_C.AttentionOptions", alibi_slopes: Optional[Tensor] = None,
               block_table: Optional[Tensor] = None, with_lse: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Packed sequences: q (total_q, H, D), k/v (total_k, Hk, D) or paged (num_blocks, block_size, Hk, D)
    with block_table (B, max_blocks) int32; cu_seqlens (B + 1,) int32
    -> out (total_q, H, D), lse (H, total_q) float32 or None."""
    out = empty_like(q)
    lse = empty_float32(q, (q.shape[1], q.shape[0])) if with_lse else None
    _C.attention_forward(kernel_view(q), kernel_view(k), kernel_view(v), kernel_view(out), lse=kernel_view(lse),
                         cu_seqlens_q=kernel_view(cu_seqlens_q), cu_seqlens_k=kernel_view(cu_seqlens_k),
                         block_table=kernel_view(block_table), alibi_slopes=kernel_view(alibi_slopes),
                         options=options, **launch_kwargs(q))
    return out, lse


def run_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, options: "_C.AttentionOptions",
                k: Optional[Tensor] = None, v: Optional[Tensor] = None, cache_seqlens: Optional[Tensor] = None,
                cache_batch_idx: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                alibi_slopes: Optional[Tensor] = None, with_lse: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Queries q (B, Sq, H, D) against a dense (B_cache, S_cache, Hk, D) or paged (num_blocks, block_size, Hk, D)
    cache, first writing k/v (B, S_new, Hk, D) into it when given; index tensors int32
    -> out (B, Sq, H, D), lse (B, H, Sq) float32 or None."""
    out = empty_like(q)
    lse = empty_float32(q, (q.shape[0], q.shape[2], q.shape[1])) if with_lse else None
    _C.attention_with_kvcache(kernel_view(q), kernel_view(k_cache), kernel_view(v_cache), kernel_view(out),
                              k=kernel_view(k), v=kernel_view(v), lse=kernel_view(lse),
                              cache_seqlens=kernel_view(cache_seqlens), cache_batch_idx=kernel_view(cache_batch_idx),
                              block_table=kernel_view(block_table), alibi_slopes=kernel_view(alibi_slopes),
                              options=options, **launch_kwargs(q))
    return out, lse
