"""Old path of the flash-attn API, kept only until models/layers.py imports ``fastinfer.kernels.attention``.

Re-exports the public functions of ``fastinfer.kernels.attention`` (same objects); new code
imports them from ``fastinfer`` or ``fastinfer.kernels.attention``.
"""

from fastinfer.kernels.attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                         flash_attn_varlen_func, flash_attn_with_kvcache)

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func"]
