"""``torch.nn.functional.scaled_dot_product_attention`` on fastinfer's kernels, and a scoped override.

    out = fastinfer.scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, H, L, E) layout
    with fastinfer.sdpa_override():      # F.scaled_dot_product_attention -> fastinfer's, in this scope
        model(x)

Same signature, layout and semantics as torch's SDPA (``is_causal`` is aligned to the top-left
corner when L != S, as in torch). The kernels run when they can express the call exactly:

* no mask, or ``is_causal=True`` (top-left alignment via a key slice or a right window);
* a boolean or additive (0 / -inf / dtype-min) ``attn_mask`` that is exactly a causal mask
  (either alignment), exactly all-visible, or a pure key-padding mask (every query of a batch
  row sees the same keys) -> varlen over the kept keys.

Anything else runs torch's own SDPA and says why, once per reason, with an
``SDPAFallbackWarning``: other masks, masks that leave a query with no key (torch returns NaN
or a uniform average there, the kernels zeros), ``dropout_p > 0``, dtypes other than
float32/float16/bfloat16, head dims the kernels lack, a value head dim != the query's,
devices the kernels do not run on, inputs that are not 3-D/4-D, and a mask under
torch.compile (its contents decide the kernel; tracing cannot read them). Autograd flows
through the kernel path (``fastinfer.torch_ops``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import torch

from fastinfer.kernels.attention import flash_attn_func, flash_attn_varlen_func
from fastinfer.kernels.runtime import cuda_available

__all__ = ["scaled_dot_product_attention", "sdpa_override", "SDPAFallbackWarning"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WARNED: set[str] = set()  # fallback reasons already reported in this process


class SDPAFallbackWarning(UserWarning):
    """fastinfer.scaled_dot_product_attention ran torch's SDPA instead of fastinfer's kernels."""


def _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    # torch's builtin, not F.scaled_dot_product_attention: that name may be ours (sdpa_override).
    kw = {"enable_gqa": True} if enable_gqa else {}
    return torch._C._nn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                     scale=scale, **kw)


def _fallback(reason: str, *args):
    if reason not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(reason)
        warnings.warn(f"fastinfer.scaled_dot_product_attention: {reason}; running torch's SDPA instead "
                      f"(this warning is shown once per reason)", SDPAFallbackWarning, stacklevel=3)
    return _torch_sdpa(*args)


def _device_ok(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return cuda_available()
    return False


def _unsupported(query, key, value, dropout_p: float, enable_gqa: bool) -> Optional[str]:
    """Why the kernels cannot run this call (None when they can), mask aside."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "inputs are not all torch tensors"
    if dropout_p > 0:
        return f"dropout_p={dropout_p} (the kernels have no dropout)"
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return f"{query.dim()}-D inputs (the kernels take (batch, heads, seq, dim) or (batch, seq, dim))"
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype} (the kernels take float32, float16, bfloat16)"
    if not (query.device == key.device == value.device) or not _device_ok(query.device):
        return f"device {query.device} (no fastinfer kernels for it)"
    e, ev = query.shape[-1], value.shape[-1]
    if key.shape[-1] != e or ev != e:
        return f"value head dim {ev} != query head dim {e}"
    if e % 8 or not 8 <= e <= 256:
        return f"head dim {e} (the kernels take multiples of 8 in [8, 256])"
    if query.shape[0] != key.shape[0] or key.shape[:-1] != value.shape[:-1]:
        return "batch sizes or key/value shapes differ"
    if query.dim() == 4:
        h, hk = query.shape[1], key.shape[1]
        if h != hk and not (enable_gqa and h % hk == 0):
            return f"{h} query heads vs {hk} key heads without enable_gqa"
    return None


def _classify_mask(mask: torch.Tensor, batch: int, heads: int, lq: int, lk: int):
    """What a mask means, if the kernels can express it exactly.

    Returns ("full",), ("causal_top_left",), ("causal_bottom_right",), ("keys", keep (batch, lk) bool),
    or (None, reason) for anything else.
    """
    if mask.dtype == torch.bool:
        visible = mask
    elif mask.is_floating_point():
        blocked = torch.isneginf(mask) | (mask == torch.finfo(mask.dtype).min)
        visible = mask == 0
        if not (visible | blocked).all():
            return None, "an additive attn_mask with values other than 0 and -inf (a bias)"
    else:
        return None, f"an attn_mask of dtype {mask.dtype}"
    if visible.dim() > 4:
        return None, f"a {visible.dim()}-D attn_mask"
    while visible.dim() < 4:
        visible = visible.unsqueeze(0)
    try:
        visible = visible.expand(batch, visible.shape[1], lq, lk)
    except RuntimeError:
        return None, f"an attn_mask of shape {tuple(mask.shape)} that does not broadcast to the scores"
    if visible.shape[1] != 1:
        if visible.shape[1] != heads or not (visible == visible[:, :1]).all():
            return None, "an attn_mask that differs between heads"
    visible = visible[:, 0]  # (batch, lq, lk)
    if not visible.any(-1).all():
        return None, "an attn_mask that leaves a query with no visible key"
    if visible.all():
        return ("full",)
    ones = torch.ones(lq, lk, dtype=torch.bool, device=visible.device)
    if (visible == ones.tril()).all():
        return ("causal_top_left",)
    if (visible == ones.tril(lk - lq)).all():
        return ("causal_bottom_right",)
    if (visible == visible[:, :1]).all():
        return ("keys", visible[:, 0])
    return None, "an attn_mask that is neither causal nor a key-padding mask"


def _causal_top_left(q, k, v, scale):
    """torch's is_causal: query i sees keys 0..i. (B, L, H, E) layout."""
    lq, lk = q.shape[1], k.shape[1]
    if lq <= lk:  # keys past lq are seen by no query; then top-left == bottom-right
        return flash_attn_func(q, k[:, :lq], v[:, :lq], softmax_scale=scale, causal=True)
    return flash_attn_func(q, k, v, softmax_scale=scale, window_size=(-1, lq - lk))


def _key_padding(q, k, v, keep, scale):
    """Every query of batch row b sees the keys keep[b]: pack them and run varlen."""
    b, lq, h, e = q.shape
    lens = keep.sum(1, dtype=torch.int32)
    cu_k = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = lens.cumsum(0)
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q.reshape(b * lq, h, e), k[keep], v[keep], cu_q, cu_k, lq, int(lens.max()),
                                 softmax_scale=scale)
    return out.view(b, lq, h, e)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention on fastinfer's kernels (see the module doc).

    Parameters
    ----------
    query : (B, H, L, E) or (B, L, E)
    key, value : (B, Hk, S, E) or (B, S, E); Hk may divide H when enable_gqa=True
    attn_mask : bool (True = attend) or additive float, broadcastable to (B, H, L, S)
    is_causal : query i sees keys 0..i (top-left aligned, as torch)
    scale : default 1/sqrt(E)

    Returns
    -------
    (B, H, L, E) or (B, L, E), in query's dtype: a transposed view of a (B, L, H, E) buffer
    (torch's CPU flash backend returns the same layout).

    Example
    -------
    >>> import torch, fastinfer
    >>> q = torch.randn(2, 4, 16, 64)
    >>> fastinfer.scaled_dot_product_attention(q, q, q, is_causal=True).shape
    torch.Size([2, 4, 16, 64])
    """
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    reason = _unsupported(query, key, value, dropout_p, enable_gqa)
    if reason is None and attn_mask is not None and is_causal:
        reason = "attn_mask together with is_causal=True"  # torch raises; let it say so
    if reason is not None:
        return _fallback(reason, *args)
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    kind = ("causal_top_left",) if is_causal else ("full",)
    if attn_mask is not None:
        if torch.compiler.is_compiling():
            return _fallback("attn_mask under torch.compile (the kernel depends on the mask's contents, which "
                             "tracing cannot read)", *args)
        kind = _classify_mask(attn_mask, b, h, lq, lk)
        if kind[0] is None:
            return _fallback(kind[1], *args)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, L, H, E) views
    if kind[0] == "full":
        out = flash_attn_func(q, k, v, softmax_scale=scale)
    elif kind[0] == "causal_top_left":
        out = _causal_top_left(q, k, v, scale)
    elif kind[0] == "causal_bottom_right":
        out = flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
    else:
        out = _key_padding(q, k, v, kind[1], scale)
    out = out.transpose(1, 2)
    return out.squeeze(1) if three_d else out


@contextlib.contextmanager
def sdpa_override() -> Iterator[None]:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to fastinfer's for this scope.

    The previous function is put back on exit, also when the body raises; nesting is safe (each
    level restores what it found). The patch is process-wide, not per thread, and reaches code
    that looks the function up as ``F.scaled_dot_product_attention`` at call time (as torch.nn
    modules and transformers' "sdpa" attention do), not names bound earlier with
    ``from torch.nn.functional import scaled_dot_product_attention``.

    Example
    -------
    >>> import torch, torch.nn.functional as F, fastinfer
    >>> with fastinfer.sdpa_override():
    ...     F.scaled_dot_product_attention is fastinfer.scaled_dot_product_attention
    True
    """
    functional = torch.nn.functional
    previous = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = previous
