// KV-cache writes on the GPU: reshape_and_cache (rows to slots) and flash_attn_with_kvcache's
// append (rows to positions seqlens[b] + i). Both are row copies of num_kv_heads * head_dim
// elements, done with 16-byte accesses when every pointer and stride allows it.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/attention_cuda.h"
#include "cuda/cuda_utils.cuh"

namespace fastinfer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 65535;

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastinfer CUDA ") + what + ": " + cudaGetErrorString(err));
}

bool aligned16(const void* ptr, std::initializer_list<int64_t> strides, int esz) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  for (int64_t s : strides)
    if ((s * esz) % 16) return false;
  return true;
}

// Copies one token's rows of every head: dst/src + head * head_stride, row_bytes each. Byte strides.
__device__ __forceinline__ void copy_heads(char* dst, int64_t dst_head, const char* src, int64_t src_head, int heads,
                                           int row_bytes, int esz, bool vec16) {
  if (vec16) {
    const int units = row_bytes / 16;
    for (int w = threadIdx.x; w < heads * units; w += blockDim.x) {
      const int h = w / units, u = w - h * units;
      FI_CHECK_ALIGNED(dst + h * dst_head + u * 16, 16, "kv cache copy (dst)");
      FI_CHECK_ALIGNED(src + h * src_head + u * 16, 16, "kv cache copy (src)");
      *reinterpret_cast<uint4*>(dst + h * dst_head + u * 16) = *reinterpret_cast<const uint4*>(src + h * src_head + u * 16);
    }
  } else {
    const int units = row_bytes / esz;
    for (int w = threadIdx.x; w < heads * units; w += blockDim.x) {
      const int h = w / units, u = w - h * units;
      if (esz == 4)
        *reinterpret_cast<uint32_t*>(dst + h * dst_head + u * 4) = *reinterpret_cast<const uint32_t*>(src + h * src_head + u * 4);
      else
        *reinterpret_cast<uint16_t*>(dst + h * dst_head + u * 2) = *reinterpret_cast<const uint16_t*>(src + h * src_head + u * 2);
    }
  }
}

__global__ void __launch_bounds__(kThreads) kv_write_kernel(const KVWriteParams p, int64_t num_slots, int esz, bool vec16) {
  const int row_bytes = p.head_dim * esz;
  for (int64_t i = blockIdx.x; i < p.num_tokens; i += gridDim.x) {
    const int64_t slot = p.slot_mapping[i];
    if (slot < 0 || slot >= num_slots) continue;  // padding token, or a slot outside the cache
    const int64_t blk = slot / p.block_size, off = slot - blk * p.block_size;
    copy_heads(static_cast<char*>(p.k_cache) + esz * (blk * p.k_block_stride + off * p.k_row_stride), esz * p.k_head_stride,
               static_cast<const char*>(p.key) + esz * (i * p.key_row_stride), esz * p.key_head_stride, p.num_kv_heads,
               row_bytes, esz, vec16);
    copy_heads(static_cast<char*>(p.v_cache) + esz * (blk * p.v_block_stride + off * p.v_row_stride), esz * p.v_head_stride,
               static_cast<const char*>(p.value) + esz * (i * p.value_row_stride), esz * p.value_head_stride,
               p.num_kv_heads, row_bytes, esz, vec16);
  }
}

__global__ void __launch_bounds__(kThreads) kv_append_kernel(const KVAppendParams p, int esz, bool vec16) {
  const int row_bytes = p.head_dim * esz;
  const int64_t items = int64_t(p.batch) * p.seqlen_new;
  for (int64_t it = blockIdx.x; it < items; it += gridDim.x) {
    const int b = static_cast<int>(it / p.seqlen_new), i = static_cast<int>(it % p.seqlen_new);
    const int64_t len = p.seqlens[b];
    if (len < 0) continue;
    const int64_t pos = len + i;
    if (pos >= p.capacity) continue;
    int64_t kdst, vdst;
    if (p.block_table) {
      const int64_t bi = pos / p.block_size, off = pos - bi * p.block_size;
      const int64_t blk = p.block_table[int64_t(b) * p.block_table_stride + bi];
      if (blk < 0 || blk >= p.cache_entries) continue;
      kdst = blk * p.k_batch_stride + off * p.k_row_stride;
      vdst = blk * p.v_batch_stride + off * p.v_row_stride;
    } else {
      const int64_t row = p.kv_batch_idx ? int64_t(p.kv_batch_idx[b]) : int64_t(b);
      if (row < 0 || row >= p.cache_entries) continue;
      kdst = row * p.k_batch_stride + pos * p.k_row_stride;
      vdst = row * p.v_batch_stride + pos * p.v_row_stride;
    }
    copy_heads(static_cast<char*>(p.k_cache) + esz * kdst, esz * p.k_head_stride,
               static_cast<const char*>(p.k_new) + esz * (int64_t(b) * p.k_new_batch_stride + int64_t(i) * p.k_new_row_stride),
               esz * p.k_new_head_stride, p.num_kv_heads, row_bytes, esz, vec16);
    copy_heads(static_cast<char*>(p.v_cache) + esz * vdst, esz * p.v_head_stride,
               static_cast<const char*>(p.v_new) + esz * (int64_t(b) * p.v_new_batch_stride + int64_t(i) * p.v_new_row_stride),
               esz * p.v_new_head_stride, p.num_kv_heads, row_bytes, esz, vec16);
  }
}

}  // namespace

void kv_write(const KVWriteParams& p, int64_t num_slots, cudaStream_t stream) {
  if (p.num_tokens <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 || num_slots <= 0) return;
  if (p.block_size < 1) throw std::invalid_argument("kv_write: block_size must be >= 1");
  const int esz = dtype_size(p.dtype);
  const bool vec16 = (p.head_dim * esz) % 16 == 0 &&
                     aligned16(p.key, {p.key_row_stride, p.key_head_stride}, esz) &&
                     aligned16(p.value, {p.value_row_stride, p.value_head_stride}, esz) &&
                     aligned16(p.k_cache, {p.k_block_stride, p.k_row_stride, p.k_head_stride}, esz) &&
                     aligned16(p.v_cache, {p.v_block_stride, p.v_row_stride, p.v_head_stride}, esz);
  const int blocks = static_cast<int>(std::min<int64_t>(p.num_tokens, kMaxBlocks));
  FI_LAUNCH(kv_write_kernel, blocks, kThreads, 0, stream)(p, num_slots, esz, vec16);
  check_launch("kv_write kernel launch");
}

void kv_append(const KVAppendParams& p, cudaStream_t stream) {
  const int64_t items = int64_t(p.batch) * p.seqlen_new;
  if (items <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 || p.capacity <= 0 || p.cache_entries <= 0) return;
  if (p.block_table && p.block_size < 1) throw std::invalid_argument("kv_append: block_size must be >= 1");
  if (!p.seqlens) throw std::invalid_argument("kv_append: seqlens is required");
  const int esz = dtype_size(p.dtype);
  const bool vec16 = (p.head_dim * esz) % 16 == 0 &&
                     aligned16(p.k_new, {p.k_new_batch_stride, p.k_new_row_stride, p.k_new_head_stride}, esz) &&
                     aligned16(p.v_new, {p.v_new_batch_stride, p.v_new_row_stride, p.v_new_head_stride}, esz) &&
                     aligned16(p.k_cache, {p.k_batch_stride, p.k_row_stride, p.k_head_stride}, esz) &&
                     aligned16(p.v_cache, {p.v_batch_stride, p.v_row_stride, p.v_head_stride}, esz);
  const int blocks = static_cast<int>(std::min<int64_t>(items, kMaxBlocks));
  FI_LAUNCH(kv_append_kernel, blocks, kThreads, 0, stream)(p, esz, vec16);
  check_launch("kv_append kernel launch");
}

}  // namespace fastinfer::cuda
