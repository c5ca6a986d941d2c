// Framework-free description of a whole Llama-style decoder stack on the CPU, run as one call
// per step: the Python layer between kernels (about ten calls per layer) costs more than the
// small ops themselves at decode sizes. Each layer is pre-norm:
//   h = attn(rms_norm(x)); x += h; h = mlp(rms_norm(x)); x += h;   final: rms_norm(x)
// with the same kernels and roundings as the per-op path (fastinfer.ops), so results are identical.
#pragma once
#include <cstdint>
#include <vector>

#include "fastinfer/attention.h"
#include "fastinfer/pointwise.h"

namespace fastinfer {

// One projection: a weight packed by linear_pack (see linear.h), or quantised and packed by
// qlinear_pack (qlinear.h); optional bias (n,).
struct PackedProjection {
  const void* w_packed;
  const void* bias;  // or null
  int qtype = -1;    // a QType: w_packed is quantised; -1: float, in the config's dtype
  // A projection quantised in parts of different block types (a fused q/k/v whose v differs): this part
  // holds the first `rows` outputs and `rest` the ones after them. rows 0: this part holds all of them.
  int64_t rows = 0;
  const PackedProjection* rest = nullptr;
};

struct DecoderLayerWeights {
  const float* input_norm;  // (hidden,) float32 multipliers
  const float* post_norm;   // (hidden,)
  PackedProjection qkv;     // (heads + 2 kv_heads) * head_dim outputs: q heads, k heads, v heads
  PackedProjection o;       // heads * head_dim -> hidden
  PackedProjection gate_up; // hidden -> 2 * intermediate (gate, then up)
  PackedProjection down;    // intermediate -> hidden
  int window_left;          // sliding window: keys with q_pos - k_pos <= window_left; -1 = unbounded
  void* k_cache;            // this layer's paged cache: slot s of head h at
  void* v_cache;            //   cache + (s / block_size) * block_stride + (s % block_size) * row_stride + h * head_stride
};

struct DecoderConfig {
  DType dtype;  // float32 or bfloat16: activations, weights, cache
  int64_t hidden, intermediate;
  int heads, kv_heads, head_dim;
  float norm_eps, softmax_scale;
  Activation act;
  int block_size;
  int64_t k_block_stride, k_row_stride, k_head_stride;  // cache strides, elements, same for every layer
  int64_t v_block_stride, v_row_stride, v_head_stride;
  const float* final_norm;  // (hidden,)
  std::vector<DecoderLayerWeights> layers;  // at least one
};

// One step's flattened batch: sequence b's new tokens are rows cu_seqlens_q[b]..cu_seqlens_q[b+1]
// and are the last ones of its cu_seqlens_k[b+1] - cu_seqlens_k[b] keys.
struct DecoderStep {
  int64_t tokens;
  int batch;
  void* x;                   // (tokens, hidden): the embeddings in; the residual stream afterwards
  void* out;                 // (tokens, hidden): the final normalised hidden states
  const void* cos;           // (tokens, head_dim / 2), dtype: each token's rotary row
  const void* sin;
  const int64_t* rows;       // (tokens,) = 0..tokens-1 (rotary's row index per token)
  const int32_t* cu_seqlens_q;  // (batch + 1,)
  const int32_t* cu_seqlens_k;  // (batch + 1,)
  const int32_t* block_table;   // (batch, block_table_stride)
  int64_t block_table_stride;
  const int64_t* slot_mapping;  // (tokens,) cache slot of each new token
  void* workspace;              // decoder_workspace_bytes(config, tokens) bytes
  // (tokens,) or null (none): rows whose quantised projections keep float activations
  // (QActivations::kFloat, the prompt's tokens); the others quantise theirs to int8.
  const uint8_t* float_rows = nullptr;
};

// Bytes of scratch one step of `tokens` rows needs (the caller allocates it).
FI_ALWAYS_INLINE int64_t decoder_workspace_bytes(const DecoderConfig& c, int64_t tokens) {
  const int64_t qkv = static_cast<int64_t>(c.heads + 2 * c.kv_heads) * c.head_dim;
  const int64_t per_token = 2 * c.hidden + qkv + static_cast<int64_t>(c.heads) * c.head_dim + 3 * c.intermediate;
  return per_token * tokens * dtype_size(c.dtype);
}

}  // namespace fastinfer
