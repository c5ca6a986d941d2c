// CUDA attention backward (host API). Framework-free like attention_cuda.h: launches on the
// given stream, never allocates device memory, never synchronises.
//
// Three kernels (attention_bwd_kernel.cuh): delta = rowsum(dO * O) into the workspace; dK/dV,
// one block per (key tile of 64, kv head, sequence) visiting every query row of the GQA group
// that sees those keys; dQ, one block per (tile of packed query rows, kv head, sequence).
// Each output element is written by exactly one thread, so results are always bitwise
// reproducible (deterministic=true is honoured without a separate code path; there is no
// atomic dQ accumulation). Then, for varlen tensors, rows outside every sequence are zeroed.
//
// Supported: float16/bfloat16, the head dims compiled for the forward, dense and varlen
// layouts (no paged cache, no kv_batch_idx, no seqlens_k). Device index arrays follow the
// forward's safety contract (attention_cuda.h): lengths are clamped by AttentionExtras sizes.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/attention_cuda.h"
#include "fastinfer/attention_backward.h"

namespace fastinfer::cuda {

// Bytes of device workspace attention_backward needs (the float32 delta per query row and head).
size_t attention_backward_workspace_bytes(const AttentionBackwardParams& p, const AttentionExtras& x);
// Throws std::invalid_argument for unsupported configurations (float32, head dim not compiled in,
// paged/kv_batch_idx/seqlens_k, a workspace smaller than attention_backward_workspace_bytes).
void attention_backward(const AttentionBackwardParams& p, const AttentionExtras& x, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

}  // namespace fastinfer::cuda
