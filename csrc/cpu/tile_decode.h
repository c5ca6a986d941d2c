// Few-rows tile kernel (decode): keys in the vector lanes.
#pragma once
#include "cpu/tile_common.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

// ---- few rows (decode): keys in the vector lanes, each row's scores reduced by a
// transpose tree, so 1-8 rows waste no lanes. Needs head_dim % 16 == 0.
struct FewRows {
  int nrows, D;
  float* s;      // nrows x kBlockN scores, then probabilities
  float* o;      // nrows x D, unnormalised output
  float* m;      // running max (log2 units)
  float* l;      // softmax denominator
  float* ipos;   // bottom-right aligned query position per row
  float* slope;  // ALiBi slope per row
  float alpha[kFewRows];
};

FewRows few_rows_setup(const AttentionParams& p, const TileJob& job, float* scratch, float* qrows_f32, uint16_t* qrows_raw) {
  const int D = p.head_dim, group = p.num_heads / p.num_kv_heads, b = job.b;
  const int sq = p.q_len(b), sk = p.k_len(b);
  FewRows f;
  f.nrows = job.row_end - job.row_begin;
  f.D = D;
  f.s = scratch + ScratchLayout::kQ;
  f.o = f.s + ScratchLayout::kS;
  f.m = f.o + ScratchLayout::kO + 2 * ScratchLayout::kKV;
  f.l = f.m + kMaxRows;
  f.ipos = f.l + kMaxRows;
  f.slope = f.ipos + kMaxRows;
  const char* qbase = static_cast<const char*>(p.q);
  for (int r = 0; r < f.nrows; ++r) {
    const int row = job.row_begin + r, t = row / group, h = job.kv_head * group + row % group;
    f.ipos[r] = static_cast<float>(t + sk - sq);
    f.slope[r] = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    const char* src = qbase + dtype_size(p.dtype) * (p.q_row_offset(b, t, p.q_batch_stride, p.q_row_stride) + h * p.q_head_stride);
    if (qrows_f32) row_to_f32(src, static_cast<int>(p.dtype), qrows_f32 + r * D, D);
    if (qrows_raw) std::memcpy(qrows_raw + r * D, src, 2 * D);
    f.m[r] = -std::numeric_limits<float>::infinity();
    f.l[r] = 0.f;
  }
  std::fill(f.o, f.o + f.nrows * D, 0.f);
  return f;
}

// Raw q.k sums of 16 keys (one vector) -> masked log2-domain scores stored at sr + jb.
inline void few_rows_scores(const AttentionParams& p, const FewRows& f, int r, int j0, int jb, int n, VecF x, float* sr) {
  const float inf = std::numeric_limits<float>::infinity();
  alignas(64) static const float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const VecF jv = vadd(vload(kIota), vset1(static_cast<float>(j0 + jb)));
  if (p.softcap == 0.f && p.alibi_slopes == nullptr) {
    x = vmul(x, vset1(p.softmax_scale * kLog2e));
  } else {
    x = vmul(x, vset1(p.softmax_scale));
    if (p.softcap > 0.f) x = vmul(vtanh(vmul(x, vset1(1.f / p.softcap))), vset1(p.softcap));
    if (p.alibi_slopes) x = vsub(x, vmul(vset1(f.slope[r]), vabs(vsub(vset1(f.ipos[r]), jv))));
    x = vmul(x, vset1(kLog2e));
  }
  // Visible keys: window limits and the end of the tile.
  const float lo = p.window_left >= 0 ? f.ipos[r] - p.window_left : -inf;
  const float hi = std::min(p.window_right >= 0 ? f.ipos[r] + p.window_right : inf, static_cast<float>(j0 + n - 1));
  vstore(sr + jb, vselect_range(x, jv, vset1(lo), vset1(hi), -inf));
}

// Online softmax of row r's scores (npad of them) in place; the rescale factor goes to f.alpha[r].
inline void few_rows_softmax(FewRows& f, int r, int npad) {
  float* sr = f.s + r * kBlockN;
  VecF mx = vset1(f.m[r]);
  for (int jb = 0; jb < npad; jb += kLanes) mx = vmax(mx, vload(sr + jb));
  // A row that has seen no key yet keeps a finite max so that -inf - max stays -inf.
  const float m_new = std::max(vreduce_max(mx), -std::numeric_limits<float>::max());
  f.alpha[r] = std::exp2(f.m[r] - m_new);
  VecF sum = vzero();
  for (int jb = 0; jb < npad; jb += kLanes) {
    const VecF pj = vexp2(vsub(vload(sr + jb), vset1(m_new)));
    vstore(sr + jb, pj);
    sum = vadd(sum, pj);
  }
  f.m[r] = m_new;
  f.l[r] = f.l[r] * f.alpha[r] + vreduce_add(sum);
}

void run_few_rows(const AttentionParams& p, const TileJob& job, float* scratch) {
  const int D = p.head_dim, C = D / kLanes, dt = static_cast<int>(p.dtype);
  float* q = scratch;
  FewRows f = few_rows_setup(p, job, scratch, q, nullptr);
  float* kbuf = f.o + ScratchLayout::kO;
  float* vbuf = kbuf + ScratchLayout::kKV;
  KeyTiles tiles(p, job);
  for (int j0 = job.kv_begin; j0 < job.kv_end; j0 += kBlockN) {
    const int n = std::min(kBlockN, job.kv_end - j0), npad = (n + 15) & ~15;
    const void* const* kr;
    const void* const* vr;
    tiles.start(j0, &kr, &vr);
    for (int jj = 0; jj < npad; ++jj) row_to_f32(kr[jj], jj < n ? dt : 0, kbuf + jj * D, D);
    for (int r = 0; r < f.nrows; ++r) {
      for (int jb = 0; jb < npad; jb += 16) {
        if (job.prefetch && r == 0) job.prefetch->advance(std::min(16, n - jb));  // small steps, as below
        VecF acc[16];
#pragma GCC unroll 16
        for (int jj = 0; jj < 16; ++jj) acc[jj] = vzero();
        for (int c = 0; c < C; ++c) {
          const VecF qv = vload(q + r * D + c * kLanes);
#pragma GCC unroll 16
          for (int jj = 0; jj < 16; ++jj) acc[jj] = vfma(qv, vload(kbuf + (jb + jj) * D + c * kLanes), acc[jj]);
        }
        few_rows_scores(p, f, r, j0, jb, n, vtranspose_reduce16(acc), f.s + r * kBlockN);
      }
      few_rows_softmax(f, r, npad);
    }
    // Values: o[r] = alpha * o[r] + sum_j p[r][j] * v[j].
    for (int jj = 0; jj < n; ++jj) row_to_f32(vr[jj], dt, vbuf + jj * D, D);
    for (int r = 0; r < f.nrows; ++r) {
      const float* pr = f.s + r * kBlockN;
      const VecF alpha = vset1(f.alpha[r]);
      for (int c0 = 0; c0 < C; c0 += 8) {
        const int cn = std::min(8, C - c0);
        VecF acc[8];
        for (int c = 0; c < cn; ++c) acc[c] = vmul(vload(f.o + r * D + (c0 + c) * kLanes), alpha);
        for (int jj = 0; jj < n; ++jj) {
          const VecF pj = vset1(pr[jj]);
          const float* vrow = vbuf + jj * D + c0 * kLanes;
          for (int c = 0; c < cn; ++c) acc[c] = vfma(pj, vload(vrow + c * kLanes), acc[c]);
        }
        for (int c = 0; c < cn; ++c) vstore(f.o + r * D + (c0 + c) * kLanes, acc[c]);
      }
    }
  }
  store_tile(p, job, f.o, D, 1, f.m, f.l);
}

#if defined(__AVX512BF16__)
// bf16 few rows with vdpbf16ps on the keys where they lie and pair-packed values. Needs head_dim % 32 == 0.
void run_few_rows_bf16(const AttentionParams& p, const TileJob& job, float* scratch) {
  const int D = p.head_dim, C32 = D / 32, C16 = D / 16;
  uint16_t* q = reinterpret_cast<uint16_t*>(scratch);
  FewRows f = few_rows_setup(p, job, scratch, nullptr, q);
  uint16_t* pb = reinterpret_cast<uint16_t*>(f.o + ScratchLayout::kO);  // bf16 probabilities, nrows x kBlockN
  uint32_t* vp = reinterpret_cast<uint32_t*>(f.o + ScratchLayout::kO + ScratchLayout::kKV);
  KeyTiles tiles(p, job);
  for (int j0 = job.kv_begin; j0 < job.kv_end; j0 += kBlockN) {
    const int n = std::min(kBlockN, job.kv_end - j0), npad = (n + 15) & ~15;
    const void* const* kr;
    const void* const* vr;
    tiles.start(j0, &kr, &vr);
    // Keys are read where they are (kZeroRow past the end reads as bf16 zeros).
    const uint16_t* const* krow = reinterpret_cast<const uint16_t* const*>(kr);
    for (int r = 0; r < f.nrows; ++r) {
      for (int jb = 0; jb < npad; jb += 16) {
        // Prefetches in small steps between dot products: a whole tile's at once fills the
        // miss queue and stalls the core on the prefetch instructions themselves.
        if (job.prefetch && r == 0) job.prefetch->advance(std::min(16, n - jb));
        VecF acc[16];
#pragma GCC unroll 16
        for (int jj = 0; jj < 16; ++jj) acc[jj].v = _mm512_setzero_ps();
        for (int c = 0; c < C32; ++c) {
          const __m512i qv = _mm512_loadu_si512(q + r * D + c * 32);
#pragma GCC unroll 16
          for (int jj = 0; jj < 16; ++jj)
            acc[jj].v = _mm512_dpbf16_ps(acc[jj].v, (__m512bh)_mm512_loadu_si512(krow[jb + jj] + c * 32), (__m512bh)qv);
        }
        few_rows_scores(p, f, r, j0, jb, n, vtranspose_reduce16(acc), f.s + r * kBlockN);
      }
      few_rows_softmax(f, r, npad);
      for (int jb = 0; jb < npad; jb += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + r * kBlockN + jb),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(f.s + r * kBlockN + jb)));
    }
    const int pairs = (n + 1) / 2;
    pack_v_bf16(vr, 2 * pairs, D, vp);
    for (int r = 0; r < f.nrows; ++r) {
      const uint16_t* pr = pb + r * kBlockN;
      const __m512 alpha = _mm512_set1_ps(f.alpha[r]);
      for (int c0 = 0; c0 < C16; c0 += 8) {
        const int cn = std::min(8, C16 - c0);
        __m512 acc[8];
        for (int c = 0; c < cn; ++c) acc[c] = _mm512_mul_ps(_mm512_loadu_ps(f.o + r * D + (c0 + c) * 16), alpha);
        for (int mm = 0; mm < pairs; ++mm) {
          const __m512i pw = _mm512_set1_epi32(static_cast<int>(load_u32(pr + 2 * mm)));
          const uint32_t* vrow = vp + mm * D + c0 * 16;
          for (int c = 0; c < cn; ++c)
            acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_loadu_si512(vrow + c * 16), (__m512bh)pw);
        }
        for (int c = 0; c < cn; ++c) _mm512_storeu_ps(f.o + r * D + (c0 + c) * 16, acc[c]);
      }
    }
  }
  store_tile(p, job, f.o, D, 1, f.m, f.l);
}
#endif

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
