"""Low-level ops for the engine (vLLM's meanings, flash-attn's cache layout)."""

from __future__ import annotations

import sys
from typing import Any

from fastinfer import _C
from fastinfer._arrays import as_index, kernel_view, launch_kwargs


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
        from fastinfer import torch_ops

        torch.ops.fastinfer.reshape_and_cache(key, value, k_cache, v_cache,
                                              torch_ops._index(slot_mapping, key, torch.int64))
        return
    stream = launch_kwargs(key).get("stream", 0)
    _C.reshape_and_cache(kernel_view(key), kernel_view(value), kernel_view(k_cache), kernel_view(v_cache),
                         kernel_view(as_index(slot_mapping, key, "int64", name="slot_mapping")), stream=stream)
