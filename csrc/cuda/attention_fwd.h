// Internal interface between the host dispatcher (attention_cuda.cu) and the
// per-head-dim kernel files (attention_fwd_hdim*.cu): the kernel argument block,
// and what each compiled kernel needs to be launched.
#pragma once
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "fastinfer/attention.h"

namespace fastinfer::cuda::detail {

// Longest sequence / window the kernels index (lengths and windows are clamped to it on
// the device / host), so that position arithmetic such as t + sk - sq + window stays in int32.
constexpr int kMaxLen = (1 << 30) - 1;

// Passed by value to the forward kernel. p's pointers are device pointers; p's member
// functions are host-only and are never called on the device.
struct FwdArgs {
  AttentionParams p;
  int group;             // num_heads / num_kv_heads
  int window_left;       // -1, or shorter than the bound of the key lengths (make_plan: normalize_windows)
  int window_right;      // -1, or shorter than the bound of the query lengths; both <= kMaxLen
  int64_t q_rows;        // varlen q bound (AttentionExtras::q_rows)
  int64_t kv_rows;       // bound of the block id / varlen row / kv_batch_idx
  int k_capacity;        // clamp of k_len(b): dense seqlen_k, paged cols*block_size, varlen kv_rows
  int seqlens_k_add;
  FastDiv block_div;     // paged: j / block_size
  float score_scale;     // softcap == 0: softmax_scale*log2(e); else softmax_scale/softcap
  float softcap_log2;    // softcap*log2(e), or 0 when softcap is off
  bool q_aligned;        // q/out/k/v: base pointers and strides allow 16-byte vector accesses
  bool o_aligned;
  bool kv_aligned;
  int num_splits;        // >= 1; > 1 writes partials to ws_o / ws_lse instead of out / lse
  int num_m_slots;       // blocks per (sequence, kv head, split); each loops over the m-blocks
  float* ws_o;           // [split][ws_rows][num_heads][head_dim], normalised partial outputs
  float* ws_lse;         // [split][ws_rows][num_heads], log2 units, -inf when the split saw no key
  int64_t ws_rows;       // dense: batch*seqlen_q; varlen: q_rows
};

struct FwdKernel {
  const void* fn = nullptr;  // __global__ void(FwdArgs)
  int threads = 0;
  int smem_bytes = 0;
  int block_m = 0;  // query rows (GQA-packed: position-major, head-minor) per block
  int block_n = 0;  // keys per tile
};

// Declared per compiled head dim in attention_fwd_hdim<D>.cu. decode: few rows per
// (sequence, kv head), warps split each key tile instead of the rows.
FwdKernel fwd_kernel_hdim64(DType dtype, bool decode);
FwdKernel fwd_kernel_hdim96(DType dtype, bool decode);
FwdKernel fwd_kernel_hdim128(DType dtype, bool decode);
FwdKernel fwd_kernel_hdim256(DType dtype, bool decode);

}  // namespace fastinfer::cuda::detail
