// Framework-free description of a projection y = x @ W^T (+ bias) on the CPU whose weight W stays
// quantised in memory: GGUF's block formats, repacked once at load, read as they are at every call.
//
// Supported block formats (GGUF's own bytes in, per row of W):
//   q8_0: 34-byte blocks of 32: f16 d, 32 int8 q;           w = d * q
//   q4_0: 18-byte blocks of 32: f16 d, 16 bytes of nibbles; w = d * (q - 8)
//   q4_1: 20-byte blocks of 32: f16 d, f16 m, 16 bytes;      w = d * q + m
//   (a nibble byte j holds element j in its low half and element j + 16 in its high half)
//
// Packed layout: outputs in panels of kLinearPanel (64) rows, zero-padded to whole panels, as the
// float linear; a panel is 8 sub-panels of kQRows (8) rows, and a sub-panel is, per 32-block b of
// the inputs: the 8 rows' values (q8: 32 bytes each, q4: 16 bytes each), then their 8 f16 scales
// d, then (q4) their 8 f16 offsets m (q4_0: m = -8 d). One activation block thus feeds 8 output rows
// from one contiguous stream, and a thread's panels are contiguous memory.
//
// The activations are quantised on the fly to int8 per 32-block (scale = max|x| / 127, round to
// nearest), as ggml does; the dot products are exact integer sums, scaled once per block.
#pragma once
#include <cstdint>

#include "fastinfer/linear.h"

namespace fastinfer {

enum class QType : int { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };

constexpr int kQBlock = 32;  // elements per quantisation block (weights and activations)
constexpr int kQRows = 8;    // rows of a sub-panel

// Bytes of one GGUF block of `t` (32 elements).
FI_ALWAYS_INLINE int64_t qtype_block_bytes(QType t) { return t == QType::kQ8_0 ? 34 : t == QType::kQ4_0 ? 18 : 20; }
// Bytes of one row's values in a packed block, and of one packed block of a whole sub-panel.
FI_ALWAYS_INLINE int qtype_value_bytes(QType t) { return t == QType::kQ8_0 ? 32 : 16; }
FI_ALWAYS_INLINE bool qtype_has_offset(QType t) { return t != QType::kQ8_0; }
FI_ALWAYS_INLINE int64_t qpacked_block_bytes(QType t) {
  return kQRows * (qtype_value_bytes(t) + 2 + (qtype_has_offset(t) ? 2 : 0));
}
// Bytes of the packed weight of an (n, k) matrix (k a multiple of kQBlock).
FI_ALWAYS_INLINE int64_t qlinear_packed_bytes(int64_t n, int64_t k, QType t) {
  return linear_panels(n) * (kLinearPanel / kQRows) * (k / kQBlock) * qpacked_block_bytes(t);
}

struct QLinearParams {
  QType qtype;
  DType dtype;          // of x and bias: float32 or bfloat16
  DType out_dtype;      // of out: dtype, or float32
  int64_t m, n, k;      // x (m, k), W (n, k), out (m, n); k a multiple of kQBlock
  const void* x;        // row i at x + i * x_row_stride, elements contiguous
  int64_t x_row_stride;
  const void* w_packed;  // qlinear_packed_bytes(n, k, qtype) bytes, layout above
  const void* bias;     // (n,) or null
  void* out;            // row i at out + i * out_row_stride
  int64_t out_row_stride;
};

struct QLinearPackParams {
  QType qtype;
  int64_t n, k;
  const void* raw;      // row j: k / 32 GGUF blocks at raw + j * raw_row_stride bytes
  int64_t raw_row_stride;
  void* packed;         // qlinear_packed_bytes(n, k, qtype) bytes
};

}  // namespace fastinfer
