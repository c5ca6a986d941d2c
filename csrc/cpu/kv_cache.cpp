// Cache writes: token i's key/value rows go to slot slot_mapping[i] (negative = skip).
#include <algorithm>
#include <cstring>

#include "cpu/attention_cpu.h"
#include "cpu/thread_pool.h"

namespace fastinfer::cpu {

void kv_write(const KVWriteParams& p) {
  const int esz = dtype_size(p.dtype);
  const size_t row_bytes = static_cast<size_t>(p.head_dim) * esz;
  constexpr int64_t kTokensPerTask = 64;
  const int64_t tasks = (p.num_tokens + kTokensPerTask - 1) / kTokensPerTask;
  parallel_for(tasks, [&](int64_t task, int) {
    const int64_t end = std::min<int64_t>(p.num_tokens, (task + 1) * kTokensPerTask);
    for (int64_t i = task * kTokensPerTask; i < end; ++i) {
      const int64_t slot = p.slot_mapping[i];
      if (slot < 0) continue;
      const int64_t blk = slot / p.block_size, off = slot % p.block_size;
      char* kdst = static_cast<char*>(p.k_cache) + esz * (blk * p.k_block_stride + off * p.k_row_stride);
      char* vdst = static_cast<char*>(p.v_cache) + esz * (blk * p.v_block_stride + off * p.v_row_stride);
      const char* ksrc = static_cast<const char*>(p.key) + esz * (i * p.key_row_stride);
      const char* vsrc = static_cast<const char*>(p.value) + esz * (i * p.value_row_stride);
      for (int h = 0; h < p.num_kv_heads; ++h) {
        std::memcpy(kdst + esz * h * p.k_head_stride, ksrc + esz * h * p.key_head_stride, row_bytes);
        std::memcpy(vdst + esz * h * p.v_head_stride, vsrc + esz * h * p.value_head_stride, row_bytes);
      }
    }
  });
}

}  // namespace fastinfer::cpu
