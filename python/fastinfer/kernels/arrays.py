"""Framework-neutral array helpers of the kernel wrappers: argument checks, index/float conversions,
outputs allocated like the inputs (torch or numpy), the views and launch arguments the kernels take.

torch is imported lazily and only when the caller passes torch tensors, so the
raw kernel API works with numpy alone.
"""

from __future__ import annotations

import math
import operator
import sys
from typing import Any, Sequence

import numpy as np

INT32_MAX = 2**31 - 1
_INT_RANGE = {"int32": (-2**31, INT32_MAX), "int64": (-2**63, 2**63 - 1)}


def int_arg(x: Any, name: str, lo: int = 0, hi: int = INT32_MAX) -> int:
    """An integer argument (a Python, numpy or 0-d torch integer; not a bool or a float) in [lo, hi].

    The kernels take C ints: checked here so that a bad value names its argument instead of
    failing in pybind's conversion ("incompatible function arguments") or being truncated."""
    if isinstance(x, (bool, np.bool_)) or not hasattr(type(x), "__index__"):
        raise TypeError(f"{name}: expected an int in [{lo}, {hi}], got {x!r} ({type(x).__name__})")
    try:
        v = operator.index(x)
    except TypeError as err:  # e.g. a tensor of several elements or of a float dtype
        raise TypeError(f"{name}: expected an int in [{lo}, {hi}], got {x!r}: {err}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {v}")
    return v


def float_arg(x: Any, name: str, finite: bool = True) -> float:
    """A real-number argument (int, float, numpy or 0-d torch number; not a bool or a string) as a float."""
    if isinstance(x, (bool, np.bool_, str, bytes)) or not hasattr(type(x), "__float__"):
        raise TypeError(f"{name}: expected a number, got {x!r} ({type(x).__name__})")
    try:
        v = float(x)
    except (OverflowError, TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a number representable as a float, got {x!r}: {err}") from None
    if finite and not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    return v


def window_arg(window_size: Any) -> tuple[int, int]:
    """flash-attn's window_size: (left, right), each -1 (unbounded) or a key count that fits an int32."""
    want = "two ints in [-1, 2**31-1] (-1 = unbounded)"
    try:
        pair = tuple(window_size)
    except TypeError:
        raise TypeError(f"window_size: expected {want}, got {window_size!r}") from None
    if len(pair) != 2:
        raise ValueError(f"window_size: expected {want}, got {window_size!r}")
    for w in pair:
        if isinstance(w, (bool, np.bool_)) or not hasattr(type(w), "__index__"):
            raise TypeError(f"window_size: expected {want}, got {window_size!r}")
    left, right = (operator.index(w) for w in pair)
    if not (-1 <= left <= INT32_MAX and -1 <= right <= INT32_MAX):
        raise ValueError(f"window_size: expected {want}, got ({left}, {right})")
    return left, right


def is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


_torch_tensor: Any = None  # torch.Tensor and torch's C DLPack exporter, once torch is imported
_to_dlpack: Any = None


def kernel_view(x: Any) -> Any:
    """What the kernels receive. torch tensors go as DLPack capsules: torch's C exporter costs
    about 0.2 us where Tensor.__dlpack__ (Python code) costs about 2 us, per tensor per call;
    detached first, as DLPack refuses tensors that track gradients. (A model step converts about
    a thousand tensors, so this function is kept to a type check and the export.)"""
    global _torch_tensor, _to_dlpack
    if x is None:
        return x
    if _torch_tensor is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return x
        from torch.utils.dlpack import to_dlpack

        _torch_tensor, _to_dlpack = torch.Tensor, to_dlpack
    if isinstance(x, _torch_tensor):
        return _to_dlpack(x.detach() if x.requires_grad else x)
    return x


def empty_like(x: Any) -> Any:
    if is_torch(x):
        import torch

        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return np.empty(x.shape, dtype=x.dtype)


def empty_float32(like: Any, shape: tuple[int, ...]) -> Any:
    if is_torch(like):
        import torch

        return torch.empty(shape, dtype=torch.float32, device=like.device)
    return np.empty(shape, dtype=np.float32)


def launch_kwargs(x: Any) -> dict:
    """Stream and workspace allocator for a GPU call on x's device (empty for CPU arrays).

    Kernels run on torch's current stream, and split-KV scratch is allocated by torch's
    caching allocator on that stream, so nothing synchronises and nothing leaks.
    """
    if not (is_torch(x) and x.is_cuda):
        return {}
    import torch

    device = x.device
    return {
        "stream": torch.cuda.current_stream(device).cuda_stream,
        "workspace_alloc": lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device=device),
    }


def require_array(x: Any, name: str) -> None:
    """Outputs are allocated from q's shape, so q must be an array before the kernel's own checks run."""
    if not (hasattr(x, "__dlpack__") and hasattr(x, "shape")):
        raise TypeError(f"{name}: expected a tensor or array supporting DLPack (torch.Tensor, numpy.ndarray, ...), "
                        f"got {type(x).__name__}")


def as_index(x: Any, like: Any, dtype: str = "int32", name: str = "index") -> Any:
    """Index tensors (cu_seqlens, block tables, ...) in the dtype the kernels read.

    Python ints/lists become arrays of q's framework; other integer dtypes are converted;
    anything else (floats, bools) is refused rather than silently truncated.
    """
    if x is None:
        return None
    lo, hi = _INT_RANGE[dtype]
    if is_torch(x):
        import torch

        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name}: expected dtype {dtype}, got {x.dtype}")
        want = torch.int32 if dtype == "int32" else torch.int64
        if x.dtype == want:
            return x
        # A narrowing conversion would wrap values silently; host values are checked (device
        # ones are not read here, that would synchronise: the kernels bound them instead).
        if not x.is_cuda and x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
            raise ValueError(f"{name}: values must fit {dtype}, got values in [{int(x.min())}, {int(x.max())}]")
        return x.to(want)
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind not in "iu":
        # Python ints beyond int64 become an object array
        raise TypeError(f"{name}: expected dtype {dtype}, got {arr.dtype}" +
                        (" (integers too large for int64)" if arr.dtype == object else ""))
    if arr.dtype != np.dtype(dtype) and arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise ValueError(f"{name}: values must fit {dtype}, got values in [{int(arr.min())}, {int(arr.max())}]")
    if isinstance(x, np.ndarray) or not is_torch(like):
        return arr if arr.dtype == np.dtype(dtype) else arr.astype(dtype)
    import torch

    return torch.as_tensor(arr, dtype=torch.int32 if dtype == "int32" else torch.int64, device=like.device)


def as_index_traceable(x: Any, like: Any, dtype: str = "int32", name: str = "index") -> Any:
    """:func:`as_index` for the torch custom-op paths, which torch.compile may trace.

    While tracing, a torch tensor's values are unknown: its dtype is checked and converted, and
    the kernels' checks see the values when the op runs. Otherwise exactly :func:`as_index`.
    """
    if x is None:
        return None
    if is_torch(x):
        import torch

        want = torch.int32 if dtype == "int32" else torch.int64
        if x.dtype == want:
            return x
        if torch.compiler.is_compiling():
            if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                raise TypeError(f"{name}: expected dtype {dtype}, got {x.dtype}")
            return x.to(want)
    return as_index(x, like, dtype, name=name)


def as_float32(x: Any, like: Any) -> Any:
    if x is None:
        return None
    if is_torch(x):
        import torch

        return x if x.dtype == torch.float32 else x.float()
    if isinstance(x, np.ndarray):
        return x if x.dtype == np.float32 else x.astype(np.float32)
    if is_torch(like):
        import torch

        return torch.as_tensor(x, dtype=torch.float32, device=like.device)
    return np.asarray(x, dtype=np.float32)
