// Framework-free descriptions of the small per-token ops of a decoder layer on the CPU:
// RMSNorm (optionally fused with the residual add), the gated activation, and rotary embedding.
// Each reproduces the roundings of the torch ops it replaces (so greedy outputs match
// Hugging Face's), but in one pass over memory and one call instead of several.
#pragma once
#include <cstdint>

#include "fastinfer/attention.h"  // DType

namespace fastinfer {

// out = x / sqrt(mean(x^2) + eps) * weight, in float32, rounded once to dtype.
// With residual: first h = round(x + residual), written back to residual (the new residual
// stream), and h is normalised instead of x.
struct RmsNormParams {
  DType dtype;            // of x, residual, out (float32 or bfloat16)
  int64_t rows, dim;
  const void* x;          // row i at x + i * x_row_stride
  int64_t x_row_stride;
  void* residual;         // or null; row i at residual + i * residual_row_stride
  int64_t residual_row_stride;
  const float* weight;    // (dim,) float32 multiplier (Gemma's 1 + w precomputed)
  float eps;
  void* out;              // row i at out + i * out_row_stride
  int64_t out_row_stride;
};

enum class Activation : int { kSilu = 0, kGeluTanh = 1 };

// out[i, j] = round(round(act(gate[i, j])) * up[i, j]) with gate = x[i, :dim], up = x[i, dim:2*dim]
// (torch's act then multiply, each rounded to dtype).
struct ActMulParams {
  DType dtype;
  Activation act;
  int64_t rows, dim;
  const void* x;          // (rows, 2 * dim), row stride x_row_stride
  int64_t x_row_stride;
  void* out;              // (rows, dim)
  int64_t out_row_stride;
};

// In place, rotate-half (Hugging Face) layout: for each token t and head h, with c = cos[pos[t]],
// s = sin[pos[t]], x1 = x[t, h, :half], x2 = x[t, h, half:]:
//   x1 <- round(round(x1 c) - round(x2 s)),  x2 <- round(round(x2 c) + round(x1 s))
struct RotaryParams {
  DType dtype;
  int64_t tokens, heads, half;  // half = head_dim / 2
  void* x;                       // element (t, h, d) at x + t * token_stride + h * head_stride + d
  int64_t token_stride, head_stride;
  const void* cos;               // (table_rows, half), contiguous, dtype
  const void* sin;
  const int64_t* positions;      // (tokens,), each in [0, table_rows)
};

}  // namespace fastinfer
