"""Old path of the array helpers, kept only until models/cpu_decoder.py imports ``fastinfer.kernels.arrays``.

Re-exports ``fastinfer.kernels.arrays`` (same objects); new code imports from there.
"""

from fastinfer.kernels.arrays import (as_float32, as_index, empty_float32, empty_like, float_arg, int_arg, is_torch,
                                      kernel_view, launch_kwargs, require_array, window_arg)

__all__ = ["as_float32", "as_index", "empty_float32", "empty_like", "float_arg", "int_arg", "is_torch", "kernel_view",
           "launch_kwargs", "require_array", "window_arg"]
