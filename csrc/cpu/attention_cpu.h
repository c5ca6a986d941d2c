// Interface between the ISA-independent CPU attention driver (attention_dispatch.cpp)
// and the per-ISA tile kernels (attention_<isa>.cpp, all built from attention_kernel.h).
#pragma once
#include "cpu/isa_list.h"
#include "fastinfer/cpu.h"

namespace fastinfer::cpu {

constexpr int kBlockN = 64;   // keys per tile
constexpr int kMaxRows = 32;  // query rows per tile (two 16-lane vectors)
// Tiles with at most this many rows (decode: seqlen_q * GQA group) use a kernel that
// puts keys, not rows, in the vector lanes, so no lanes idle when there are only 1-8 rows.
constexpr int kFewRows = 8;

class KvPrefetcher;

// One unit of parallel work: a tile of query rows of sequence b that share one
// KV head, over a range of keys. Rows of (b, kv_head) are numbered t*group + g:
// query position t, query head kv_head*group + g (GQA heads become extra rows,
// so each key is loaded once for the whole group).
struct TileJob {
  int b;
  int kv_head;
  int row_begin, row_end;  // rows of this tile, row_end - row_begin <= rows_per_tile
  int rows_per_tile;       // 16 or 32: rows in vector lanes; kFewRows: few rows (decode), keys in vector lanes
  int kv_begin, kv_end;    // keys visited (already clipped by causal/window limits)
  float* partial;          // split-KV: partial result (rows_per_tile*head_dim outputs, then rows_per_tile lse); else null
  // Keys/values of (b, kv_head) staged by IsaKernels::stage (key j at row j), or null:
  // then the tile reads the cache directly (copying or packing a key tile where its kernel needs it).
  const void* k_staged;
  const void* v_staged;
  KvPrefetcher* prefetch = nullptr;  // few-rows jobs read straight from the cache: pulls later keys in early
};

// Decode reads each sequence's keys once, from blocks scattered through a cache far larger
// than L3, in runs (one block of one head) too short for the hardware prefetcher to ramp up.
// A worker runs a batch of jobs in order; this walks the keys/values those jobs will read
// and keeps prefetches a fixed distance ahead of the kernel, one key tile at a time.
class KvPrefetcher {
 public:
  KvPrefetcher(const AttentionParams& p, const TileJob* jobs, int count, int distance_keys);
  // The kernel starts on `keys` more keys: prefetch that many keys further along.
  void advance(int keys);

 private:
  void prefetch_rows(const char* first, int64_t stride_bytes, int rows) const;
  const AttentionParams& p_;
  const TileJob* jobs_;
  int count_, job_ = 0, key_ = 0;
  int64_t row_bytes_;
};

// Per-worker scratch, in floats.
struct ScratchLayout {
  static constexpr int kQ = kMaxHeadDim * kMaxRows;
  static constexpr int kS = kBlockN * kMaxRows;
  static constexpr int kO = kMaxHeadDim * kMaxRows;
  static constexpr int kKV = kBlockN * kMaxHeadDim;
  static constexpr int kRowInfo = 4 * kMaxRows;
  static constexpr int kPPack = kBlockN / 2 * kMaxRows;
  static constexpr int kTotal = kQ + kS + kO + 2 * kKV + kRowInfo + 2 * kMaxHeadDim + 2 * kPPack;
};

using TileFn = void (*)(const AttentionParams& p, const TileJob& job, float* scratch);
// Copies keys/values [0, k_len(b)) of (b, kv_head) into the contiguous layout this ISA's
// tile kernel reads, zero rows after them up to staged_rows(k_len(b)). Each buffer
// holds at most kStagedBytesPerKey/2 bytes per padded key. Worth it when several
// query tiles read the same keys (prefill): the copy is paid once, not per tile.
using StageFn = void (*)(const AttentionParams& p, int b, int kv_head, void* k_dst, void* v_dst);
// Rows staged for a sequence of num_keys keys: a tile may start at any even key (windows),
// so one extra all-zero block keeps its last kBlockN rows inside the buffer.
inline int64_t staged_rows(int num_keys) { return (static_cast<int64_t>(num_keys) + kBlockN - 1) / kBlockN * kBlockN + kBlockN; }
struct IsaKernels {
  TileFn tile;
  StageFn stage;
  bool bf16_native;  // stages (and computes on) bf16 as bf16, not as float
  int staged_element_bytes(DType dtype) const { return bf16_native && dtype == DType::kBFloat16 ? 2 : 4; }
};

// kernels_<suffix>() of every level of isa_list.h (defined where the level has its own kernels).
#define FI_ISA_DECLARE(suffix, ...) IsaKernels kernels_##suffix();
FI_CPU_ISAS(FI_ISA_DECLARE)
#undef FI_ISA_DECLARE

// p with normalize_windows applied for the call's longest query and key sequences (host-readable
// lengths): what attention_forward and attention_backward run, so that a window reaching past
// every sequence's ends is the unbounded call itself.
AttentionParams with_normalized_windows(const AttentionParams& p);

// Writes a finished tile: o holds the unnormalised output of row r, dim d at
// o[r*row_stride + d*dim_stride], m the running max in log2 units and l the softmax denominator per row.
void store_tile(const AttentionParams& p, const TileJob& job, const float* o, int row_stride, int dim_stride, const float* m,
                const float* l);

}  // namespace fastinfer::cpu
