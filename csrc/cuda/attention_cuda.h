// CUDA attention and KV-cache kernels: host-callable, framework-free (no torch),
// plain C++ types plus cuda_runtime. Every function launches on the given stream,
// never allocates device memory and never synchronises.
//
// Errors: launch failures throw std::runtime_error carrying cudaGetErrorString;
// configurations the kernels do not support (float32, a head_dim not compiled in,
// a block needing more shared memory than the device has) throw std::invalid_argument
// naming what is supported.
//
// Device-side index arrays (cu_seqlens_q/k, seqlens_k, kv_batch_idx, block_table,
// slot_mapping, seqlens) are read only by the kernels: the host cannot check their
// values without a synchronisation. Whatever they contain, the kernels never read
// or write out of bounds, given the sizes below (AttentionExtras, num_slots,
// KVAppendParams' capacities), which the host knows from tensor shapes:
//   * sequence lengths are clamped to [0, capacity] (dense cache: seqlen_k; paged:
//     block_table_cols * block_size; varlen: kv_rows / q_rows);
//   * a query row whose global index cu_seqlens_q[b] + t falls outside [0, q_rows)
//     is neither read nor written (nor its lse);
//   * a key row that falls outside its tensor (varlen: cu_seqlens_k[b] + j outside
//     [0, kv_rows); paged: block id outside [0, kv_rows); dense: kv_batch_idx[b]
//     outside [0, kv_rows)) reads as zeros (key and value), i.e. it still counts
//     as a key with score 0 for the rows that see it;
//   * cache writes to a slot/position outside the cache, or through an invalid
//     block id / batch index, are skipped.
// Valid inputs give flash-attn's results; invalid ones give garbage, never a fault.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "fastinfer/attention.h"

namespace fastinfer::cuda {

// What a CUDA launch needs beyond AttentionParams: sizes (bounds for the device-side
// indices, see above) and hints. Sizes left at 0 where the layout does not use them.
struct AttentionExtras {
  int64_t q_rows = 0;            // varlen q (cu_seqlens_q set): q.size(0) (= out.size(0) = lse.size(1))
  int64_t kv_rows = 0;           // varlen k: k.size(0); paged: num_blocks = k.size(0);
                                 // dense: k.size(0) (cache batch entries; bounds kv_batch_idx)
  int64_t block_table_cols = 0;  // paged: block_table.size(1)
  int max_seqlen_q = 0;          // hint, varlen q: max over b of q_len(b); 0 = unknown. Only affects speed
  int max_seqlen_k = 0;          // hint: max over b of k_len(b); 0 = unknown. Only affects speed (split-KV choice)
  // When seqlens_k is set, k_len(b) = seqlens_k[b] + seqlens_k_add: flash_attn_with_kvcache
  // attends to cache_seqlens + seqlen_new keys after kv_append, without a second length array.
  int seqlens_k_add = 0;
};

// Bytes of device workspace attention_forward needs for these params (split-KV partials); 0 if none.
// device_sm_count <= 0: read the current device's multiprocessor count.
size_t attention_workspace_bytes(const AttentionParams& p, const AttentionExtras& x, int device_sm_count);
// Launches on `stream` (current device). The workspace must be 256-byte aligned. A workspace smaller
// than attention_workspace_bytes(p, x, 0) only lowers the number of key splits (down to none).
void attention_forward(const AttentionParams& p, const AttentionExtras& x, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

// The same without extras, for calls whose layout has no device-indexed tensor sizes to know:
// dense q and dense k/v without kv_batch_idx (seqlens_k allowed). Others throw std::invalid_argument.
size_t attention_workspace_bytes(const AttentionParams& p, int device_sm_count);
void attention_forward(const AttentionParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// reshape_and_cache: row i of key/value goes to cache slot slot_mapping[i] (int64, on the device);
// slots < 0 (padding) and >= num_slots (= num_blocks * block_size) are skipped. Any dtype (a copy).
void kv_write(const KVWriteParams& p, int64_t num_slots, cudaStream_t stream);

// flash_attn_with_kvcache's append: row i of sequence b of k_new/v_new goes to cache position
// seqlens[b] + i of sequence b (dense cache: row kv_batch_idx[b] (or b); paged: through block_table).
// Positions outside [0, capacity), invalid batch indices / block ids and negative seqlens[b] are skipped.
// Then attend with AttentionParams.seqlens_k = seqlens and AttentionExtras.seqlens_k_add = seqlen_new.
struct KVAppendParams {
  DType dtype;
  int batch, seqlen_new, num_kv_heads, head_dim;
  const void* k_new;
  const void* v_new;  // (batch, seqlen_new, num_kv_heads, head_dim), strided
  int64_t k_new_batch_stride, k_new_row_stride, k_new_head_stride;
  int64_t v_new_batch_stride, v_new_row_stride, v_new_head_stride;
  void* k_cache;
  void* v_cache;
  // Dense: k_cache + batch_stride*row + row_stride*pos; paged: + batch_stride*block + row_stride*(pos % block_size).
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  const int32_t* seqlens;       // (batch,) on the device: keys already in the cache
  const int32_t* kv_batch_idx;  // (batch,) on the device, or null (dense only)
  const int32_t* block_table;   // (batch, block_table_stride) on the device, or null (dense)
  int64_t block_table_stride;
  int block_size;               // paged only
  int64_t cache_entries;        // dense: k_cache.size(0); paged: num_blocks
  int64_t capacity;             // keys one sequence can hold: dense k_cache.size(1); paged block_table.size(1)*block_size
};
void kv_append(const KVAppendParams& p, cudaStream_t stream);

// Head dimensions compiled into this build (FASTINFER_CUDA_HEADDIMS), ascending, e.g. "64,96,128,256".
const char* compiled_head_dims();

}  // namespace fastinfer::cuda
