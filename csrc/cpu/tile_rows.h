// Rows-in-lanes tile kernel (prefill, chunks, GQA groups of >= 9 rows).
#pragma once
#include "cpu/tile_common.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

template <int RV, bool kBf16Dot>
void run_tile(const AttentionParams& p, const TileJob& job, float* scratch) {
  constexpr int R = RV * kLanes;
  const int D = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int b = job.b, hk = job.kv_head, sq = p.q_len(b), sk = p.k_len(b);
  const int nrows = job.row_end - job.row_begin;
  const int dt = static_cast<int>(p.dtype), esz = dtype_size(p.dtype);

  float* qt = scratch;
  float* s = qt + ScratchLayout::kQ;
  float* ot = s + ScratchLayout::kS;
  float* kbuf = ot + ScratchLayout::kO;
  float* vbuf = kbuf + ScratchLayout::kKV;
  float* m = vbuf + ScratchLayout::kKV;
  float* l = m + kMaxRows;
  float* ipos = l + kMaxRows;
  float* slope = ipos + kMaxRows;
  float* rowtmp = slope + kMaxRows;
  uint32_t* ppack = reinterpret_cast<uint32_t*>(rowtmp + kMaxHeadDim);

  // Pack Q^T. Padding rows repeat the last real row so that they stay finite.
  const char* qbase = static_cast<const char*>(p.q);
  for (int r = 0; r < R; ++r) {
    const int row = job.row_begin + std::min(r, nrows - 1);
    const int t = row / group, h = hk * group + row % group;
    ipos[r] = static_cast<float>(t + sk - sq);  // bottom-right aligned position of this query
    slope[r] = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    const char* qrow = qbase + esz * (p.q_row_offset(b, t, p.q_batch_stride, p.q_row_stride) + h * p.q_head_stride);
    if constexpr (kBf16Dot) {
      uint32_t* q32 = reinterpret_cast<uint32_t*>(qt);
      for (int pp = 0; pp < D / 2; ++pp) q32[pp * R + r] = load_u32(qrow + 4 * pp);
    } else {
      row_to_f32(qrow, dt, rowtmp, D);
      for (int d = 0; d < D; ++d) qt[d * R + r] = rowtmp[d];
    }
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  std::fill(ot, ot + D * R, 0.f);

  const float imin = ipos[0], imax = ipos[nrows - 1];
  const int row_bytes = D * esz;
  const bool staged = job.k_staged != nullptr;
  KeyTiles tiles(p, job);
  VecF alpha[RV];
  for (int j0 = job.kv_begin; j0 < job.kv_end; j0 += kBlockN) {
    const int n = std::min(kBlockN, job.kv_end - j0), npad = (n + 7) & ~7;
    const void* const* kr = nullptr;
    const void* const* vr = nullptr;
    if (!staged) tiles.start(j0, &kr, &vr);
    // Keys are read from a contiguous tile: rows of a cache are often 4 KiB apart and
    // would all fall into the same L1 sets during the broadcast-heavy QK^T loop.
    const bool need_mask = (p.window_right >= 0 && j0 + n - 1 > imin + p.window_right) ||
                           (p.window_left >= 0 && j0 < imax - p.window_left);
    if constexpr (kBf16Dot) {
#if defined(__AVX512BF16__)
      const uint16_t* kt = job.k_staged ? static_cast<const uint16_t*>(job.k_staged) + static_cast<int64_t>(j0) * D : nullptr;
      const uint32_t* vpk = job.v_staged ? static_cast<const uint32_t*>(job.v_staged) + static_cast<int64_t>(j0 / 2) * D : nullptr;
      if (!staged) {
        uint16_t* kcopy = reinterpret_cast<uint16_t*>(kbuf);
        for (int jj = 0; jj < npad; ++jj) copy_row(kcopy + jj * D, kr[jj], row_bytes);
        pack_v_bf16(vr, npad, D, reinterpret_cast<uint32_t*>(vbuf));
        kt = kcopy;
        vpk = reinterpret_cast<const uint32_t*>(vbuf);
      }
      qk_bf16<RV>(reinterpret_cast<const uint32_t*>(qt), kt, npad, D, s);
      online_softmax<RV>(p, j0, n, npad, s, m, l, ipos, slope, need_mask, alpha);
      pack_p_bf16<RV>(s, npad, ppack);
      pv_bf16<RV>(ppack, vpk, npad, D, ot, alpha);
#endif
    } else {
      const float* kt = job.k_staged ? static_cast<const float*>(job.k_staged) + static_cast<int64_t>(j0) * D : nullptr;
      const float* vt = job.v_staged ? static_cast<const float*>(job.v_staged) + static_cast<int64_t>(j0) * D : nullptr;
      if (!staged) {
        for (int jj = 0; jj < npad; ++jj) {
          row_to_f32(kr[jj], jj < n ? dt : 0, kbuf + jj * D, D);
          row_to_f32(vr[jj], jj < n ? dt : 0, vbuf + jj * D, D);
        }
        kt = kbuf;
        vt = vbuf;
      }
      qk_f32<RV>(qt, kt, npad, D, s);
      online_softmax<RV>(p, j0, n, npad, s, m, l, ipos, slope, need_mask, alpha);
      pv_f32<RV>(s, vt, npad, D, ot, alpha);
    }
  }
  store_tile(p, job, ot, 1, R, m, l);
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
