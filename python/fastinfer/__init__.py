"""fastinfer: fused flash attention and a paged KV cache for CPU and CUDA.

The kernel API mirrors flash-attn, so ``from fastinfer import flash_attn_func``
is a drop-in swap. Inputs may be torch tensors or numpy arrays (anything with
``__dlpack__``); outputs come back in the same framework as ``q``.

torch users also get (imported on first use, so ``import fastinfer`` needs no torch):
``scaled_dot_product_attention`` and ``sdpa_override()`` (torch's SDPA signature on these
kernels, see fastinfer.sdpa), ``torch_ops`` (torch.library custom ops: autograd and
torch.compile), and ``attn_implementation="fastinfer"`` in Hugging Face transformers
(registered when transformers loads its modeling code, see fastinfer.integrations.transformers).

The kernel wrappers (flash-attn API, ops, backward, options, array helpers) live in
``fastinfer.kernels``; this module re-exports their public names.
"""

from __future__ import annotations

import os
import warnings

from fastinfer import _C, ops
from fastinfer.integrations import transformers as _hf_transformers
from fastinfer.kernels.attention import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from fastinfer.kernels.runtime import (
    build_info,
    cuda_available,
    get_cpu_isa,
    get_num_threads,
    set_cpu_isa,
    set_num_threads,
)

__version__: str = _C.build_info()["version"]

if os.environ.get("FASTINFER_CPU_ISA"):
    # The extension falls back to the best level on a bad value; say so instead of doing it silently.
    try:
        _C.set_cpu_isa(os.environ["FASTINFER_CPU_ISA"])
    except ValueError as err:
        warnings.warn(f"FASTINFER_CPU_ISA ignored, using {_C.cpu_isa()!r}: {err}", RuntimeWarning, stacklevel=2)

# attn_implementation="fastinfer": now if transformers' modeling code is loaded, else when it loads.
_hf_transformers.install()

_LAZY = {"scaled_dot_product_attention": "fastinfer.sdpa", "sdpa_override": "fastinfer.sdpa",
         "SDPAFallbackWarning": "fastinfer.sdpa", "torch_ops": None,
         "LLM": "fastinfer.entrypoints.llm", "SamplingParams": "fastinfer.engine.sampling_params",
         "StructuredOutputsParams": "fastinfer.engine.structured_outputs",
         "RequestOutput": "fastinfer.engine.outputs", "CompletionOutput": "fastinfer.engine.outputs"}


def __getattr__(name: str):
    # torch-only parts: imported on first access so that numpy users never import torch.
    if name not in _LAZY:
        raise AttributeError(f"module 'fastinfer' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name] or f"fastinfer.{name}")
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "ops",
    "scaled_dot_product_attention",
    "sdpa_override",
    "SDPAFallbackWarning",
    "torch_ops",
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "build_info",
    "cuda_available",
    "set_cpu_isa",
    "get_cpu_isa",
    "set_num_threads",
    "get_num_threads",
]
