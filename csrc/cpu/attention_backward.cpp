// ISA-independent driver of the CPU attention backward: per-row log-sum-exp (log2 units)
// and delta = rowsum(dO * O), then one parallel run over the dK/dV and dQ tasks
// (see attention_backward.h), then zeros for packed rows outside every sequence.
#define FI_ISA_NS base
#include "cpu/attention_backward.h"

#include <algorithm>
#include <functional>
#include <memory>
#include <new>
#include <tuple>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#include "cpu/vec.h"

namespace fastinfer::cpu {

namespace {

constexpr int64_t kInlineWork = int64_t(1) << 18;  // below this many row x key x dim products, run on the caller

// One getter per level of isa_list.h. The backward has no bf16 dot-product kernels yet: the
// bf16/AMX levels (null here) run the AVX-512 float kernels.
BackwardKernels pick_backward_kernels() {
#define FI_ISA_ROW(suffix, Enum, name, arch, flags, att, bwd, lin, pw, pred) FI_ISA_ENTRY(arch, bwd, backward_kernels_##suffix)
  static constexpr BackwardKernels (*kTable[])() = {FI_CPU_ISAS(FI_ISA_ROW)};
#undef FI_ISA_ROW
  return pick_isa(kTable)();
}

struct AlignedDelete {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
};

float* backward_scratch() {
  // One buffer per OS thread; pool workers are persistent, so this is allocated once.
  thread_local std::unique_ptr<float[], AlignedDelete> buf;
  if (!buf)
    buf.reset(static_cast<float*>(::operator new[](sizeof(float) * BwdScratchLayout::kTotal, std::align_val_t(64))));
  return buf.get();
}

// lse2 and delta of the packed rows of (b, kv head) (rows r = t*group + g).
void row_info(const AttentionBackwardParams& bp, int b, int hk, float* lse2, float* delta) {
  const AttentionParams& p = bp.fwd;
  const int D = p.head_dim, group = p.num_heads / p.num_kv_heads, rows = p.q_len(b) * group;
  const int esz = dtype_size(p.dtype), dt = static_cast<int>(p.dtype);
  float o[kMaxHeadDim], g[kMaxHeadDim];
  for (int r = 0; r < rows; ++r) {
    const int t = r / group, h = hk * group + r % group;
    const int64_t row = p.cu_seqlens_q ? p.cu_seqlens_q[b] + t : t;
    lse2[r] = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] * base::kLog2e;  // +inf stays
    base::row_to_f32(static_cast<const char*>(p.out) +
                         esz * (p.q_row_offset(b, t, p.o_batch_stride, p.o_row_stride) + h * p.o_head_stride),
                     dt, o, D);
    base::row_to_f32(static_cast<const char*>(bp.dout) +
                         esz * (p.q_row_offset(b, t, bp.do_batch_stride, bp.do_row_stride) + h * bp.do_head_stride),
                     dt, g, D);
    float acc = 0.f;
    for (int d = 0; d < D; ++d) acc += o[d] * g[d];
    delta[r] = acc;
  }
}

// Zeros rows [from, to) (all heads) of a packed tensor.
void zero_rows(void* base, DType dt, int64_t row_stride, int64_t head_stride, int heads, int D, int64_t from, int64_t to) {
  const int esz = dtype_size(dt);
  for (int64_t r = from; r < to; ++r)
    for (int h = 0; h < heads; ++h)
      std::fill_n(static_cast<char*>(base) + esz * (r * row_stride + h * head_stride), esz * D, char(0));
}

}  // namespace

void attention_backward(const AttentionBackwardParams& params) {
  AttentionBackwardParams bp = params;
  bp.fwd = with_normalized_windows(params.fwd);
  const AttentionParams& p = bp.fwd;
  const BackwardKernels kernels = pick_backward_kernels();
  const int group = p.num_heads / p.num_kv_heads;

  // 1. Row info of every (sequence, kv head): rows*2 floats at info[offset[b] + 2*rows*hk].
  std::vector<int64_t> offset(static_cast<size_t>(p.batch) + 1, 0);
  for (int b = 0; b < p.batch; ++b) offset[b + 1] = offset[b] + 2 * static_cast<int64_t>(p.q_len(b)) * p.num_heads;
  std::vector<float> info(static_cast<size_t>(offset[p.batch]));
  auto lse2_of = [&](int b, int hk) { return info.data() + offset[b] + 2 * static_cast<int64_t>(p.q_len(b)) * group * hk; };

  // 2. Tasks: dK/dV per key tile, dQ per row tile; estimated cost = rows x keys visited.
  struct Job {
    BwdTask task;
    bool dkdv;
    int64_t cost;
  };
  std::vector<Job> jobs;
  int64_t work = 0;
  // Window edges in int64 (a window up to INT_MAX must not wrap); results are clamped to the sequence.
  const int64_t wl = p.window_left, wr = p.window_right;
  for (int b = 0; b < p.batch; ++b) {
    const int sq = p.q_len(b), sk = p.k_len(b), rows = sq * group;
    const int64_t shift = int64_t(sk) - sq;
    for (int hk = 0; hk < p.num_kv_heads; ++hk) {
      const float* lse2 = lse2_of(b, hk);
      const float* delta = lse2 + rows;
      for (int j0 = 0; j0 < sk; j0 += kBwdKeys) {
        const int j1 = std::min(sk, j0 + kBwdKeys);
        const int64_t t_lo = std::max<int64_t>(0, wr >= 0 ? j0 - wr - shift : 0);
        const int64_t t_hi = std::min<int64_t>(sq - 1, wl >= 0 ? j1 - 1 + wl - shift : sq - 1);
        const int64_t cost = std::max<int64_t>(0, t_hi - t_lo + 1) * group * (j1 - j0) + 1;
        jobs.push_back({{b, hk, j0, j1, lse2, delta}, true, cost});
      }
      for (int r0 = 0; r0 < rows; r0 += kBwdRows) {
        const int r1 = std::min(rows, r0 + kBwdRows);
        const int64_t ia = r0 / group + shift, ib = (r1 - 1) / group + shift;
        const int64_t lo = wl >= 0 ? std::max<int64_t>(0, ia - wl) : 0, hi = wr >= 0 ? std::min<int64_t>(sk, ib + wr + 1) : sk;
        jobs.push_back({{b, hk, r0, r1, lse2, delta}, false, int64_t(r1 - r0) * std::max<int64_t>(0, hi - lo) + 1});
      }
    }
  }
  for (const Job& j : jobs) work += j.cost * p.head_dim;
  // Longest first, so that dynamic scheduling ends evenly. Results do not depend on the order.
  std::stable_sort(jobs.begin(), jobs.end(), [](const Job& a, const Job& c) { return a.cost > c.cost; });

  const bool inline_run = work < kInlineWork;
  auto run = [&](int64_t n, const std::function<void(int64_t, int)>& fn) {
    if (inline_run) {
      for (int64_t i = 0; i < n; ++i) fn(i, 0);
    } else {
      parallel_for(n, fn);
    }
  };
  run(static_cast<int64_t>(p.batch) * p.num_kv_heads, [&](int64_t i, int) {
    const int b = static_cast<int>(i / p.num_kv_heads), hk = static_cast<int>(i % p.num_kv_heads);
    float* lse2 = lse2_of(b, hk);
    row_info(bp, b, hk, lse2, lse2 + static_cast<int64_t>(p.q_len(b)) * group);
  });
  run(static_cast<int64_t>(jobs.size()), [&](int64_t i, int) {
    const Job& j = jobs[i];
    (j.dkdv ? kernels.dkdv : kernels.dq)(bp, j.task, backward_scratch());
  });

  // 3. Packed rows outside every sequence.
  if (p.cu_seqlens_q) {
    zero_rows(bp.dq, p.dtype, bp.dq_row_stride, bp.dq_head_stride, p.num_heads, p.head_dim, 0, p.cu_seqlens_q[0]);
    zero_rows(bp.dq, p.dtype, bp.dq_row_stride, bp.dq_head_stride, p.num_heads, p.head_dim, p.cu_seqlens_q[p.batch], bp.total_q);
  }
  if (p.cu_seqlens_k) {
    for (auto [ptr, rs, hs] : {std::tuple<void*, int64_t, int64_t>{bp.dk, bp.dk_row_stride, bp.dk_head_stride},
                               std::tuple<void*, int64_t, int64_t>{bp.dv, bp.dv_row_stride, bp.dv_head_stride}}) {
      zero_rows(ptr, p.dtype, rs, hs, p.num_kv_heads, p.head_dim, 0, p.cu_seqlens_k[0]);
      zero_rows(ptr, p.dtype, rs, hs, p.num_kv_heads, p.head_dim, p.cu_seqlens_k[p.batch], bp.total_k);
    }
  }
}

}  // namespace fastinfer::cpu
