"""How the native kernels were built and how they run: build info, CUDA availability, CPU ISA, threads.

Re-exported by ``fastinfer`` (``fastinfer.build_info()``, ...); modules inside the package import
them from here, so that none of them imports the package's ``__init__``.
"""

from __future__ import annotations

import warnings

from fastinfer import _C

__all__ = ["build_info", "cuda_available", "set_cpu_isa", "get_cpu_isa", "set_num_threads", "get_num_threads"]


def build_info() -> dict:
    """How this copy of fastinfer was built and what it runs on.

    Keys: ``version``, ``compiler``, ``cuda_compiled``, ``cuda_archs`` (e.g. ``"80,90a"``),
    ``cuda_runtime_version``, ``cpu_isa`` (SIMD level in use), ``cpu_isa_best``
    (best level this CPU supports), ``num_threads``.
    """
    return dict(_C.build_info())


_warned_devices: set = set()  # problems already reported by cuda_available's one-time warnings


def cuda_available() -> bool:
    """True when the CUDA part was compiled in and a CUDA device can run its kernels.

    fastinfer's CUDA kernels need compute capability 8.0 or newer (and a device that the compiled
    architectures, ``build_info()["cuda_archs"]``, can run on). A device that cannot is not usable:
    when no device is, this returns False and warns once per device saying why (fastinfer then runs
    on the CPU where the caller picks the device from this); when some are, it returns True and warns
    once per unusable device, and a kernel call on one of those raises RuntimeError with the same
    reason. ``fastinfer._C.cuda_arch_problem`` is the check itself, a pure function.
    """
    if not _C.build_info()["cuda_compiled"]:
        return False
    count = _C.cuda_device_count()
    problems = [_C.cuda_device_problem(d) for d in range(count)]
    bad = [p for p in problems if p]
    for problem in bad:
        if problem not in _warned_devices:
            _warned_devices.add(problem)
            then = ("cuda_available() is False" if len(bad) == count
                    else "calls on that device raise RuntimeError")
            warnings.warn(f"{problem}: {then}", RuntimeWarning, stacklevel=2)
    return len(bad) < count


def set_cpu_isa(name: str) -> None:
    """Force the CPU SIMD level: ``"auto"``, ``"scalar"``, ``"avx2"``, ``"avx_vnni"``, ``"avx512"``, ``"avx512_bf16"``
    or ``"amx"`` (lowest first; ``"avx_vnni"``, AVX2 with VEX int8 dot products for the quantised linear, is
    missing on the AVX-512 CPUs before Sapphire Rapids).

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
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU kernels use now."""
    return _C.num_threads()
