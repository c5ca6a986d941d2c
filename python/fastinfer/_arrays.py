"""Framework-neutral helpers: allocate outputs like the inputs (torch or numpy).

torch is imported lazily and only when the caller passes torch tensors, so the
raw kernel API works with numpy alone.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


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
    if is_torch(x):
        import torch

        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name}: expected dtype {dtype}, got {x.dtype}")
        want = torch.int32 if dtype == "int32" else torch.int64
        return x if x.dtype == want else x.to(want)
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected dtype {dtype}, got {arr.dtype}")
    if isinstance(x, np.ndarray) or not is_torch(like):
        return arr if arr.dtype == np.dtype(dtype) else arr.astype(dtype)
    import torch

    return torch.as_tensor(arr, dtype=torch.int32 if dtype == "int32" else torch.int64, device=like.device)


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
