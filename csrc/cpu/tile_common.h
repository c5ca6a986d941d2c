// Building blocks of the CPU attention tile kernels, compiled once per SIMD level
// (each attention_<isa>.cpp defines FI_ISA_NS): small matmul micro-kernels, the
// key-tile walker with prefetch, and the vertical online softmax.
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

// Row copies inside tile loops: a libc memcpy call per 128-512 byte row costs more than the copy.
inline void copy_row(void* dst, const void* src, int bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int i = 0;
#if defined(__AVX512F__)
  for (; i + 64 <= bytes; i += 64) _mm512_storeu_si512(d + i, _mm512_loadu_si512(s + i));
#elif defined(__AVX2__)
  for (; i + 32 <= bytes; i += 32)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
#endif
  if (i < bytes) std::memcpy(d + i, s + i, bytes - i);
}

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

// Walks a job's keys in tiles of kBlockN, resolving each key's row in the cache.
// (Software prefetch of the next tile was measured: no gain over the hardware prefetchers.)
class KeyTiles {
 public:
  KeyTiles(const AttentionParams& p, const TileJob& job)
      : p_(p), b_(job.b), hk_(job.kv_head), end_(job.k_staged ? 0 : job.kv_end), esz_(dtype_size(p.dtype)) {}
  // Returns the row pointers of the tile starting at key j0 (kZeroRow past the end).
  void start(int j0, const void* const** k, const void* const** v) {
    locate(j0);
    *k = k_;
    *v = v_;
  }

 private:
  void locate(int j0) {
    const int n = std::max(0, std::min(kBlockN, end_ - j0));
    const char* kbase = static_cast<const char*>(p_.k) + esz_ * hk_ * p_.k_head_stride;
    const char* vbase = static_cast<const char*>(p_.v) + esz_ * hk_ * p_.v_head_stride;
    if (!p_.block_table) {  // keys are equally spaced
      const char* k0 = kbase + esz_ * p_.kv_row_offset(b_, j0, p_.k_batch_stride, p_.k_row_stride);
      const char* v0 = vbase + esz_ * p_.kv_row_offset(b_, j0, p_.v_batch_stride, p_.v_row_stride);
      for (int jj = 0; jj < n; ++jj) {
        k_[jj] = k0 + esz_ * p_.k_row_stride * jj;
        v_[jj] = v0 + esz_ * p_.v_row_stride * jj;
      }
    } else {  // walk the block table: one lookup per block, no division per key
      const int bs = p_.block_size;
      const int32_t* table = p_.block_table + b_ * p_.block_table_stride;
      int blk = j0 / bs, off = j0 % bs;
      for (int jj = 0; jj < n;) {
        const int run = std::min(bs - off, n - jj);
        const char* k0 = kbase + esz_ * (p_.k_batch_stride * table[blk] + p_.k_row_stride * off);
        const char* v0 = vbase + esz_ * (p_.v_batch_stride * table[blk] + p_.v_row_stride * off);
        for (int i = 0; i < run; ++i, ++jj) {
          k_[jj] = k0 + esz_ * p_.k_row_stride * i;
          v_[jj] = v0 + esz_ * p_.v_row_stride * i;
        }
        ++blk;
        off = 0;
      }
    }
    for (int jj = n; jj < kBlockN; ++jj) k_[jj] = v_[jj] = kZeroRow;
  }

  const AttentionParams& p_;
  const int b_, hk_, end_, esz_;
  const void* k_[kBlockN];
  const void* v_[kBlockN];
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

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
