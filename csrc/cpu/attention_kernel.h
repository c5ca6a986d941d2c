// The CPU flash-attention tile kernel, compiled once per SIMD level.
//
// Layout choice: a tile holds up to 32 query rows in the vector lanes, so the
// online softmax (running max, rescale, exp, row sums) is purely vertical
// vector arithmetic and each key or value element is a broadcast operand.
//   S^T[j][r]  = sum_d K[j][d] * Q^T[d][r]        (Q^T packed once per tile)
//   O^T[d][r] += sum_j V[j][d] * P^T[j][r]
// With AVX-512 BF16, bf16 inputs use vdpbf16ps on (d, d+1) pairs for QK^T and on
// (j, j+1) key pairs for PV; every other case converts tiles to float and uses FMA.
#pragma once
#include <algorithm>
#include <cstring>
#include <limits>

#include "cpu/attention_cpu.h"
#include "cpu/vec.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

#if defined(__AVX512F__)
constexpr bool kWide = true;  // 32 vector registers
#else
constexpr bool kWide = false;
#endif

alignas(64) const float kZeroRow[kMaxHeadDim] = {};  // stands in for keys past the end of a tile

inline uint32_t load_u32(const void* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// S^T (npad x R) = K (npad x D) . Q^T (D x R), float.
template <int RV>
inline void qk_f32(const float* qt, const float* kt, int npad, int D, float* s) {
  constexpr int R = RV * kLanes;
  constexpr int KB = kWide ? 8 : (RV == 1 ? 4 : 2);
  for (int jb = 0; jb < npad; jb += KB) {
    VecF acc[KB][RV];
    const float* kr[KB];
    for (int jj = 0; jj < KB; ++jj) {
      kr[jj] = kt + (jb + jj) * D;
      for (int rv = 0; rv < RV; ++rv) acc[jj][rv] = vzero();
    }
    for (int d = 0; d < D; ++d) {
      VecF q[RV];
      for (int rv = 0; rv < RV; ++rv) q[rv] = vload(qt + d * R + rv * kLanes);
      for (int jj = 0; jj < KB; ++jj) {
        const VecF kb = vset1(kr[jj][d]);
        for (int rv = 0; rv < RV; ++rv) acc[jj][rv] = vfma(kb, q[rv], acc[jj][rv]);
      }
    }
    for (int jj = 0; jj < KB; ++jj)
      for (int rv = 0; rv < RV; ++rv) vstore(s + (jb + jj) * R + rv * kLanes, acc[jj][rv]);
  }
}

// O^T (D x R) = alpha * O^T + V^T (D x npad) . P^T (npad x R), float.
template <int RV>
inline void pv_f32(const float* pt, const float* vt, int npad, int D, float* ot, const VecF* alpha) {
  constexpr int R = RV * kLanes;
  constexpr int DB = kWide ? 8 : (RV == 1 ? 4 : 2);
  for (int d0 = 0; d0 < D; d0 += DB) {
    VecF acc[DB][RV];
    for (int dd = 0; dd < DB; ++dd)
      for (int rv = 0; rv < RV; ++rv) acc[dd][rv] = vmul(vload(ot + (d0 + dd) * R + rv * kLanes), alpha[rv]);
    for (int j = 0; j < npad; ++j) {
      VecF pj[RV];
      for (int rv = 0; rv < RV; ++rv) pj[rv] = vload(pt + j * R + rv * kLanes);
      const float* vr = vt + j * D + d0;
      for (int dd = 0; dd < DB; ++dd) {
        const VecF vb = vset1(vr[dd]);
        for (int rv = 0; rv < RV; ++rv) acc[dd][rv] = vfma(vb, pj[rv], acc[dd][rv]);
      }
    }
    for (int dd = 0; dd < DB; ++dd)
      for (int rv = 0; rv < RV; ++rv) vstore(ot + (d0 + dd) * R + rv * kLanes, acc[dd][rv]);
  }
}

#if defined(__AVX512BF16__)
// qt holds (Q[r][2p], Q[r][2p+1]) pairs as 32-bit words at [p*R + r].
template <int RV>
inline void qk_bf16(const uint32_t* qt, const uint16_t* kt, int npad, int D, float* s) {
  constexpr int R = RV * kLanes;
  for (int jb = 0; jb < npad; jb += 8) {
    __m512 acc[8][RV];
    for (int jj = 0; jj < 8; ++jj)
      for (int rv = 0; rv < RV; ++rv) acc[jj][rv] = _mm512_setzero_ps();
    for (int pp = 0; pp < D / 2; ++pp) {
      __m512i q[RV];
      for (int rv = 0; rv < RV; ++rv) q[rv] = _mm512_loadu_si512(qt + pp * R + rv * kLanes);
      for (int jj = 0; jj < 8; ++jj) {
        const __m512i kb = _mm512_set1_epi32(static_cast<int>(load_u32(kt + (jb + jj) * D + 2 * pp)));
        for (int rv = 0; rv < RV; ++rv)
          acc[jj][rv] = _mm512_dpbf16_ps(acc[jj][rv], (__m512bh)q[rv], (__m512bh)kb);
      }
    }
    for (int jj = 0; jj < 8; ++jj)
      for (int rv = 0; rv < RV; ++rv) _mm512_storeu_ps(s + (jb + jj) * R + rv * kLanes, acc[jj][rv]);
  }
}

// P^T rows (2m, 2m+1) -> bf16 pairs at pt[m*R + r].
template <int RV>
inline void pack_p_bf16(const float* s, int npad, uint32_t* pt) {
  constexpr int R = RV * kLanes;
  for (int m = 0; m < npad / 2; ++m)
    for (int rv = 0; rv < RV; ++rv) {
      const __m256i a = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + 2 * m * R + rv * kLanes));
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + (2 * m + 1) * R + rv * kLanes));
      const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(pt + m * R + rv * kLanes, w);
    }
}

// V rows (2m, 2m+1) -> interleaved pairs at vp[m*D + d].
inline void pack_v_bf16(const void* const* vrow, int npad, int D, uint32_t* vp) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  for (int m = 0; m < npad / 2; ++m) {
    const uint16_t* a = static_cast<const uint16_t*>(vrow[2 * m]);
    const uint16_t* b = static_cast<const uint16_t*>(vrow[2 * m + 1]);
    uint32_t* out = vp + m * D;
    int d = 0;
    for (; d + 32 <= D; d += 32) {
      const __m512i va = _mm512_loadu_si512(a + d), vb = _mm512_loadu_si512(b + d);
      _mm512_storeu_si512(out + d, _mm512_permutex2var_epi16(va, ilo, vb));
      _mm512_storeu_si512(out + d + 16, _mm512_permutex2var_epi16(va, ihi, vb));
    }
    for (; d < D; ++d) out[d] = static_cast<uint32_t>(a[d]) | static_cast<uint32_t>(b[d]) << 16;
  }
}

template <int RV>
inline void pv_bf16(const uint32_t* pt, const uint32_t* vp, int npad, int D, float* ot, const VecF* alpha) {
  constexpr int R = RV * kLanes;
  for (int d0 = 0; d0 < D; d0 += 8) {
    __m512 acc[8][RV];
    for (int dd = 0; dd < 8; ++dd)
      for (int rv = 0; rv < RV; ++rv)
        acc[dd][rv] = _mm512_mul_ps(_mm512_loadu_ps(ot + (d0 + dd) * R + rv * kLanes), alpha[rv].v);
    for (int m = 0; m < npad / 2; ++m) {
      __m512i pj[RV];
      for (int rv = 0; rv < RV; ++rv) pj[rv] = _mm512_loadu_si512(pt + m * R + rv * kLanes);
      const uint32_t* vr = vp + m * D + d0;
      for (int dd = 0; dd < 8; ++dd) {
        const __m512i vb = _mm512_set1_epi32(static_cast<int>(vr[dd]));
        for (int rv = 0; rv < RV; ++rv) acc[dd][rv] = _mm512_dpbf16_ps(acc[dd][rv], (__m512bh)pj[rv], (__m512bh)vb);
      }
    }
    for (int dd = 0; dd < 8; ++dd)
      for (int rv = 0; rv < RV; ++rv) _mm512_storeu_ps(ot + (d0 + dd) * R + rv * kLanes, acc[dd][rv]);
  }
}
#endif

// Walks a job's keys in tiles of kBlockN and prefetches the next tile's rows while
// the current one computes (paged rows are scattered, so hardware prefetch can't help).
class KeyTiles {
 public:
  KeyTiles(const AttentionParams& p, const TileJob& job)
      : p_(p), b_(job.b), hk_(job.kv_head), end_(job.k_staged ? 0 : job.kv_end), esz_(dtype_size(p.dtype)),
        row_bytes_(p.head_dim * esz_) {
    if (job.kv_begin < end_) locate(job.kv_begin, 0);
  }
  // Call once per tile, in order: returns the tile's key/value row pointers (kZeroRow past the end).
  void start(int j0, const void* const** k, const void* const** v) {
    if (j0 + kBlockN < end_) {
      locate(j0 + kBlockN, cur_ ^ 1);
      const int nn = std::min(kBlockN, end_ - j0 - kBlockN);
      for (int jj = 0; jj < nn; ++jj)
        for (int off = 0; off < row_bytes_; off += 64) {
          __builtin_prefetch(static_cast<const char*>(k_[cur_ ^ 1][jj]) + off, 0, 2);
          __builtin_prefetch(static_cast<const char*>(v_[cur_ ^ 1][jj]) + off, 0, 2);
        }
    }
    *k = k_[cur_];
    *v = v_[cur_];
    cur_ ^= 1;
  }

 private:
  void locate(int j0, int slot) {
    const int n = std::min(kBlockN, end_ - j0);
    const char* kbase = static_cast<const char*>(p_.k);
    const char* vbase = static_cast<const char*>(p_.v);
    for (int jj = 0; jj < n; ++jj) {
      k_[slot][jj] = kbase + esz_ * (p_.kv_row_offset(b_, j0 + jj, p_.k_batch_stride, p_.k_row_stride) + hk_ * p_.k_head_stride);
      v_[slot][jj] = vbase + esz_ * (p_.kv_row_offset(b_, j0 + jj, p_.v_batch_stride, p_.v_row_stride) + hk_ * p_.v_head_stride);
    }
    for (int jj = n; jj < kBlockN; ++jj) k_[slot][jj] = v_[slot][jj] = kZeroRow;
  }

  const AttentionParams& p_;
  const int b_, hk_, end_, esz_, row_bytes_;
  const void* k_[2][kBlockN];
  const void* v_[2][kBlockN];
  int cur_ = 0;
};

// Scores of one key tile -> probabilities in place; updates the running max m
// (log2 units) and denominator l, and returns the rescale factor alpha per row.
template <int RV>
inline void online_softmax(const AttentionParams& p, int j0, int n, int npad, float* s, float* m, float* l,
                           const float* ipos, const float* slope, bool need_mask, VecF* alpha) {
  constexpr int R = RV * kLanes;
  const float inf = std::numeric_limits<float>::infinity();
  const bool plain = p.softcap == 0.f && p.alibi_slopes == nullptr;
  const VecF scale = vset1(plain ? p.softmax_scale * kLog2e : p.softmax_scale);
  const VecF log2e = vset1(kLog2e);
  const VecF cap = vset1(p.softcap), inv_cap = vset1(p.softcap > 0.f ? 1.f / p.softcap : 0.f);
  VecF pos[RV], lo[RV], hi[RV], sl[RV], mx[RV];
  for (int rv = 0; rv < RV; ++rv) {
    pos[rv] = vload(ipos + rv * kLanes);
    lo[rv] = p.window_left >= 0 ? vsub(pos[rv], vset1(static_cast<float>(p.window_left))) : vset1(-inf);
    hi[rv] = p.window_right >= 0 ? vadd(pos[rv], vset1(static_cast<float>(p.window_right))) : vset1(inf);
    sl[rv] = vload(slope + rv * kLanes);
    mx[rv] = vload(m + rv * kLanes);
  }
  for (int jj = 0; jj < n; ++jj) {
    const VecF jv = vset1(static_cast<float>(j0 + jj));
    for (int rv = 0; rv < RV; ++rv) {
      VecF x = vmul(vload(s + jj * R + rv * kLanes), scale);
      if (!plain) {
        if (p.softcap > 0.f) x = vmul(vtanh(vmul(x, inv_cap)), cap);
        if (p.alibi_slopes) x = vsub(x, vmul(sl[rv], vabs(vsub(pos[rv], jv))));
        x = vmul(x, log2e);
      }
      if (need_mask) x = vselect_range(x, jv, lo[rv], hi[rv], -inf);
      vstore(s + jj * R + rv * kLanes, x);
      mx[rv] = vmax(mx[rv], x);
    }
  }
  VecF sum[RV];
  for (int rv = 0; rv < RV; ++rv) {
    // A row that has seen no key yet keeps a finite max so that -inf - max stays -inf (never NaN).
    mx[rv] = vmax(mx[rv], vset1(-std::numeric_limits<float>::max()));
    alpha[rv] = vexp2(vsub(vload(m + rv * kLanes), mx[rv]));
    vstore(m + rv * kLanes, mx[rv]);
    sum[rv] = vzero();
  }
  for (int jj = 0; jj < npad; ++jj)
    for (int rv = 0; rv < RV; ++rv) {
      const VecF pj = jj < n ? vexp2(vsub(vload(s + jj * R + rv * kLanes), mx[rv])) : vzero();
      vstore(s + jj * R + rv * kLanes, pj);
      sum[rv] = vadd(sum[rv], pj);
    }
  for (int rv = 0; rv < RV; ++rv)
    vstore(l + rv * kLanes, vfma(vload(l + rv * kLanes), alpha[rv], sum[rv]));
}

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
      const uint16_t* kt = static_cast<const uint16_t*>(job.k_staged) + static_cast<int64_t>(j0) * D;
      const uint32_t* vpk = static_cast<const uint32_t*>(job.v_staged) + static_cast<int64_t>(j0 / 2) * D;
      if (!staged) {
        uint16_t* kcopy = reinterpret_cast<uint16_t*>(kbuf);
        for (int jj = 0; jj < npad; ++jj) std::memcpy(kcopy + jj * D, kr[jj], row_bytes);
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
      const float* kt = static_cast<const float*>(job.k_staged) + static_cast<int64_t>(j0) * D;
      const float* vt = static_cast<const float*>(job.v_staged) + static_cast<int64_t>(j0) * D;
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
        VecF acc[16];
        for (int jj = 0; jj < 16; ++jj) acc[jj] = vzero();
        for (int c = 0; c < C; ++c) {
          const VecF qv = vload(q + r * D + c * kLanes);
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
// bf16 few rows with vdpbf16ps on raw bf16 keys and pair-packed values. Needs head_dim % 32 == 0.
void run_few_rows_bf16(const AttentionParams& p, const TileJob& job, float* scratch) {
  const int D = p.head_dim, C32 = D / 32, C16 = D / 16;
  uint16_t* q = reinterpret_cast<uint16_t*>(scratch);
  FewRows f = few_rows_setup(p, job, scratch, nullptr, q);
  uint16_t* kt = reinterpret_cast<uint16_t*>(f.o + ScratchLayout::kO);
  uint32_t* vp = reinterpret_cast<uint32_t*>(f.o + ScratchLayout::kO + ScratchLayout::kKV);
  uint16_t* pb = kt + kBlockN * D;  // bf16 probabilities, nrows x kBlockN (the kKV region holds 2x the keys)
  KeyTiles tiles(p, job);
  for (int j0 = job.kv_begin; j0 < job.kv_end; j0 += kBlockN) {
    const int n = std::min(kBlockN, job.kv_end - j0), npad = (n + 15) & ~15;
    const void* const* kr;
    const void* const* vr;
    tiles.start(j0, &kr, &vr);
    for (int jj = 0; jj < npad; ++jj) std::memcpy(kt + jj * D, kr[jj], 2 * D);
    for (int r = 0; r < f.nrows; ++r) {
      for (int jb = 0; jb < npad; jb += 16) {
        VecF acc[16];
        for (int jj = 0; jj < 16; ++jj) acc[jj].v = _mm512_setzero_ps();
        for (int c = 0; c < C32; ++c) {
          const __m512i qv = _mm512_loadu_si512(q + r * D + c * 32);
          for (int jj = 0; jj < 16; ++jj)
            acc[jj].v = _mm512_dpbf16_ps(acc[jj].v, (__m512bh)_mm512_loadu_si512(kt + (jb + jj) * D + c * 32), (__m512bh)qv);
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

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
// ---- AMX: S^T = K.Q^T and O = P.V on the tile unit; softmax stays vertical in AVX-512.
//   A operands are plain row-major bf16 (keys, or probabilities), B operands are
//   "VNNI" pairs: Q^T pairs of d (packed once per tile), V pairs of keys (pack_v_bf16).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Loaded per job: another library (oneDNN in torch) may have configured the tiles differently.
inline void amx_configure() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit words.
inline void transpose16_u32(const uint32_t* src, int64_t sstride, uint32_t* dst, int64_t dstride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(src + i * sstride));
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_si512(dst + i * dstride, _mm512_castps_si512(_mm512_shuffle_f32x4(t[i], t[i + 8], 0x88)));
    _mm512_storeu_si512(dst + (i + 8) * dstride, _mm512_castps_si512(_mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd)));
  }
}

// RB row blocks of 16 rows. Needs bf16 and head_dim % 32 == 0.
template <int RB>
void run_tile_amx(const AttentionParams& p, const TileJob& job, float* scratch) {
  constexpr int R = RB * kLanes;
  const int D = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int b = job.b, hk = job.kv_head, sq = p.q_len(b), sk = p.k_len(b);
  const int nrows = job.row_end - job.row_begin;

  uint32_t* q32 = reinterpret_cast<uint32_t*>(scratch);  // Q^T pairs: [d/2][R]
  float* s = scratch + ScratchLayout::kQ;                  // S^T: [key][R]
  float* o = s + ScratchLayout::kS;                        // O: [R][D]
  uint16_t* kbuf = reinterpret_cast<uint16_t*>(o + ScratchLayout::kO);                       // keys [kBlockN][D]
  uint32_t* vbuf = reinterpret_cast<uint32_t*>(o + ScratchLayout::kO + ScratchLayout::kKV);  // value pairs [kBlockN/2][D]
  float* m = o + ScratchLayout::kO + 2 * ScratchLayout::kKV;
  float* l = m + kMaxRows;
  float* ipos = l + kMaxRows;
  float* slope = ipos + kMaxRows;
  uint32_t* pt = reinterpret_cast<uint32_t*>(slope + kMaxRows + 2 * kMaxHeadDim);  // P^T pairs [kBlockN/2][R]
  uint32_t* pa = pt + ScratchLayout::kPPack;                                         // P rows [R][kBlockN/2]

  const char* qbase = static_cast<const char*>(p.q);
  for (int r = 0; r < R; ++r) {
    const int row = job.row_begin + std::min(r, nrows - 1);
    const int t = row / group, h = hk * group + row % group;
    ipos[r] = static_cast<float>(t + sk - sq);
    slope[r] = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    const char* qrow = qbase + 2 * (p.q_row_offset(b, t, p.q_batch_stride, p.q_row_stride) + h * p.q_head_stride);
    for (int pp = 0; pp < D / 2; ++pp) q32[pp * R + r] = load_u32(qrow + 4 * pp);
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  std::fill(o, o + R * D, 0.f);
  amx_configure();

  const float imin = ipos[0], imax = ipos[nrows - 1];
  KeyTiles tiles(p, job);
  VecF alpha[RB];
  alignas(64) float alpha_row[R];
  for (int j0 = job.kv_begin; j0 < job.kv_end; j0 += kBlockN) {
    const int n = std::min(kBlockN, job.kv_end - j0), npad = (n + 31) & ~31;
    const uint16_t* kt = static_cast<const uint16_t*>(job.k_staged) + static_cast<int64_t>(j0) * D;
    const uint32_t* vp = static_cast<const uint32_t*>(job.v_staged) + static_cast<int64_t>(j0 / 2) * D;
    if (!job.k_staged) {
      const void* const* kr;
      const void* const* vr;
      tiles.start(j0, &kr, &vr);
      for (int jj = 0; jj < npad; ++jj) std::memcpy(kbuf + jj * D, kr[jj], 2 * D);
      pack_v_bf16(vr, npad, D, vbuf);
      kt = kbuf;
      vp = vbuf;
    }

    // S^T[key][row] = K . Q^T, two 16-key blocks at a time.
    for (int kb = 0; kb < npad / 16; kb += 2) {
      _tile_zero(0);
      _tile_zero(1);
      if constexpr (RB == 2) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int c = 0; c < D / 32; ++c) {
        _tile_loadd(4, kt + (kb * 16) * D + c * 32, 2 * D);
        _tile_loadd(5, kt + (kb * 16 + 16) * D + c * 32, 2 * D);
        _tile_loadd(6, q32 + (c * 16) * R, 4 * R);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if constexpr (RB == 2) {
          _tile_loadd(7, q32 + (c * 16) * R + 16, 4 * R);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, s + (kb * 16) * R, 4 * R);
      _tile_stored(1, s + (kb * 16 + 16) * R, 4 * R);
      if constexpr (RB == 2) {
        _tile_stored(2, s + (kb * 16) * R + 16, 4 * R);
        _tile_stored(3, s + (kb * 16 + 16) * R + 16, 4 * R);
      }
    }
    const bool need_mask = (p.window_right >= 0 && j0 + n - 1 > imin + p.window_right) ||
                           (p.window_left >= 0 && j0 < imax - p.window_left);
    online_softmax<RB>(p, j0, n, npad, s, m, l, ipos, slope, need_mask, alpha);

    // P^T -> bf16 pairs -> P rows (A operand); V -> pairs (B operand).
    pack_p_bf16<RB>(s, npad, pt);
    for (int mb = 0; mb < npad / 32; ++mb)
      for (int rb = 0; rb < RB; ++rb)
        transpose16_u32(pt + (mb * 16) * R + rb * 16, R, pa + (rb * 16) * (kBlockN / 2) + mb * 16, kBlockN / 2);
    // Rescale O only when some row's max moved (rare after the first tiles).
    __mmask16 moved = 0;
    for (int rb = 0; rb < RB; ++rb) {
      vstore(alpha_row + rb * kLanes, alpha[rb]);
      moved |= _mm512_cmp_ps_mask(alpha[rb].v, _mm512_set1_ps(1.f), _CMP_NEQ_UQ);
    }
    if (moved)
      for (int r = 0; r < R; ++r) {
        const __m512 a = _mm512_set1_ps(alpha_row[r]);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(a, _mm512_loadu_ps(o + r * D + d)));
      }
    // O[row][d] += P . V, two 16-wide d blocks at a time.
    for (int db = 0; db < D / 16; db += 2) {
      _tile_loadd(0, o + db * 16, 4 * D);
      _tile_loadd(1, o + db * 16 + 16, 4 * D);
      if constexpr (RB == 2) {
        _tile_loadd(2, o + 16 * D + db * 16, 4 * D);
        _tile_loadd(3, o + 16 * D + db * 16 + 16, 4 * D);
      }
      for (int kh = 0; kh < npad / 32; ++kh) {
        _tile_loadd(4, pa + kh * 16, 4 * (kBlockN / 2));
        _tile_loadd(6, vp + (kh * 16) * D + db * 16, 4 * D);
        _tile_loadd(7, vp + (kh * 16) * D + db * 16 + 16, 4 * D);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if constexpr (RB == 2) {
          _tile_loadd(5, pa + 16 * (kBlockN / 2) + kh * 16, 4 * (kBlockN / 2));
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, o + db * 16, 4 * D);
      _tile_stored(1, o + db * 16 + 16, 4 * D);
      if constexpr (RB == 2) {
        _tile_stored(2, o + 16 * D + db * 16, 4 * D);
        _tile_stored(3, o + 16 * D + db * 16 + 16, 4 * D);
      }
    }
  }
  _tile_release();
  store_tile(p, job, o, D, 1, m, l);
}
#endif

// See StageFn: bf16 rows + value pairs where the tile kernels use vdpbf16ps/AMX, float rows otherwise.
void stage_kv(const AttentionParams& p, int b, int hk, void* k_dst, void* v_dst) {
  const int D = p.head_dim, nkeys = p.k_len(b), dt = static_cast<int>(p.dtype);
  TileJob whole{};
  whole.b = b;
  whole.kv_head = hk;
  whole.kv_begin = 0;
  whole.kv_end = nkeys;
  KeyTiles tiles(p, whole);
  for (int j0 = 0; j0 < nkeys; j0 += kBlockN) {
    const void* const* kr;
    const void* const* vr;
    tiles.start(j0, &kr, &vr);
#if defined(__AVX512BF16__)
    if (p.dtype == DType::kBFloat16) {
      uint16_t* kt = static_cast<uint16_t*>(k_dst) + static_cast<int64_t>(j0) * D;
      for (int jj = 0; jj < kBlockN; ++jj) std::memcpy(kt + jj * D, kr[jj], 2 * D);
      pack_v_bf16(vr, kBlockN, D, static_cast<uint32_t*>(v_dst) + static_cast<int64_t>(j0 / 2) * D);
      continue;
    }
#endif
    float* kt = static_cast<float*>(k_dst) + static_cast<int64_t>(j0) * D;
    float* vt = static_cast<float*>(v_dst) + static_cast<int64_t>(j0) * D;
    for (int jj = 0; jj < kBlockN; ++jj) {
      const int from = j0 + jj < nkeys ? dt : 0;  // kZeroRow past the end is float zeros
      row_to_f32(kr[jj], from, kt + jj * D, D);
      row_to_f32(vr[jj], from, vt + jj * D, D);
    }
  }
}

void tile_entry(const AttentionParams& p, const TileJob& job, float* scratch) {
  if (job.rows_per_tile == kFewRows) {
#if defined(__AVX512BF16__)
    if (p.dtype == DType::kBFloat16 && p.head_dim % 32 == 0) return run_few_rows_bf16(p, job, scratch);
#endif
    return run_few_rows(p, job, scratch);
  }
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (p.dtype == DType::kBFloat16 && p.head_dim % 32 == 0) {
    if (job.rows_per_tile == 32) return run_tile_amx<2>(p, job, scratch);
    return run_tile_amx<1>(p, job, scratch);
  }
#endif
#if defined(__AVX512BF16__)
  if (p.dtype == DType::kBFloat16) {
    if (job.rows_per_tile == 32) return run_tile<2, true>(p, job, scratch);
    return run_tile<1, true>(p, job, scratch);
  }
#endif
  if (job.rows_per_tile == 32) return run_tile<2, false>(p, job, scratch);
  return run_tile<1, false>(p, job, scratch);
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
