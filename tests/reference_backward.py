"""Reference gradients of attention for the backward tests: torch autograd through the
forward of reference.py's semantics, in float64 (``upcast=True``) or in the input dtype
(``upcast=False``: the low-precision reference whose error sets the tolerance).

The forward here differs from ``reference.attention_ref`` only in how rows that see no
key are handled: their scores are replaced by zeros before the softmax and their
probabilities multiplied by zero, so autograd yields zero gradients instead of NaN
(logsumexp over an all -inf row has a NaN derivative).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from reference import as_torch


def _attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               alibi_slopes=None, upcast=True):
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    acc = torch.float64 if upcast else torch.float32
    kk = k.repeat_interleave(H // Hk, dim=2)
    vv = v.repeat_interleave(H // Hk, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kk).to(acc) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    ipos = torch.arange(Sq)[:, None] + (Sk - Sq)
    j = torch.arange(Sk)[None, :]
    if alibi_slopes is not None:
        slopes = as_torch(alibi_slopes).to(acc)
        slopes = slopes.reshape(1, H, 1, 1) if slopes.dim() == 1 else slopes.reshape(B, H, 1, 1)
        scores = scores - slopes * (ipos - j).abs().to(acc)
    left, right = window_size[0], 0 if causal else window_size[1]
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        visible &= j >= ipos - left
    if right >= 0:
        visible &= j <= ipos + right
    seen = visible.any(-1)[:, None]  # (Sq, 1)
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = torch.where(seen, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1) * seen
    return torch.einsum("bhts,bshd->bthd", probs.to(vv.dtype), vv)


def _leaves(tensors, upcast):
    return [as_torch(t).detach().double().requires_grad_() if upcast else as_torch(t).detach().clone().requires_grad_()
            for t in tensors]


def attention_grads_ref(q, k, v, dout, *, upcast=True, **kw):
    """(dq, dk, dv) for dense q (B, Sq, H, D), k, v (B, Sk, Hk, D); alibi_slopes (H,) or (B, H)."""
    q, k, v = _leaves((q, k, v), upcast)
    out = _attention(q, k, v, upcast=upcast, **kw)
    return torch.autograd.grad(out, (q, k, v), as_torch(dout).to(out.dtype))


def attention_grads_ref_varlen(q, k, v, dout, cu_q: Sequence[int], cu_k: Sequence[int], *, upcast=True,
                               alibi_slopes: Optional[torch.Tensor] = None, **kw):
    """(dq, dk, dv) for packed q (total_q, H, D), k, v (total_k, Hk, D); rows outside every sequence get 0."""
    q, k, v = _leaves((q, k, v), upcast)
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    dout = as_torch(dout)
    loss = 0
    for b in range(len(cu_q) - 1):
        slopes = alibi_slopes
        if slopes is not None and as_torch(slopes).dim() == 2:
            slopes = as_torch(slopes)[b]
        qs, ks, vs = q[None, cu_q[b]:cu_q[b + 1]], k[None, cu_k[b]:cu_k[b + 1]], v[None, cu_k[b]:cu_k[b + 1]]
        out = _attention(qs, ks, vs, upcast=upcast, alibi_slopes=slopes, **kw)
        loss = loss + (out * dout[None, cu_q[b]:cu_q[b + 1]].to(out.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v), allow_unused=True, materialize_grads=True)


def check_grads(got, ref_fn, floor=None):
    """Each of dq, dk, dv within flash-attention's rule: 2 * (low-precision reference error) + floor."""
    from reference import assert_close

    ref = ref_fn(upcast=True)
    lowp = ref_fn(upcast=False)
    for name, g, r, l in zip(("dq", "dk", "dv"), got, ref, lowp):
        assert_close(g, r, l, floor=floor, what=name)
