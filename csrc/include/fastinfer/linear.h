// Framework-free description of one dense projection y = x @ W^T (+ bias) on the CPU,
// with W pre-packed once (at model load) into the layout the kernels stream.
//
// Packed layout: outputs in panels of kLinearPanel (64) rows of W, zero-padded to whole panels.
//  bf16:    [panels][ceil(K/2)][64][2]: the weights of 64 outputs at inputs k, k+1 side by side,
//           so one 64-byte load feeds one AVX-512 BF16 pair-dot for 16 outputs.
//  float32: [panels][K][64]: the weights of 64 outputs at input k.
// A panel is contiguous, so a thread reading one streams memory in order (decode is bound by this read).
#pragma once
#include <cstdint>

#include "fastinfer/attention.h"  // DType, FI_ALWAYS_INLINE

namespace fastinfer {

constexpr int kLinearPanel = 64;

FI_ALWAYS_INLINE int64_t linear_panels(int64_t n) { return (n + kLinearPanel - 1) / kLinearPanel; }
// Inputs as packed: bf16 stores K rounded up to even (a zero weight pads odd K).
FI_ALWAYS_INLINE int64_t linear_packed_k(int64_t k, DType t) { return t == DType::kBFloat16 ? (k + 1) / 2 * 2 : k; }
// Elements of the packed weight of an (n, k) matrix.
FI_ALWAYS_INLINE int64_t linear_packed_numel(int64_t n, int64_t k, DType t) {
  return linear_panels(n) * kLinearPanel * linear_packed_k(k, t);
}

struct LinearParams {
  DType dtype;          // of x, w_packed and bias (float32 or bfloat16); accumulation is float32
  DType out_dtype;      // of out: dtype, or float32 (logits straight from a bf16 head, no extra pass)
  int64_t m, n, k;      // x (m, k), W (n, k), out (m, n)
  const void* x;        // row i at x + i * x_row_stride, elements contiguous
  int64_t x_row_stride;
  const void* w_packed;  // linear_packed_numel(n, k, dtype) elements, layout above
  const void* bias;     // (n,) or null
  void* out;            // row i at out + i * out_row_stride, elements contiguous
  int64_t out_row_stride;
};

struct LinearPackParams {
  DType dtype;
  int64_t n, k;
  const void* w;        // row j at w + j * w_row_stride, elements contiguous
  int64_t w_row_stride;
  void* packed;         // linear_packed_numel(n, k, dtype) elements
};

}  // namespace fastinfer
