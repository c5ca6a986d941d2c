"""Hugging Face transformers: ``attn_implementation="fastinfer"``.

    import fastinfer
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastinfer")

Two registrations, under the name ``"fastinfer"``:

* ``AttentionInterface``: :func:`fastinfer_attention_forward`, called by every attention layer
  with (batch, heads, seq, dim) tensors; returns (batch, seq, heads, dim) like the built-in
  implementations.
* ``AttentionMaskInterface``: transformers' own ``flash_attention_mask``. Without a mask
  function a custom implementation gets no mask at all (transformers 5 skips mask creation
  for names it does not know), and padding would be lost. With it the layers receive what
  flash-attention gets: None when nothing is padded, else the 2-D (batch, kv_len) padding mask.

Padding is handled the flash-attention way: unpad q/k/v with the 2-D mask, run the varlen
kernel, scatter the rows back (padded query rows are zeros). Packed sequences (batch 1 with
``position_ids`` restarting at each sequence, or explicit ``cu_seq_lens_q/k`` kwargs) also run
varlen. ``sliding_window`` and ``softcap`` go to the kernels' window and softcap, as in
transformers' flash-attention integration. A 4-D mask a caller built by hand goes through
:func:`fastinfer.scaled_dot_product_attention` (kernels for causal/padding masks, torch's SDPA
with a warning otherwise).

Registration without importing transformers: ``import fastinfer`` calls :func:`install`,
which registers at once if ``transformers.modeling_utils`` is already imported, and otherwise
puts a one-shot finder on ``sys.meta_path`` that registers right after
``transformers.modeling_utils`` finishes executing. That module defines AttentionInterface and
is imported before any model class exists, so the registration is in place for every
``from_pretrained``; hooking the package itself would be too early (``transformers`` is a
lazy module: registering then would force the multi-second import of modeling_utils on users
who only wanted a tokenizer). The hook costs one string comparison per import and needs no
changes in transformers. :func:`register` does the same explicitly.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import Any, Callable, Optional

from fastinfer.kernels import attention as _attention

NAME = "fastinfer"
_TRIGGER = "transformers.modeling_utils"
_registered = False

__all__ = ["NAME", "fastinfer_attention_forward", "register", "install"]


# ----------------------------------------------------------------------------- the attention function


def _window(sliding_window: Optional[int]) -> tuple[int, int]:
    # transformers' sliding window: key j is visible from query i iff i - j < sliding_window
    # (masking_utils.sliding_window_overlay); its flash path passes (w - 1, w - 1) with causal.
    if sliding_window is None:
        return (-1, -1)
    return (int(sliding_window) - 1, int(sliding_window) - 1)


def _unpad_index(mask):
    """Flat indices of the kept rows of a (batch, len) mask, cu_seqlens and the longest length."""
    import torch

    mask = mask.bool()
    lens = mask.sum(-1, dtype=torch.int32)
    idx = mask.flatten().nonzero().flatten()
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = lens.cumsum(0)
    return idx, cu, int(lens.max()) if lens.numel() else 0


def _rows(x, idx):
    """(batch, len, heads, dim) -> the rows idx of its (batch * len, heads, dim) flattening."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, idx)


def _packed_by_position_ids(position_ids, batch: int, lq: int, lk: int) -> bool:
    """Several sequences packed in one row (transformers' flash rule): batch 1, no cache, and
    positions that are not one increasing run."""
    import torch

    if position_ids is None or batch != 1 or lq == 1 or lq != lk or torch.compiler.is_compiling():
        return False
    pos = position_ids.reshape(-1)
    return bool((torch.arange(pos.numel(), device=pos.device) + pos.min() != pos).any())


def _cu_from_position_ids(position_ids):
    import torch

    pos = position_ids.reshape(-1)
    starts = (pos == pos.min()).nonzero().flatten().to(torch.int32)  # each sequence restarts at the minimum
    if int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=torch.int32, device=pos.device), starts])
    cu = torch.cat([starts, torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)])
    return cu, int(cu.diff().max())


def fastinfer_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                                softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                                **kwargs: Any):
    """transformers attention function: query (B, H, Lq, D), key/value (B, Hk, Lk, D).

    Returns (attn_output (B, Lq, H, D), None); attention weights are never materialised.
    """
    import torch

    if dropout and dropout > 0:
        raise NotImplementedError(f"attn_implementation='fastinfer': attention dropout {dropout} is not supported "
                                  f"(the kernels have none); set the config's attention_dropout to 0 or use 'sdpa'")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attn_implementation='fastinfer': attention sinks (s_aux) are not supported")
    if kwargs.get("output_attentions"):
        warnings.warn("attn_implementation='fastinfer' does not return attention weights (they are never "
                      "materialised); use 'eager' for output_attentions=True", stacklevel=2)
    causal = bool(module.is_causal if is_causal is None else is_causal)
    batch, _, lq, _ = query.shape
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, L, H, D) views
    opts = dict(softmax_scale=scaling, causal=causal, window_size=_window(sliding_window),
                softcap=float(softcap or 0.0), deterministic=bool(kwargs.get("deterministic") or False))

    if attention_mask is not None and attention_mask.dim() == 4:  # a mask built by the caller
        from fastinfer.sdpa import scaled_dot_product_attention

        if sliding_window is not None or softcap:
            raise NotImplementedError("attn_implementation='fastinfer': a 4-D attention mask together with "
                                      "sliding_window or softcap")
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                           enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None

    if attention_mask is not None:  # (B, Lk) padding mask: unpad, varlen, pad back
        mask = attention_mask
        if k.shape[1] > mask.shape[-1]:  # a static cache longer than the tokens seen
            k, v = k[:, :mask.shape[-1]], v[:, :mask.shape[-1]]
        idx_k, cu_k, max_k = _unpad_index(mask)
        if lq == k.shape[1]:
            idx_q, cu_q, max_q = idx_k, cu_k, max_k
        elif lq == 1:
            idx_q = torch.arange(batch, device=q.device)
            cu_q, max_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device), 1
        else:  # new queries are the last lq positions (left padding, as transformers' flash path assumes)
            idx_q, cu_q, max_q = _unpad_index(mask[:, -lq:])
        out = _attention.flash_attn_varlen_func(_rows(q, idx_q), _rows(k, idx_k), _rows(v, idx_k), cu_q, cu_k, max_q,
                                                max_k, **opts)
        full = out.new_zeros(batch * lq, *out.shape[1:])
        full = full.index_copy(0, idx_q, out)
        return full.view(batch, lq, *out.shape[1:]), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:  # padding-free training with precomputed lengths
        max_q = kwargs.get("max_length_q") or int(cu_q.diff().max())
        max_k = kwargs.get("max_length_k") or int(cu_k.diff().max())
        cu_q, cu_k, max_q, max_k = cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    elif _packed_by_position_ids(kwargs.get("position_ids"), batch, lq, k.shape[1]):
        cu_q, max_q = _cu_from_position_ids(kwargs["position_ids"])
        cu_k, max_k = cu_q, max_q
    else:
        return _attention.flash_attn_func(q, k, v, **opts), None
    out = _attention.flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                            v.reshape(-1, *v.shape[2:]), cu_q, cu_k, max_q, max_k, **opts)
    return out.view(batch, lq, *out.shape[1:]), None


# ----------------------------------------------------------------------------- registration


def register() -> None:
    """Register "fastinfer" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _registered
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, fastinfer_attention_forward)
    try:  # transformers >= 4.53; before it, custom implementations get the 4-D mask (handled above)
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError:
        pass
    else:
        AttentionMaskInterface.register(NAME, flash_attention_mask)
    _registered = True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for one module name, wraps the real loader so `callback` runs once
    the module has executed; then removes itself from sys.meta_path."""

    def __init__(self, fullname: str, callback: Callable[[], None]):
        self.fullname = fullname
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.fullname:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        self.remove()
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, callback: Callable[[], None]):
        self.loader = loader
        self.callback = callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module keeps its real loader; only this one execution passes through here.
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.callback()
        except Exception as err:  # never break the user's import of transformers
            warnings.warn(f"fastinfer could not register attn_implementation='fastinfer' with transformers: {err!r}",
                          RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


_hook: Optional[_AfterImport] = None


def install() -> None:
    """Register now if transformers' modeling_utils is loaded, else as soon as it is (see the module doc)."""
    global _hook
    if _registered or (_hook is not None and _hook in sys.meta_path):
        return
    if _TRIGGER in sys.modules:
        register()
        return
    _hook = _AfterImport(_TRIGGER, register)
    sys.meta_path.insert(0, _hook)
