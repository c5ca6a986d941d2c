// Framework-free description of one attention backward call (flash-attention's
// algorithm: P is recomputed from the saved log-sum-exp, D = rowsum(dO * O)).
// The binding layer fills it after validating every tensor; kernels only read it.
#pragma once
#include <cstdint>

#include "fastinfer/attention.h"

namespace fastinfer {

// Gradients of attention_forward for the dense and varlen layouts (no paged cache,
// no kv_batch_idx, no seqlens_k). `fwd` describes the forward call exactly as it ran:
// q, k, v, out (the forward output O), lse (read, natural log, +inf = row saw no key),
// options. Strides are in elements, the last one is always 1.
struct AttentionBackwardParams {
  AttentionParams fwd;

  const void* dout;  // dO: layout of q (batch/row/head strides)
  int64_t do_batch_stride, do_row_stride, do_head_stride;

  void* dq;  // layout of q
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  void* dk;  // layout of k (dense or varlen)
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  void* dv;  // layout of v
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

  // Rows of the packed (varlen) tensors, so that rows outside every sequence are zeroed.
  int64_t total_q, total_k;

  // Bitwise reproducible results. The CPU kernels always are (each output element is
  // written by one task, in a fixed order); CUDA then runs a separate dQ pass instead
  // of accumulating dQ with atomics.
  bool deterministic;
};

}  // namespace fastinfer
