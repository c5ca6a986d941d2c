// ISA-independent driver of the CPU attention: cuts the problem into tiles,
// decides the split-KV factor, runs the tiles on the thread pool and merges splits.
#define FI_ISA_NS base
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/cpu_features.h"
#include "cpu/scratch.h"
#include "cpu/thread_pool.h"
#include "cpu/vec.h"

namespace fastinfer::cpu {

namespace {

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMinKeysPerSplit = 256;
constexpr int64_t kInlineWork = int64_t(1) << 18;  // ~10 us of one core: below it, threads cost more than they save

// One getter per level of isa_list.h (null: the level runs the next lower level's kernels).
IsaKernels pick_kernels() {
#define FI_ISA_ROW(suffix, Enum, name, arch, flags, att, bwd, lin, pw, pred) FI_ISA_ENTRY(arch, att, kernels_##suffix)
  static constexpr IsaKernels (*kTable[])() = {FI_CPU_ISAS(FI_ISA_ROW)};
#undef FI_ISA_ROW
  return pick_isa(kTable)();
}

constexpr int64_t kMaxStagedBytes = int64_t(256) << 20;

struct StagingTag;  // tags of this driver's per-thread buffers
struct WorkerTag;

// Staging memory for keys/values shared by several query tiles, kept per calling thread.
char* staging_buffer(int64_t bytes) { return thread_scratch<StagingTag>(bytes); }

float* worker_scratch() {
  return reinterpret_cast<float*>(thread_scratch<WorkerTag>(sizeof(float) * ScratchLayout::kTotal));
}

void write_row(const AttentionParams& p, int b, int t, int h, const float* vals, float lse_log2) {
  const int D = p.head_dim, esz = dtype_size(p.dtype);
  char* dst = static_cast<char*>(p.out) + esz * (p.q_row_offset(b, t, p.o_batch_stride, p.o_row_stride) + h * p.o_head_stride);
  switch (p.dtype) {
    case DType::kFloat32: std::copy(vals, vals + D, reinterpret_cast<float*>(dst)); break;
    case DType::kFloat16: {
      uint16_t* o = reinterpret_cast<uint16_t*>(dst);
      for (int d = 0; d < D; ++d) o[d] = base::f32_to_f16(vals[d]);
      break;
    }
    case DType::kBFloat16: {
      uint16_t* o = reinterpret_cast<uint16_t*>(dst);
      for (int d = 0; d < D; ++d) o[d] = base::f32_to_bf16(vals[d]);
      break;
    }
  }
  if (p.lse) {
    const int64_t row = p.cu_seqlens_q ? p.cu_seqlens_q[b] + t : t;
    p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] =
        std::isnan(lse_log2) ? lse_log2 : std::isfinite(lse_log2) ? lse_log2 * kLn2 : std::numeric_limits<float>::infinity();
  }
}

// Does query t of sequence b have at least one key inside its window?
bool row_sees_keys(const AttentionParams& p, int b, int t) {
  const int64_t sk = p.k_len(b), i = int64_t(t) + sk - p.q_len(b);  // bottom-right aligned position
  const int64_t lo = p.window_left >= 0 ? std::max<int64_t>(0, i - p.window_left) : 0;
  const int64_t hi = p.window_right >= 0 ? std::min<int64_t>(sk - 1, i + p.window_right) : sk - 1;
  return lo <= hi;
}

// A finished row as softmax defines it: l (the denominator) is NaN when a score was NaN or +inf
// (+inf - +inf), and 0 when no visible key had a score above -inf. A row without visible keys is
// zeros with lse +inf (flash-attn's fully masked row); a row whose visible scores were all -inf
// is NaN, as softmax over -inf alone is. Returns false for a NaN row.
bool row_is_defined(const AttentionParams& p, int b, int t, float l) {
  return !std::isnan(l) && (l > 0.f || !row_sees_keys(p, b, t));
}

void write_nan_row(const AttentionParams& p, int b, int t, int h) {
  float vals[kMaxHeadDim];
  std::fill(vals, vals + p.head_dim, std::numeric_limits<float>::quiet_NaN());
  write_row(p, b, t, h, vals, std::numeric_limits<float>::quiet_NaN());
}

// A tile cut into several key ranges; merged after all ranges ran.
struct SplitGroup {
  TileJob tile;
  float* partials;  // num_splits consecutive partial blocks
  int num_splits;
};

int64_t partial_floats(int R, int D) { return static_cast<int64_t>(R) * D + R; }

void merge_splits(const AttentionParams& p, const SplitGroup& g) {
  const int D = p.head_dim, R = g.tile.rows_per_tile, group = p.num_heads / p.num_kv_heads;
  const int64_t stride = partial_floats(R, D);
  std::vector<float> acc(D);
  for (int r = 0; r < g.tile.row_end - g.tile.row_begin; ++r) {
    const int row = g.tile.row_begin + r, t = row / group, h = g.tile.kv_head * group + row % group;
    float mx = -std::numeric_limits<float>::infinity();
    bool nan_row = false;
    for (int s = 0; s < g.num_splits; ++s) {
      const float lse_s = g.partials[s * stride + R * D + r];
      nan_row = nan_row || std::isnan(lse_s);
      mx = std::max(mx, lse_s);
    }
    if (nan_row || (mx == -std::numeric_limits<float>::infinity() && row_sees_keys(p, g.tile.b, t))) {
      write_nan_row(p, g.tile.b, t, h);
      continue;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    float total = 0.f;
    if (std::isfinite(mx)) {
      for (int s = 0; s < g.num_splits; ++s) {
        const float* part = g.partials + s * stride;
        const float w = std::exp2(part[R * D + r] - mx);
        if (w == 0.f) continue;
        total += w;
        for (int d = 0; d < D; ++d) acc[d] += w * part[r * D + d];
      }
      for (int d = 0; d < D; ++d) acc[d] /= total;
    }
    write_row(p, g.tile.b, t, h, acc.data(), total > 0.f ? mx + std::log2(total) : std::numeric_limits<float>::infinity());
  }
}

// Keys a worker's prefetches run ahead of its decode kernel (64 keys of one head: 16 KB in bf16 at
// head_dim 64); measured on a 2-core EPYC, 16 to 256 keys all cut cold-cache decode time by 10-20%.
constexpr int kPrefetchKeys = 64;

}  // namespace

KvPrefetcher::KvPrefetcher(const AttentionParams& p, const TileJob* jobs, int count, int distance_keys)
    : p_(p), jobs_(jobs), count_(count), row_bytes_(static_cast<int64_t>(p.head_dim) * dtype_size(p.dtype)) {
  if (count_ > 0) key_ = jobs_[0].kv_begin;
  advance(distance_keys);
}

void KvPrefetcher::advance(int keys) {
  const int esz = dtype_size(p_.dtype);
  while (keys > 0 && job_ < count_) {
    const TileJob& job = jobs_[job_];
    if (key_ >= job.kv_end) {
      if (++job_ < count_) key_ = jobs_[job_].kv_begin;
      continue;
    }
    // A run of keys with one row stride: the rest of this block (paged), of this job, of the budget.
    int run = std::min(job.kv_end - key_, keys);
    if (p_.block_table) run = std::min(run, p_.block_size - key_ % p_.block_size);
    const char* k = static_cast<const char*>(p_.k) +
                    esz * (job.kv_head * p_.k_head_stride + p_.kv_row_offset(job.b, key_, p_.k_batch_stride, p_.k_row_stride));
    const char* v = static_cast<const char*>(p_.v) +
                    esz * (job.kv_head * p_.v_head_stride + p_.kv_row_offset(job.b, key_, p_.v_batch_stride, p_.v_row_stride));
    prefetch_rows(k, esz * p_.k_row_stride, run);
    prefetch_rows(v, esz * p_.v_row_stride, run);
    key_ += run;
    keys -= run;
  }
}

void KvPrefetcher::prefetch_rows(const char* first, int64_t stride_bytes, int rows) const {
  if (stride_bytes == row_bytes_) {  // one contiguous range
    for (int64_t off = 0; off < rows * row_bytes_; off += 64) __builtin_prefetch(first + off, 0, 2);
    return;
  }
  for (int r = 0; r < rows; ++r)
    for (int64_t off = 0; off < row_bytes_; off += 64) __builtin_prefetch(first + r * stride_bytes + off, 0, 2);
}

void store_tile(const AttentionParams& p, const TileJob& job, const float* ot, int rs, int ds, const float* m,
                const float* l) {
  const int D = p.head_dim, R = job.rows_per_tile, group = p.num_heads / p.num_kv_heads;
  const int nrows = job.row_end - job.row_begin;
  if (job.partial) {  // a split: NaN marks a NaN row; l == 0 is decided when the splits are merged
    for (int r = 0; r < nrows; ++r) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      for (int d = 0; d < D; ++d) job.partial[r * D + d] = ot[r * rs + d * ds] * inv;
      job.partial[R * D + r] = std::isnan(l[r]) ? l[r] : l[r] > 0.f ? m[r] + std::log2(l[r]) : -std::numeric_limits<float>::infinity();
    }
    return;
  }
  float vals[kMaxHeadDim];
  for (int r = 0; r < nrows; ++r) {
    const int row = job.row_begin + r, t = row / group, h = job.kv_head * group + row % group;
    if (!row_is_defined(p, job.b, t, l[r])) {
      write_nan_row(p, job.b, t, h);
      continue;
    }
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int d = 0; d < D; ++d) vals[d] = ot[r * rs + d * ds] * inv;
    write_row(p, job.b, t, h, vals, l[r] > 0.f ? m[r] + std::log2(l[r]) : std::numeric_limits<float>::infinity());
  }
}

AttentionParams with_normalized_windows(const AttentionParams& p) {
  int64_t max_q = 0, max_k = 0;
  for (int b = 0; b < p.batch; ++b) {
    max_q = std::max<int64_t>(max_q, p.q_len(b));
    max_k = std::max<int64_t>(max_k, p.k_len(b));
  }
  AttentionParams n = p;
  normalize_windows(n, max_q, max_k);
  return n;
}

void zero_rows_outside(const AttentionParams& p, int64_t total_q) {
  if (!p.cu_seqlens_q) return;
  // Rows [0, cu[0]) and [cu[batch], total_q) belong to no sequence (the binding requires cu[0] == 0,
  // so only trailing rows occur): zeros and lse +inf, like a row that sees no key.
  const int64_t q0 = std::clamp<int64_t>(p.cu_seqlens_q[0], 0, total_q);
  const int64_t q1 = std::clamp<int64_t>(p.cu_seqlens_q[p.batch], q0, total_q);
  const int esz = dtype_size(p.dtype);
  auto zero = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      for (int h = 0; h < p.num_heads; ++h) {
        char* dst = static_cast<char*>(p.out) + esz * (row * p.o_row_stride + h * p.o_head_stride);
        std::fill(dst, dst + esz * p.head_dim, 0);
        if (p.lse) p.lse[h * p.lse_head_stride + row * p.lse_row_stride] = std::numeric_limits<float>::infinity();
      }
  };
  zero(0, q0);
  zero(q1, total_q);
}

void attention_forward(const AttentionParams& params) {
  const AttentionParams p = with_normalized_windows(params);
  const IsaKernels kernels = pick_kernels();
  const int group = p.num_heads / p.num_kv_heads;

  // 1. Tiles of up to 32 rows per (sequence, kv head), key range clipped by causal/window limits.
  std::vector<TileJob> tiles;
  for (int b = 0; b < p.batch; ++b) {
    const int sq = p.q_len(b), sk = p.k_len(b);
    if (sq <= 0) continue;
    const int rows = sq * group;
    const int R = rows >= kMaxRows ? kMaxRows : rows <= kFewRows && p.head_dim % 16 == 0 ? kFewRows : 16;
    for (int hk = 0; hk < p.num_kv_heads; ++hk)
      for (int r0 = 0; r0 < rows; r0 += R) {
        const int r1 = std::min(rows, r0 + R);
        // Positions and window edges in int64: a window up to INT_MAX must not wrap.
        const int64_t imin = r0 / group + int64_t(sk) - sq, imax = (r1 - 1) / group + int64_t(sk) - sq;
        // Even start: staged values are packed in key pairs (keys outside the window are masked).
        const int lo = p.window_left >= 0 ? static_cast<int>(std::clamp<int64_t>(imin - p.window_left, 0, sk)) & ~1 : 0;
        const int hi = std::max(lo, p.window_right >= 0 ? static_cast<int>(std::clamp<int64_t>(imax + p.window_right + 1, 0, sk)) : sk);
        tiles.push_back({b, hk, r0, r1, R, lo, hi, nullptr, nullptr, nullptr});
      }
  }
  // Stage keys/values once per (sequence, kv head) that several query tiles read.
  std::vector<std::pair<int, int>> staged;  // (b, kv_head)
  const int64_t head_bytes_per_key = static_cast<int64_t>(p.head_dim) * kernels.staged_element_bytes(p.dtype);
  int64_t stage_bytes = 0;
  std::vector<int64_t> stage_offset(static_cast<size_t>(p.batch), -1);
  for (int b = 0; b < p.batch; ++b) {
    const int rows = p.q_len(b) * group;
    if (rows <= kMaxRows || p.k_len(b) == 0) continue;  // one tile per head: nothing to share
    stage_offset[b] = stage_bytes;
    stage_bytes += 2 * head_bytes_per_key * staged_rows(p.k_len(b)) * p.num_kv_heads;
  }
  if (stage_bytes > 0 && stage_bytes <= kMaxStagedBytes) {
    char* base = staging_buffer(stage_bytes);
    for (int b = 0; b < p.batch; ++b) {
      if (stage_offset[b] < 0) continue;
      const int64_t per_head = head_bytes_per_key * staged_rows(p.k_len(b));
      for (int hk = 0; hk < p.num_kv_heads; ++hk) staged.push_back({b, hk});
      for (TileJob& t : tiles)
        if (t.b == b) {
          t.k_staged = base + stage_offset[b] + 2 * per_head * t.kv_head;
          t.v_staged = static_cast<const char*>(t.k_staged) + per_head;
        }
    }
    parallel_for(static_cast<int64_t>(staged.size()), [&](int64_t i, int) {
      const auto [b, hk] = staged[i];
      const int64_t per_head = head_bytes_per_key * staged_rows(p.k_len(b));
      char* k_dst = base + stage_offset[b] + 2 * per_head * hk;
      kernels.stage(p, b, hk, k_dst, k_dst + per_head);
    });
  }

  // Tiles of one (sequence, kv head) run back to back so its keys stay in cache; within a
  // head, longest key ranges first so that dynamic scheduling ends evenly.
  std::stable_sort(tiles.begin(), tiles.end(), [](const TileJob& a, const TileJob& c) {
    if (a.b != c.b || a.kv_head != c.kv_head) return a.b != c.b ? a.b < c.b : a.kv_head < c.kv_head;
    return a.kv_end - a.kv_begin > c.kv_end - c.kv_begin;
  });

  // 2. Split-KV (flash-decoding) when there are too few tiles to keep every thread busy.
  const int threads = num_threads();
  int want = p.num_splits;
  if (want == 0) {
    const int64_t target = 4LL * threads;
    want = static_cast<int64_t>(tiles.size()) >= target || threads == 1
               ? 1
               : static_cast<int>((target + static_cast<int64_t>(tiles.size()) - 1) / static_cast<int64_t>(tiles.size()));
  }
  std::vector<TileJob> jobs;
  std::vector<SplitGroup> groups;
  std::vector<float> partials;
  if (want <= 1) {
    jobs = std::move(tiles);
  } else {
    std::vector<int> nsplit(tiles.size());
    int64_t total = 0;
    for (size_t i = 0; i < tiles.size(); ++i) {
      const int len = tiles[i].kv_end - tiles[i].kv_begin;
      const int min_keys = p.num_splits > 0 ? kBlockN : kMinKeysPerSplit;
      nsplit[i] = std::max(1, std::min(want, len / min_keys));
      if (nsplit[i] > 1) total += nsplit[i] * partial_floats(tiles[i].rows_per_tile, p.head_dim);
    }
    partials.resize(total);
    float* next = partials.data();
    for (size_t i = 0; i < tiles.size(); ++i) {
      const TileJob& t = tiles[i];
      if (nsplit[i] == 1) {
        jobs.push_back(t);
        continue;
      }
      const int len = t.kv_end - t.kv_begin;
      const int chunk = ((len + nsplit[i] - 1) / nsplit[i] + kBlockN - 1) / kBlockN * kBlockN;
      const int n = (len + chunk - 1) / chunk;
      groups.push_back({t, next, n});
      for (int s = 0; s < n; ++s) {
        TileJob part = t;
        part.kv_begin = t.kv_begin + s * chunk;
        part.kv_end = std::min(t.kv_end, part.kv_begin + chunk);
        part.partial = next;
        next += partial_floats(t.rows_per_tile, p.head_dim);
        jobs.push_back(part);
      }
    }
  }

  // Waking the pool costs more than a tiny call (one short decode step): run those inline.
  int64_t work = 0;  // query rows x keys x head dim, summed over jobs
  for (const TileJob& j : jobs) work += int64_t(j.row_end - j.row_begin) * (j.kv_end - j.kv_begin) * p.head_dim;
  auto run_job = [&](int64_t i, int) { kernels.tile(p, jobs[i], worker_scratch()); };
  const bool all_decode = staged.empty() && std::all_of(jobs.begin(), jobs.end(), [](const TileJob& j) {
    return j.rows_per_tile == kFewRows;
  });
  const int64_t njobs = static_cast<int64_t>(jobs.size());
  if (work < kInlineWork) {
    for (int64_t i = 0; i < njobs; ++i) run_job(i, 0);
  } else if (all_decode) {
    // Runs of consecutive jobs per task, so each worker knows what it reads next (up to 8, while
    // leaving at least 4 tasks per thread for the dynamic balance).
    const int64_t per = std::max<int64_t>(1, std::min<int64_t>(8, njobs / (4 * threads)));
    parallel_for((njobs + per - 1) / per, [&](int64_t t, int) {
      const int64_t lo = t * per, hi = std::min(njobs, lo + per);
      KvPrefetcher pf(p, jobs.data() + lo, static_cast<int>(hi - lo), kPrefetchKeys);
      float* scratch = worker_scratch();
      for (int64_t i = lo; i < hi; ++i) {
        TileJob job = jobs[i];
        job.prefetch = &pf;
        kernels.tile(p, job, scratch);
      }
    });
  } else {
    parallel_for(njobs, run_job);
  }
  if (!groups.empty())
    parallel_for(static_cast<int64_t>(groups.size()), [&](int64_t i, int) { merge_splits(p, groups[i]); });
}

}  // namespace fastinfer::cpu
