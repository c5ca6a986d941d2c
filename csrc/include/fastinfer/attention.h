// Framework-free description of one attention call. The binding layer fills it
// after validating every tensor; kernels (CPU and CUDA) only read it.
#pragma once
#include <cstdint>

// Helpers below are called from kernels built for different SIMD levels: force inlining so
// that no out-of-line copy compiled with AVX-512 can be shared with baseline code.
#if defined(__GNUC__)
#define FI_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FI_ALWAYS_INLINE inline
#endif

namespace fastinfer {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

FI_ALWAYS_INLINE int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Strides are in elements. The last (head_dim) stride is always 1.
struct AttentionParams {
  DType dtype;
  int batch;         // number of sequences
  int num_heads;     // query heads
  int num_kv_heads;  // key/value heads; num_heads % num_kv_heads == 0
  int head_dim;

  // Queries: row t of sequence b starts at q + q_batch_stride*b + q_row_stride*t,
  // or at q + q_row_stride*(cu_seqlens_q[b] + t) when cu_seqlens_q is set (varlen).
  const void* q;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  const int32_t* cu_seqlens_q;  // (batch+1,) or null
  int seqlen_q;                 // dense: rows per sequence; varlen: ignored

  // Keys/values. Three layouts:
  //  dense : k + kv_batch_stride*bidx + kv_row_stride*j, bidx = kv_batch_idx ? kv_batch_idx[b] : b
  //  varlen: k + kv_row_stride*(cu_seqlens_k[b] + j)
  //  paged : k + kv_batch_stride*block_table[b][j / block_size] + kv_row_stride*(j % block_size)
  // (kv_batch_stride doubles as the block stride for the paged layout.)
  const void* k;
  const void* v;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  const int32_t* cu_seqlens_k;   // (batch+1,) or null
  const int32_t* seqlens_k;      // (batch,) keys used per sequence, or null
  const int32_t* kv_batch_idx;   // (batch,) or null
  const int32_t* block_table;    // (batch, block_table_stride) or null
  int64_t block_table_stride;
  int block_size;                // paged only
  int seqlen_k;                  // dense: keys per sequence unless seqlens_k is set

  // Output, same layout rules as q.
  void* out;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  // Log-sum-exp, float32, natural log; +inf for rows that see no key. Optional.
  float* lse;
  int64_t lse_batch_stride, lse_head_stride, lse_row_stride;

  const float* alibi_slopes;     // (num_heads,) or (batch, num_heads) or null
  int64_t alibi_batch_stride;    // 0 for (num_heads,)

  float softmax_scale;
  float softcap;                 // 0 = off
  int window_left, window_right; // -1 = unbounded; causal sets window_right = 0
  int num_splits;                // 0 = automatic, 1 = never split the keys

  FI_ALWAYS_INLINE bool is_varlen_q() const { return cu_seqlens_q != nullptr; }
  FI_ALWAYS_INLINE bool is_paged() const { return block_table != nullptr; }

  FI_ALWAYS_INLINE int q_len(int b) const {
    return cu_seqlens_q ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seqlen_q;
  }
  FI_ALWAYS_INLINE int k_len(int b) const {
    if (seqlens_k) return seqlens_k[b];
    if (cu_seqlens_k) return cu_seqlens_k[b + 1] - cu_seqlens_k[b];
    return seqlen_k;
  }
  // Element offset of key row j of sequence b (head 0) from the k/v base pointer.
  FI_ALWAYS_INLINE int64_t kv_row_offset(int b, int j, int64_t batch_stride, int64_t row_stride) const {
    if (block_table) {
      const int32_t blk = block_table[b * block_table_stride + j / block_size];
      return batch_stride * blk + row_stride * (j % block_size);
    }
    if (cu_seqlens_k) return row_stride * (static_cast<int64_t>(cu_seqlens_k[b]) + j);
    const int bidx = kv_batch_idx ? kv_batch_idx[b] : b;
    return batch_stride * bidx + row_stride * j;
  }
  FI_ALWAYS_INLINE int64_t q_row_offset(int b, int t, int64_t batch_stride, int64_t row_stride) const {
    if (cu_seqlens_q) return row_stride * (static_cast<int64_t>(cu_seqlens_q[b]) + t);
    return batch_stride * b + row_stride * t;
  }
};

// Windows that exclude no key become -1, so that they run exactly as the unbounded call (same
// code path, bit-identical results) and the kernels' position arithmetic only ever sees windows
// shorter than a sequence. Query t of a sequence of sq queries and sk keys sits at key position
// i = t + sk - sq (bottom-right aligned) and sees keys [i - left, i + right] of [0, sk); as
// sk - sq <= i <= sk - 1, left >= sk - 1 and right >= sq - 1 exclude nothing. max_q / max_k: the
// longest query / key sequence of the call, or any upper bound of it (a bound only leaves some
// windows that exclude nothing as they are, which is still correct). Called once per call by every
// backend entry point (CPU forward and backward, CUDA forward and backward), never by a kernel.
FI_ALWAYS_INLINE void normalize_windows(AttentionParams& p, int64_t max_q, int64_t max_k) {
  if (p.window_left >= max_k - 1) p.window_left = -1;
  if (p.window_right >= max_q - 1) p.window_right = -1;
}

// Writes new key/value rows into a cache (dense or paged). Row i of the source
// goes to cache slot slot_of(i); negative slots are skipped.
struct KVWriteParams {
  DType dtype;
  int num_tokens, num_kv_heads, head_dim;
  const void* key; const void* value;
  int64_t key_row_stride, key_head_stride, value_row_stride, value_head_stride;
  void* k_cache; void* v_cache;
  // A slot s lives at cache + (s / block_size)*block_stride + (s % block_size)*row_stride.
  int64_t k_block_stride, k_row_stride, k_head_stride;
  int64_t v_block_stride, v_row_stride, v_head_stride;
  int block_size;
  const int64_t* slot_mapping;   // (num_tokens,)
};

}  // namespace fastinfer
