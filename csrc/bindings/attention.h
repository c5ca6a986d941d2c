// What the attention bindings (attention.cpp, backward.cpp, kv_cache.cpp) share: the options object,
// the tensors of one call, where it runs (Launch), and make_params, which checks them all once.
#pragma once
#include <cstdint>

#include "bindings/checks.h"
#include "fastinfer/attention.h"
#include "fastinfer/cuda.h"

#if defined(FASTINFER_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace fastinfer::bindings {

// Where and how a call runs. Index arrays on a GPU are not read by the host (that would
// synchronise): their values are bounded by the kernels instead, using these sizes.
struct Launch {
  int device = -1;        // CUDA device id, -1 = CPU
  uintptr_t stream = 0;   // cudaStream_t of the caller (torch's current stream)
  py::object workspace_alloc;  // callable(nbytes) -> device buffer, or None
  int64_t q_rows = 0, kv_rows = 0, block_table_cols = 0;
  int max_seqlen_q = 0, max_seqlen_k = 0, seqlens_k_add = 0;
  bool on_host() const { return device < 0; }
};

#if defined(FASTINFER_WITH_CUDA)
// Runs a CUDA call on the tensors' device, restoring the caller's current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (device != previous_) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};
#endif

// Options of an attention call (fastinfer._C.AttentionOptions); setters check each value by name.
struct AttentionOptions {
  float softmax_scale = 0.f;
  float softcap = 0.f;
  int window_left = -1, window_right = -1;
  int num_splits = 0;
  int max_seqlen_q = 0, max_seqlen_k = 0;  // hints for GPU launches (0 = unknown); the CPU derives lengths itself
};

// The tensors of one attention call, viewed once. seqlens_k_override (lengths computed
// by the binding, e.g. after an append) replaces seqlens_k when set.
struct AttentionTensors {
  TensorView q, k, v, out;
  OptTensor lse, cu_q, cu_k, seqlens_k, kv_idx, block_table, alibi;
  const int32_t* seqlens_k_override = nullptr;
};


// Checks every tensor and option of an attention call and describes it for the kernels; fills
// the launch's device and sizes. Raises before anything is written.
AttentionParams make_params(const AttentionTensors& in, const AttentionOptions& opt, Launch& launch);
// Runs the forward on the launch's device (zero rows outside a padded varlen batch on the CPU).
void run_attention(const AttentionParams& p, const TensorView& q, const Launch& launch);
#if defined(FASTINFER_WITH_CUDA)
cuda::AttentionExtras cuda_extras(const Launch& launch);
#endif

}  // namespace fastinfer::bindings
