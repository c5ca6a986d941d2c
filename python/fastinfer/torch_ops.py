"""fastinfer's kernels as torch.library custom ops: autograd and torch.compile for torch users.

Ops (namespace ``fastinfer``, call as ``torch.ops.fastinfer.<name>``):

==============================  ===========================================================
``attention_forward``           dense (batch, seq, heads, dim) attention -> (out, lse)
``varlen_attention_forward``    packed sequences (cu_seqlens), optional paged k/v -> (out, lse)
``attention_with_kvcache``      queries against a cache that is only read -> (out, lse)
``attention_with_kvcache_append``  appends k/v to the cache (mutates k_cache, v_cache) -> (out, lse)
``reshape_and_cache``           writes keys/values into cache slots (mutates k_cache, v_cache)
``attention_backward``          (dq, dk, dv) recomputed from the saved log-sum-exp
==============================  ===========================================================

Every op has a fake (meta) implementation, so torch.compile traces them without running
them, and the two forward attention ops have autograd formulas that call
``attention_backward``. The log-sum-exp output is marked non-differentiable (as in
flash-attn). Window arguments follow ``fastinfer.flash_attn_func``: ``causal`` forces the right
window to 0, -1 is unbounded. The ops build their options with
``fastinfer.kernels.options.attention_options`` and run the kernel calls of
``fastinfer.kernels.forward`` and ``fastinfer.kernels.backward``, as the direct path does.

The public entry points (``fastinfer.flash_attn_func`` ...) use these ops only when they are
needed -- autograd (grad mode on and an input requires grad) or tracing by torch.compile --
because a custom op's dispatch (about 19 us per call on the 2-core test machine, measured by
``bench/train_step.py``) is as much as a whole small decode call. Call the ops directly when
you want them unconditionally.

Needs torch >= 2.4 (``torch.library.custom_op``). No ``from __future__ import annotations``
here: the op schemas are inferred from the annotations, which must be real types.
"""

from typing import Optional, Tuple

import torch

from fastinfer import _C
from fastinfer.kernels import backward
from fastinfer.kernels.arrays import as_index_traceable as _index
from fastinfer.kernels.arrays import float_arg, int_arg, kernel_view, launch_kwargs, window_arg
from fastinfer.kernels.forward import run_dense, run_kvcache, run_varlen
from fastinfer.kernels.options import attention_options, check_dropout, softmax_scale_arg

if not hasattr(torch.library, "custom_op"):
    raise ImportError(f"fastinfer.torch_ops needs torch >= 2.4 (torch.library.custom_op); this is torch {torch.__version__}")

Tensor = torch.Tensor


def _check_ndim(x: Tensor, ndim: int, name: str, layout: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- dense


@torch.library.custom_op("fastinfer::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool, window_left: int,
                      window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                      deterministic: bool) -> Tuple[Tensor, Tensor]:
    """q (B, Sq, H, D); k, v (B, Sk, Hk, D) -> out (B, Sq, H, D), lse (B, H, Sq) float32.
    ``deterministic`` only matters to the backward pass; it is an input so autograd can see it."""
    _check_ndim(q, 4, "q", "(batch, seqlen_q, nheads, headdim)")
    opt = attention_options(q.shape[-1], softmax_scale, causal, (window_left, window_right), softcap)
    return run_dense(q, k, v, opt, alibi_slopes, with_lse=True)


@attention_forward.register_fake
def _(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, deterministic):
    _check_ndim(q, 4, "q", "(batch, seqlen_q, nheads, headdim)")
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


# ----------------------------------------------------------------------------- varlen


@torch.library.custom_op("fastinfer::varlen_attention_forward", mutates_args=())
def varlen_attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                             window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                             block_table: Optional[Tensor], deterministic: bool) -> Tuple[Tensor, Tensor]:
    """q (total_q, H, D); k, v (total_k, Hk, D) or paged (num_blocks, block_size, Hk, D) with
    block_table; cu_seqlens int32 -> out (total_q, H, D), lse (H, total_q) float32."""
    _check_ndim(q, 3, "q", "(total_q, nheads, headdim)")
    opt = attention_options(q.shape[-1], softmax_scale, causal, (window_left, window_right), softcap,
                            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, opt, alibi_slopes, block_table, with_lse=True)


@varlen_attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, block_table, deterministic):
    _check_ndim(q, 3, "q", "(total_q, nheads, headdim)")
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


# ----------------------------------------------------------------------------- kv cache


def _kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale, causal,
             window_left, window_right, softcap, alibi_slopes, num_splits):
    _check_ndim(q, 4, "q", "(batch, seqlen_q, nheads, headdim)")
    opt = attention_options(q.shape[-1], softmax_scale, causal, (window_left, window_right), softcap, num_splits)
    return run_kvcache(q, k_cache, v_cache, opt, k, v, cache_seqlens, cache_batch_idx, block_table, alibi_slopes,
                       with_lse=True)


def _kvcache_fake(q, *args):
    _check_ndim(q, 4, "q", "(batch, seqlen_q, nheads, headdim)")
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fastinfer::attention_with_kvcache", mutates_args=())
def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Optional[Tensor],
                           cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor], softmax_scale: float,
                           causal: bool, window_left: int, window_right: int, softcap: float,
                           alibi_slopes: Optional[Tensor], num_splits: int) -> Tuple[Tensor, Tensor]:
    """flash_attn_with_kvcache without new keys: the caches are only read."""
    return _kvcache(q, k_cache, v_cache, None, None, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
                    causal, window_left, window_right, softcap, alibi_slopes, num_splits)


@torch.library.custom_op("fastinfer::attention_with_kvcache_append", mutates_args=("k_cache", "v_cache"))
def attention_with_kvcache_append(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor,
                                  cache_seqlens: Optional[Tensor], cache_batch_idx: Optional[Tensor],
                                  block_table: Optional[Tensor], softmax_scale: float, causal: bool,
                                  window_left: int, window_right: int, softcap: float,
                                  alibi_slopes: Optional[Tensor], num_splits: int) -> Tuple[Tensor, Tensor]:
    """flash_attn_with_kvcache with new keys/values: writes k, v into the caches, then attends."""
    return _kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
                    causal, window_left, window_right, softcap, alibi_slopes, num_splits)


attention_with_kvcache.register_fake(_kvcache_fake)
attention_with_kvcache_append.register_fake(_kvcache_fake)


@torch.library.custom_op("fastinfer::reshape_and_cache", mutates_args=("k_cache", "v_cache"))
def reshape_and_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """fastinfer.ops.reshape_and_cache; slot_mapping int64."""
    _C.reshape_and_cache(kernel_view(key), kernel_view(value), kernel_view(k_cache), kernel_view(v_cache),
                         kernel_view(slot_mapping), stream=launch_kwargs(key).get("stream", 0))


@reshape_and_cache.register_fake
def _(key, value, k_cache, v_cache, slot_mapping):
    return None


# ----------------------------------------------------------------------------- backward


@torch.library.custom_op("fastinfer::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                       max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int, window_right: int,
                       softcap: float, alibi_slopes: Optional[Tensor],
                       deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention_forward / varlen_attention_forward (cu_seqlens given) from the saved
    out and lse: (dq, dk, dv) shaped like (q, k, v), allocated contiguous."""
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    backward.attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
                                causal=causal, window_size=(window_left, window_right), softcap=softcap,
                                alibi_slopes=alibi_slopes, deterministic=deterministic, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ----------------------------------------------------------------------------- autograd


def _setup_dense(ctx, inputs, output):
    q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.args = (softmax_scale, causal, window_left, window_right, softcap, deterministic)
    ctx.mark_non_differentiable(lse)


def _backward_dense(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    softmax_scale, causal, window_left, window_right, softcap, deterministic = ctx.args
    dq, dk, dv = torch.ops.fastinfer.attention_backward(
        dout.contiguous(), q, k, v, out, lse, None, None, 0, 0, softmax_scale, causal, window_left, window_right,
        softcap, alibi_slopes, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None


def _setup_varlen(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
     window_right, softcap, alibi_slopes, block_table, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, deterministic)
    ctx.paged = block_table is not None
    ctx.mark_non_differentiable(lse)


def _backward_varlen(ctx, dout, dlse):
    if ctx.paged:
        raise NotImplementedError("fastinfer: no backward through a paged KV cache (block_table); "
                                  "pass k and v as packed (total_k, nheads_k, headdim) tensors to train")
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, deterministic = ctx.args
    dq, dk, dv = torch.ops.fastinfer.attention_backward(
        dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        causal, window_left, window_right, softcap, alibi_slopes, deterministic)
    return (dq, dk, dv) + (None,) * 12


attention_forward.register_autograd(_backward_dense, setup_context=_setup_dense)
varlen_attention_forward.register_autograd(_backward_varlen, setup_context=_setup_varlen)


# ----------------------------------------------------------------------------- flash-attn style wrappers


def _slopes(alibi_slopes, q: Tensor) -> Optional[Tensor]:
    if alibi_slopes is None:
        return None
    if isinstance(alibi_slopes, torch.Tensor):
        return alibi_slopes.detach().float()
    return torch.as_tensor(alibi_slopes, dtype=torch.float32, device=q.device)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """fastinfer.flash_attn_func through the custom op (autograd, torch.compile); torch tensors only."""
    check_dropout(dropout_p)
    out, lse = torch.ops.fastinfer.attention_forward(
        q, k, v, softmax_scale_arg(q.shape[-1], softmax_scale), bool(causal), *window_arg(window_size),
        float_arg(softcap, "softcap", finite=False), _slopes(alibi_slopes, q), bool(deterministic))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """fastinfer.flash_attn_varlen_func through the custom op (autograd, torch.compile); torch tensors only."""
    check_dropout(dropout_p)
    out, lse = torch.ops.fastinfer.varlen_attention_forward(
        q, k, v, _index(cu_seqlens_q, q, name="cu_seqlens_q"), _index(cu_seqlens_k, q, name="cu_seqlens_k"),
        int_arg(max_seqlen_q, "max_seqlen_q"), int_arg(max_seqlen_k, "max_seqlen_k"),
        softmax_scale_arg(q.shape[-1], softmax_scale), bool(causal), *window_arg(window_size),
        float_arg(softcap, "softcap", finite=False), _slopes(alibi_slopes, q),
        _index(block_table, q, name="block_table"), bool(deterministic))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_batch_idx=None,
                            block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """fastinfer.flash_attn_with_kvcache through the custom ops (torch.compile); no autograd (inference)."""
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), int_arg(cache_seqlens, "cache_seqlens"), dtype=torch.int32,
                                   device=q.device)
    common = (_index(cache_seqlens, q, name="cache_seqlens"), _index(cache_batch_idx, q, name="cache_batch_idx"),
              _index(block_table, q, name="block_table"), softmax_scale_arg(q.shape[-1], softmax_scale), bool(causal),
              *window_arg(window_size), float_arg(softcap, "softcap", finite=False), _slopes(alibi_slopes, q),
              int_arg(num_splits, "num_splits"))
    if k is None and v is None:
        out, lse = torch.ops.fastinfer.attention_with_kvcache(q, k_cache, v_cache, *common)
    else:
        if k is None or v is None:
            raise ValueError("k and v must be given together")
        out, lse = torch.ops.fastinfer.attention_with_kvcache_append(q, k_cache, v_cache, k, v, *common)
    return (out, lse) if return_softmax_lse else out
