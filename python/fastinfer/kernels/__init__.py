"""Kernel wrappers: the Python layer between callers and the native extension ``fastinfer._C``.

==============  ==========================================================================
``attention``   the flash-attn compatible API (public as ``fastinfer.flash_attn_*``)
``forward``     the attention forward kernel calls, shared by the API and ``fastinfer.torch_ops``
``backward``    the attention backward kernel call
``options``     the one builder of the attention kernels' options
``ops``         cache write, CPU linear, norms, activations, rotary (public as ``fastinfer.ops``)
``arrays``      framework-neutral array helpers (checks, conversions, allocation, DLPack views)
``runtime``     build info, CUDA availability, CPU ISA and threads (re-exported by ``fastinfer``)
==============  ==========================================================================

None of these imports torch at import time, nor the package's ``__init__``. The torch custom ops
(``fastinfer.torch_ops``) import ``forward``, ``backward``, ``options`` and ``arrays``; only
``attention`` and ``ops`` import ``torch_ops``, lazily, so there is no cycle.
"""
