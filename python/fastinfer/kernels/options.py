"""The one builder of the attention kernels' options, shared by forward, backward and the torch custom ops.

Every attention kernel call (``fastinfer.kernels.attention``, ``fastinfer.kernels.backward``,
``fastinfer.torch_ops``) spells its scale, window, softcap, split and length hints here, so the
arguments are checked, named and defaulted the same way on every path.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from fastinfer import _C
from fastinfer.kernels.arrays import float_arg, int_arg, window_arg

__all__ = ["attention_options", "softmax_scale_arg", "check_dropout"]


def softmax_scale_arg(head_dim: int, softmax_scale: Optional[float]) -> float:
    """The softmax scale: ``softmax_scale`` checked as a number, or 1/sqrt(head_dim) when None.

    A bad head_dim (<= 0) gives 1.0 here: the kernels' own checks report it by name.
    Non-finite values pass here and are refused by the kernels' checks.
    """
    if softmax_scale is None:
        return head_dim ** -0.5 if head_dim > 0 else 1.0
    return float_arg(softmax_scale, "softmax_scale", finite=False)


def attention_options(head_dim: int, softmax_scale: Optional[float], causal: bool, window_size: Sequence[int],
                      softcap: float, num_splits: int = 0, max_seqlen_q: Any = 0,
                      max_seqlen_k: Any = 0) -> "_C.AttentionOptions":
    """Options of one attention kernel call (forward, kv cache or backward).

    Parameters
    ----------
    head_dim : q.shape[-1] (sets the default scale)
    softmax_scale : None for 1/sqrt(head_dim)
    causal : flash-attn's causal: no look-ahead, aligned to the bottom-right corner
        (forces the right window to 0)
    window_size : (left, right), -1 = unbounded
    softcap : if > 0, scores become softcap * tanh(scores / softcap)
    num_splits : split-KV chunks (kv cache); 0 chooses from the shapes
    max_seqlen_q, max_seqlen_k : longest sequences (varlen): hints for GPU launches only

    Returns
    -------
    _C.AttentionOptions
    """
    left, right = window_arg(window_size)
    opt = _C.AttentionOptions()
    opt.softmax_scale = softmax_scale_arg(head_dim, softmax_scale)
    opt.softcap = float_arg(softcap, "softcap", finite=False)
    opt.window_left = left
    opt.window_right = 0 if causal else right
    opt.num_splits = int_arg(num_splits, "num_splits")
    opt.max_seqlen_q = int_arg(max_seqlen_q, "max_seqlen_q")
    opt.max_seqlen_k = int_arg(max_seqlen_k, "max_seqlen_k")
    return opt


def check_dropout(dropout_p: float) -> None:
    """Refuse dropout: a probability in [0, 1] is checked, anything above 0 is not implemented."""
    p = float_arg(dropout_p, "dropout_p")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1], got {p}")
    if p:
        raise NotImplementedError(
            f"dropout_p={dropout_p}: fastinfer's attention has no dropout (inference kernels); pass dropout_p=0.0")
