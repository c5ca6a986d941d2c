// Entry points of the CUDA backend (csrc/cuda) that the binding layer calls: attention forward
// and backward, KV-cache writes and appends, runtime information. Only in builds with
// FASTINFER_WITH_CUDA. The declarations live beside the kernels (framework-free, cuda_runtime only).
#pragma once
#if defined(FASTINFER_WITH_CUDA)
#include "cuda/attention_bwd.h"
#include "cuda/attention_cuda.h"
#include "cuda/cuda_runtime_info.h"
#endif
