"""The flash-attn compatible API: argument checks, then the kernel call or the torch custom op.

Same names, argument names, defaults and layouts as flash-attn 2.x, so that
``from fastinfer import flash_attn_func`` replaces ``from flash_attn import flash_attn_func``.
Differences a user may notice:

* any paged block size >= 1 works (flash-attn needs multiples of 256);
* a CPU path, with the same semantics, for torch tensors and numpy arrays;
* ``dropout_p > 0`` raises NotImplementedError (inference runtime);
* the third value of ``return_attn_probs=True`` is None: probabilities are never materialised.

Autograd and torch.compile: torch inputs go through the custom ops of ``fastinfer.torch_ops``
when grad mode is on and an input requires grad, or while torch.compile traces the call
(no graph break, fullgraph=True works). Every other call -- numpy, or torch under no_grad /
inference_mode, or torch tensors that do not require grad -- calls the kernels directly and
skips the custom op's dispatch (about 19 us per call here, as much as a small decode call
itself: ``python bench/train_step.py`` measures it). flash_attn_with_kvcache has no autograd
(as in flash-attn); it uses its custom ops only under torch.compile.

Both paths build their options with ``fastinfer.kernels.options.attention_options`` and run the
kernels through ``fastinfer.kernels.forward``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from fastinfer.kernels.arrays import as_float32, as_index, int_arg, require_array
from fastinfer.kernels.forward import run_dense, run_kvcache, run_varlen
from fastinfer.kernels.options import attention_options, check_dropout

Tensor = Any  # torch.Tensor or numpy.ndarray (anything with __dlpack__)

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func"]


def _via_torch_op(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when the call needs the custom ops: autograd must see it, or torch.compile traces it."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(q, torch.Tensor):
        return False
    # k, v may be anything here (the kernels' checks reject non-arrays with a clear message)
    if torch.is_grad_enabled() and (q.requires_grad or getattr(k, "requires_grad", False)
                                    or getattr(v, "requires_grad", False)):
        return True
    return _is_compiling(torch)


def _is_compiling(torch) -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def _head_dim(q: Tensor) -> int:
    require_array(q, "q")
    if getattr(q, "ndim", 0) < 3:
        raise ValueError(f"q: expected (batch, seqlen, nheads, headdim) or (total, nheads, headdim), "
                         f"got shape {tuple(q.shape)}")
    return int(q.shape[-1])


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """Attention over dense batches.

    Parameters
    ----------
    q : (batch, seqlen_q, nheads, headdim)
    k, v : (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (GQA/MQA)
    softmax_scale : default 1/sqrt(headdim)
    causal : mask aligned to the bottom-right corner when seqlen_q != seqlen_k
    window_size : (left, right) sliding window, -1 = unbounded
    softcap : if > 0, scores become softcap * tanh(scores / softcap)
    alibi_slopes : (nheads,) or (batch, nheads) float32; adds -slope * |i + seqlen_k - seqlen_q - j|
    return_attn_probs : also return softmax_lse (batch, nheads, seqlen_q) and None

    Returns
    -------
    out : (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, None)

    Example
    -------
    >>> import numpy as np, fastinfer
    >>> q = np.random.randn(1, 5, 4, 64).astype(np.float32)
    >>> fastinfer.flash_attn_func(q, q, q, causal=True).shape
    (1, 5, 4, 64)
    """
    if _via_torch_op(q, k, v):
        from fastinfer import torch_ops

        return torch_ops.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                         alibi_slopes, deterministic, return_attn_probs)
    check_dropout(dropout_p)
    opt = attention_options(_head_dim(q), softmax_scale, causal, window_size, softcap)
    out, lse = run_dense(q, k, v, opt, as_float32(alibi_slopes, q), return_attn_probs)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Optional[Tensor] = None):
    """Attention over sequences of different lengths packed along the first axis.

    Parameters
    ----------
    q : (total_q, nheads, headdim); sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
    k, v : (total_k, nheads_k, headdim), or a paged cache (num_blocks, block_size, nheads_k, headdim)
        when block_table is given (then cu_seqlens_k only gives the lengths)
    cu_seqlens_q, cu_seqlens_k : (batch + 1,) int32 (int64 is converted)
    max_seqlen_q, max_seqlen_k : longest sequences: hints for sizing GPU launches (speed only);
        the kernels derive every length from cu_seqlens themselves
    block_table : (batch, max_blocks_per_seq) int32, any block size >= 1

    Returns
    -------
    out : (total_q, nheads, headdim), or (out, softmax_lse (nheads, total_q), None)
    """
    if _via_torch_op(q, k, v):
        from fastinfer import torch_ops

        return torch_ops.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                                deterministic, return_attn_probs, block_table)
    check_dropout(dropout_p)
    opt = attention_options(_head_dim(q), softmax_scale, causal, window_size, softcap,
                            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    out, lse = run_varlen(q, k, v, as_index(cu_seqlens_q, q, name="cu_seqlens_q"),
                          as_index(cu_seqlens_k, q, name="cu_seqlens_k"), opt,
                          block_table=as_index(block_table, q, name="block_table"),
                          alibi_slopes=as_float32(alibi_slopes, q), with_lse=return_attn_probs)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Optional[Any] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """Attention of new queries against a KV cache, appending new keys/values first.

    Parameters
    ----------
    q : (batch, seqlen_q, nheads, headdim)
    k_cache, v_cache : dense (batch_cache, seqlen_cache, nheads_k, headdim), or paged
        (num_blocks, block_size, nheads_k, headdim) with block_table (batch, max_blocks) int32;
        any block size >= 1
    k, v : optional (batch, seqlen_new, nheads_k, headdim): written in place at positions
        cache_seqlens[b] ... cache_seqlens[b] + seqlen_new - 1 before attending
    cache_seqlens : int or (batch,) int32: keys already in the cache per sequence
        (not updated in place, as in flash-attn)
    cache_batch_idx : (batch,) int32: which cache row each sequence uses (dense cache only)
    num_splits : split the keys into this many chunks; 0 chooses from the shapes, 1 never splits

    Returns
    -------
    out : (batch, seqlen_q, nheads, headdim), or (out, softmax_lse (batch, nheads, seqlen_q))
    """
    if rotary_cos is not None or rotary_sin is not None:
        raise NotImplementedError("rotary_cos/rotary_sin: fused rotary embedding is not supported yet; "
                                  "apply rotary to q and k before the call")
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad is not supported yet")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(q, torch.Tensor) and _is_compiling(torch):
        from fastinfer import torch_ops

        return torch_ops.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx,
                                                 block_table, softmax_scale, causal, window_size, softcap,
                                                 alibi_slopes, num_splits, return_softmax_lse)
    require_array(q, "q")
    if isinstance(cache_seqlens, int):
        cache_seqlens = [int_arg(cache_seqlens, "cache_seqlens")] * int(q.shape[0])
    opt = attention_options(_head_dim(q), softmax_scale, causal, window_size, softcap, num_splits)
    out, lse = run_kvcache(q, k_cache, v_cache, opt, k, v, as_index(cache_seqlens, q, name="cache_seqlens"),
                           as_index(cache_batch_idx, q, name="cache_batch_idx"),
                           as_index(block_table, q, name="block_table"), as_float32(alibi_slopes, q),
                           return_softmax_lse)
    return (out, lse) if return_softmax_lse else out


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False):
    """qkv : (batch, seqlen, 3, nheads, headdim); the views are passed without copies."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """kv : (batch, seqlen_k, 2, nheads_k, headdim); the views are passed without copies."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)
