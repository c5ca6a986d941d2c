"""fastinfer: fused flash attention and a paged KV cache for CPU and CUDA.

The kernel API mirrors flash-attn, so ``from fastinfer import flash_attn_func``
is a drop-in swap. Inputs may be torch tensors or numpy arrays (anything with
``__dlpack__``); outputs come back in the same framework as ``q``.

torch users also get (imported on first use, so ``import fastinfer`` needs no torch):
``scaled_dot_product_attention`` and ``sdpa_override()`` (torch's SDPA signature on these
kernels, see fastinfer.sdpa), ``torch_ops`` (torch.library custom ops: autograd and
torch.compile), and ``attn_implementation="fastinfer"`` in Hugging Face transformers
(registered when transformers loads its modeling code, see fastinfer.integrations.transformers).
"""

from __future__ import annotations

import os
import warnings

from fastinfer import _C, ops
from fastinfer.integrations import transformers as _hf_transformers
from fastinfer.attention import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
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
         "LLM": "fastinfer.llm", "SamplingParams": "fastinfer.engine.sampling_params",
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
    "RequestOutput",
    "CompletionOutput",
    "build_info",
    "cuda_available",
    "set_cpu_isa",
    "get_cpu_isa",
    "set_num_threads",
    "get_num_threads",
]


def build_info() -> dict:
    """How this copy of fastinfer was built and what it runs on.

    Keys: ``version``, ``compiler``, ``cuda_compiled``, ``cuda_archs`` (e.g. ``"80,90a"``),
    ``cuda_runtime_version``, ``cpu_isa`` (SIMD level in use), ``cpu_isa_best``
    (best level this CPU supports), ``num_threads``.
    """
    return dict(_C.build_info())


def cuda_available() -> bool:
    """True when the CUDA part was compiled in and a CUDA device is usable."""
    return bool(_C.build_info()["cuda_compiled"]) and _C.cuda_device_count() > 0


def set_cpu_isa(name: str) -> None:
    """Force the CPU SIMD level: ``"auto"``, ``"scalar"``, ``"avx2"``, ``"avx512"``, ``"avx512_bf16"`` or ``"amx"``.

    The environment variable ``FASTINFER_CPU_ISA`` sets the same at import time.
    Raises ValueError for a level this CPU does not support.
    """
    _C.set_cpu_isa(name)


def get_cpu_isa() -> str:
    """The CPU SIMD level the kernels use now."""
    return _C.cpu_isa()


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels; ``n <= 0`` restores the default
    (``FASTINFER_NUM_THREADS``, else every CPU this process may run on)."""
    _C.set_num_threads(int(n))


def get_num_threads() -> int:
    return _C.num_threads()
