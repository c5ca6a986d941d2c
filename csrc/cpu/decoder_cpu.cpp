// The decoder stack as one call: the same CPU kernels the per-op path runs (linear, RMSNorm with
// the residual add fused, rotary, cache write, attention, gated activation), in the same order.
#include "fastinfer/cpu.h"

#include <cstddef>

#include "cpu/attention_cpu.h"
#include "cpu/linear_cpu.h"
#include "cpu/pointwise_cpu.h"

namespace fastinfer::cpu {

namespace {

struct Buffers {
  char* h;     // (T, hidden): normalised input of a sub-block
  char* y;     // (T, hidden): output of a sub-block, added into the residual by the next norm
  char* qkv;   // (T, (heads + 2 kv_heads) * head_dim)
  char* attn;  // (T, heads * head_dim)
  char* gu;    // (T, 2 * intermediate)
  char* act;   // (T, intermediate)
};

Buffers carve(const DecoderConfig& c, const DecoderStep& s) {
  const int64_t esz = dtype_size(c.dtype), t = s.tokens;
  const int64_t qkv = static_cast<int64_t>(c.heads + 2 * c.kv_heads) * c.head_dim;
  Buffers b;
  char* p = static_cast<char*>(s.workspace);
  auto take = [&](int64_t cols) {
    char* r = p;
    p += esz * t * cols;
    return r;
  };
  b.h = take(c.hidden);
  b.y = take(c.hidden);
  b.qkv = take(qkv);
  b.attn = take(static_cast<int64_t>(c.heads) * c.head_dim);
  b.gu = take(2 * c.intermediate);
  b.act = take(c.intermediate);
  return b;
}

// Outputs of one part of a projection: n columns of out, whose rows are ld elements apart.
void project_part(const DecoderConfig& c, const DecoderStep& s, const void* x, int64_t k, const PackedProjection& w,
                  int64_t n, void* out, int64_t ld) {
  const int64_t t = s.tokens;
  if (w.qtype >= 0) {
    // One call per run of rows with the same kind of activations (a step's sequences keep their
    // prompt rows together, so a mixed step has a few runs).
    const int64_t esz = dtype_size(c.dtype);
    for (int64_t r0 = 0; r0 < t;) {
      const bool exact = s.float_rows != nullptr && s.float_rows[r0] != 0;
      int64_t r1 = r0 + 1;
      while (r1 < t && (s.float_rows != nullptr && s.float_rows[r1] != 0) == exact) ++r1;
      QLinearParams p{static_cast<QType>(w.qtype), c.dtype, c.dtype, r1 - r0, n, k,
                      static_cast<const char*>(x) + esz * r0 * k, k, w.w_packed, w.bias,
                      static_cast<char*>(out) + esz * r0 * ld, ld, exact ? QActivations::kFloat : QActivations::kInt8};
      qlinear_forward(p);
      r0 = r1;
    }
    return;
  }
  LinearParams p{c.dtype, c.dtype, t, n, k, x, k, w.w_packed, w.bias, out, ld};
  linear_forward(p);
}

// out (T, n) = x (T, k) W^T (+ bias), W in one part or several (PackedProjection::rest).
void project(const DecoderConfig& c, const DecoderStep& s, const void* x, int64_t k, const PackedProjection& w, int64_t n,
             void* out) {
  const int64_t esz = dtype_size(c.dtype);
  int64_t col = 0;
  for (const PackedProjection* part = &w; part != nullptr; part = part->rest) {
    const int64_t cols = part->rows > 0 ? part->rows : n - col;
    project_part(c, s, x, k, *part, cols, static_cast<char*>(out) + esz * col, n);
    col += cols;
  }
}

// out = rms_norm(x (+ residual, written back to residual)) * weight.
void norm(const DecoderConfig& c, int64_t t, const void* x, void* residual, const float* weight, void* out) {
  RmsNormParams p{c.dtype, t, c.hidden, x, c.hidden, residual, c.hidden, weight, c.norm_eps, out, c.hidden};
  rms_norm(p);
}

void attention_block(const DecoderConfig& c, const DecoderStep& s, const DecoderLayerWeights& w, const Buffers& b) {
  const int64_t t = s.tokens, D = c.head_dim, esz = dtype_size(c.dtype);
  const int64_t qkv_cols = static_cast<int64_t>(c.heads + 2 * c.kv_heads) * D;
  project(c, s, b.h, c.hidden, w.qkv, qkv_cols, b.qkv);

  RotaryParams rot{c.dtype, t, c.heads + c.kv_heads, D / 2, b.qkv, qkv_cols, D, s.cos, s.sin, s.rows};
  rotary(rot);

  const char* k_new = b.qkv + esz * c.heads * D;
  const char* v_new = k_new + esz * c.kv_heads * D;
  KVWriteParams kv{};
  kv.dtype = c.dtype;
  kv.num_tokens = static_cast<int>(t);
  kv.num_kv_heads = c.kv_heads;
  kv.head_dim = c.head_dim;
  kv.key = k_new;
  kv.value = v_new;
  kv.key_row_stride = kv.value_row_stride = qkv_cols;
  kv.key_head_stride = kv.value_head_stride = D;
  kv.k_cache = w.k_cache;
  kv.v_cache = w.v_cache;
  kv.k_block_stride = c.k_block_stride;
  kv.k_row_stride = c.k_row_stride;
  kv.k_head_stride = c.k_head_stride;
  kv.v_block_stride = c.v_block_stride;
  kv.v_row_stride = c.v_row_stride;
  kv.v_head_stride = c.v_head_stride;
  kv.block_size = c.block_size;
  kv.slot_mapping = s.slot_mapping;
  kv_write(kv);

  AttentionParams a{};
  a.dtype = c.dtype;
  a.batch = s.batch;
  a.num_heads = c.heads;
  a.num_kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  a.q = b.qkv;
  a.q_row_stride = qkv_cols;
  a.q_head_stride = D;
  a.cu_seqlens_q = s.cu_seqlens_q;
  a.k = w.k_cache;
  a.v = w.v_cache;
  a.k_batch_stride = c.k_block_stride;
  a.k_row_stride = c.k_row_stride;
  a.k_head_stride = c.k_head_stride;
  a.v_batch_stride = c.v_block_stride;
  a.v_row_stride = c.v_row_stride;
  a.v_head_stride = c.v_head_stride;
  a.cu_seqlens_k = s.cu_seqlens_k;
  a.block_table = s.block_table;
  a.block_table_stride = s.block_table_stride;
  a.block_size = c.block_size;
  a.out = b.attn;
  a.o_row_stride = static_cast<int64_t>(c.heads) * D;
  a.o_head_stride = D;
  a.softmax_scale = c.softmax_scale;
  a.window_left = w.window_left;
  a.window_right = 0;  // causal
  attention_forward(a);

  project(c, s, b.attn, static_cast<int64_t>(c.heads) * D, w.o, c.hidden, b.y);
}

void mlp_block(const DecoderConfig& c, const DecoderStep& s, const DecoderLayerWeights& w, const Buffers& b) {
  const int64_t t = s.tokens, inter = c.intermediate;
  project(c, s, b.h, c.hidden, w.gate_up, 2 * inter, b.gu);
  ActMulParams am{c.dtype, c.act, t, inter, b.gu, 2 * inter, b.act, inter};
  act_mul(am);
  project(c, s, b.act, inter, w.down, c.hidden, b.y);
}

}  // namespace

void decoder_forward(const DecoderConfig& c, const DecoderStep& s) {
  if (s.tokens == 0) return;
  const Buffers b = carve(c, s);
  for (std::size_t l = 0; l < c.layers.size(); ++l) {
    const DecoderLayerWeights& w = c.layers[l];
    // The previous layer's MLP output joins the residual stream inside this norm.
    if (l == 0) norm(c, s.tokens, s.x, nullptr, w.input_norm, b.h);
    else norm(c, s.tokens, b.y, s.x, w.input_norm, b.h);
    attention_block(c, s, w, b);
    norm(c, s.tokens, b.y, s.x, w.post_norm, b.h);
    mlp_block(c, s, w, b);
  }
  norm(c, s.tokens, b.y, s.x, c.final_norm, s.out);  // the last MLP output joins the residual here
}

}  // namespace fastinfer::cpu
