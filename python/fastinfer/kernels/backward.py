"""The attention backward kernel call: gradients of flash_attn_func / flash_attn_varlen_func.

flash-attention's algorithm: the probabilities are recomputed from the forward's
log-sum-exp (never stored), and D = rowsum(dout * out). Works on torch tensors (CPU
and CUDA) and numpy arrays, like the forward.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

from fastinfer import _C
from fastinfer.kernels.arrays import as_float32, as_index, empty_like, kernel_view, launch_kwargs, require_array
from fastinfer.kernels.options import attention_options

Tensor = Any  # torch.Tensor or numpy.ndarray (anything with __dlpack__)

__all__ = ["attention_backward"]


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                       max_seqlen_q: int = 0, max_seqlen_k: int = 0, softmax_scale: Optional[float] = None,
                       causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                       alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                       dq: Optional[Tensor] = None, dk: Optional[Tensor] = None,
                       dv: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention with respect to q, k and v.

    Pass the same q, k, v and options as the forward call, plus its output and log-sum-exp
    (``flash_attn_func(..., return_attn_probs=True)`` returns both).

    Parameters
    ----------
    dout : gradient of the output, the shape of q
    q : dense (batch, seqlen_q, nheads, headdim), or varlen (total_q, nheads, headdim)
    k, v : dense (batch, seqlen_k, nheads_k, headdim), or varlen (total_k, nheads_k, headdim);
        nheads % nheads_k == 0 (GQA: dk/dv are summed over the query heads of a group)
    out : the forward's output, the shape of q
    lse : the forward's log-sum-exp, float32: dense (batch, nheads, seqlen_q), varlen (nheads, total_q);
        +inf marks a row that saw no key (its gradients are zero)
    cu_seqlens_q, cu_seqlens_k : (batch + 1,) int32 (int64 is converted): the varlen layout
    max_seqlen_q, max_seqlen_k : longest sequences (varlen): hints for sizing GPU launches only
    softmax_scale, causal, window_size, softcap, alibi_slopes : as in the forward
        (ALiBi slopes get no gradient)
    deterministic : bitwise reproducible results. The CPU kernels always are; on a GPU this
        computes dq in a separate pass instead of accumulating it with atomics
    dq, dk, dv : optional preallocated outputs (shapes of q, k, v, same dtype)

    Returns
    -------
    (dq, dk, dv) : the shapes and dtype of q, k, v (accumulated in float32)

    Example
    -------
    >>> import numpy as np, fastinfer
    >>> from fastinfer.kernels.backward import attention_backward
    >>> q = np.random.randn(1, 5, 4, 64).astype(np.float32)
    >>> out, lse, _ = fastinfer.flash_attn_func(q, q, q, causal=True, return_attn_probs=True)
    >>> dq, dk, dv = attention_backward(np.ones_like(out), q, q, q, out, lse, causal=True)
    >>> dq.shape, dk.shape
    ((1, 5, 4, 64), (1, 5, 4, 64))
    """
    for x, name in ((dout, "dout"), (q, "q"), (k, "k"), (v, "v")):
        require_array(x, name)
    head_dim = int(q.shape[-1]) if getattr(q, "ndim", 0) >= 1 else 0
    opt = attention_options(head_dim, softmax_scale, causal, window_size, softcap,  # causal: bottom-right aligned
                            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    dq = empty_like(q) if dq is None else dq
    dk = empty_like(k) if dk is None else dk
    dv = empty_like(v) if dv is None else dv
    _C.attention_backward(kernel_view(dout), kernel_view(q), kernel_view(k), kernel_view(v), kernel_view(out),
                          kernel_view(lse), kernel_view(dq), kernel_view(dk), kernel_view(dv),
                          cu_seqlens_q=kernel_view(as_index(cu_seqlens_q, q, name="cu_seqlens_q")),
                          cu_seqlens_k=kernel_view(as_index(cu_seqlens_k, q, name="cu_seqlens_k")),
                          alibi_slopes=kernel_view(as_float32(alibi_slopes, q)), options=opt,
                          deterministic=bool(deterministic), **launch_kwargs(q))
    return dq, dk, dv
