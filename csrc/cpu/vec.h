// 16-lane float vector for the CPU kernels, implemented per SIMD level.
// Each attention_<isa>.cpp defines FI_ISA_NS and is compiled with its own flags,
// so everything here has internal linkage inside that namespace (no ODR clash).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef FI_ISA_NS
#error "define FI_ISA_NS before including vec.h"
#endif

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

constexpr int kLanes = 16;
constexpr float kLog2e = 1.4426950408889634f;

// ---- scalar element conversions (exact bit manipulation, round-to-nearest-even) ----
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf
  if (a < 0x38800000u) {                         // subnormal or zero half
    if (a < 0x33000000u) return sign;
    const uint32_t e = a >> 23, man = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(e);  // 14..24
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  uint32_t h = ((a >> 13) - (112u << 10));
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

// 2^f for f in [-0.5, 0.5]: Taylor series of e^(f ln 2), relative error ~1e-7.
constexpr float kC1 = 0.6931471805599453f, kC2 = 0.2402265069591007f, kC3 = 0.05550410866482158f,
                kC4 = 0.009618129107628477f, kC5 = 0.0013333558146428443f, kC6 = 0.00015403530393381606f;

#if defined(__AVX512F__)
struct VecF { __m512 v; };
inline VecF vzero() { return {_mm512_setzero_ps()}; }
inline VecF vset1(float x) { return {_mm512_set1_ps(x)}; }
inline VecF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, VecF a) { _mm512_storeu_ps(p, a.v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF vadd(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VecF vsub(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VecF vmul(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VecF vmax(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm512_abs_ps(a.v)}; }
// keep a where lo <= x <= hi (lane-wise), else fill
inline VecF vselect_range(VecF a, VecF x, VecF lo, VecF hi, float fill) {
  const __mmask16 m = _mm512_cmp_ps_mask(x.v, lo.v, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x.v, hi.v, _CMP_LE_OQ);
  return {_mm512_mask_blend_ps(m, _mm512_set1_ps(fill), a.v)};
}
// NaN in, NaN out (max returns its second operand when one is NaN; NLT_UQ holds for NaN):
// attention relies on it to turn a NaN or +inf score into a NaN row, as softmax does.
inline VecF vexp2(VecF x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-150.f), x.v);
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_set1_ps(kC6);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC5));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  // Exact zero below 2^-126: denormal probabilities would trigger slow microcode assists.
  const __mmask16 normal = _mm512_cmp_ps_mask(xc, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  return {_mm512_maskz_scalef_ps(normal, p, n)};
}
inline float vreduce_max(VecF a) { return _mm512_reduce_max_ps(a.v); }
inline float vreduce_add(VecF a) { return _mm512_reduce_add_ps(a.v); }
// Lane sums of 16 vectors by a shuffle tree (4 levels, 15 adds); keys come out permuted.
inline __m512 reduce_tree16(const VecF* a) {
  __m512 z[8], w[4], u[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // 16 -> 8: fold 256-bit halves, two keys per vector
    const __m512 x = a[2 * i].v, y = a[2 * i + 1].v;
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // 8 -> 4: one key per 128-bit lane
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // 4 -> 2
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(w[2 * i], w[2 * i + 1]), _mm512_unpackhi_ps(w[2 * i], w[2 * i + 1]));
  return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
}
// r[j] = sum of the lanes of a[j], j < 16.
inline VecF vtranspose_reduce16(const VecF* a) {
  static const __m512i lane_of_key = [] {  // found by running the tree on a[j] = j / 16
    VecF probe[16];
    for (int j = 0; j < 16; ++j) probe[j].v = _mm512_set1_ps(static_cast<float>(j) / 16.f);
    alignas(64) float key_at_lane[16];
    _mm512_store_ps(key_at_lane, reduce_tree16(probe));
    alignas(64) int32_t idx[16];
    for (int lane = 0; lane < 16; ++lane) idx[static_cast<int>(key_at_lane[lane] + 0.5f)] = lane;
    return _mm512_load_si512(idx);
  }();
  return {_mm512_permutexvar_ps(lane_of_key, reduce_tree16(a))};
}

#elif defined(__AVX2__)
struct VecF { __m256 lo, hi; };
inline VecF vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline VecF vset1(float x) { const __m256 b = _mm256_set1_ps(x); return {b, b}; }
inline VecF vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, VecF a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline VecF vfma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline VecF vadd(VecF a, VecF b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline VecF vsub(VecF a, VecF b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline VecF vmul(VecF a, VecF b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline VecF vmax(VecF a, VecF b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline __m256 abs8(__m256 a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline VecF vabs(VecF a) { return {abs8(a.lo), abs8(a.hi)}; }
inline __m256 select8(__m256 a, __m256 x, __m256 lo, __m256 hi, __m256 fill) {
  const __m256 m = _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), _mm256_cmp_ps(x, hi, _CMP_LE_OQ));
  return _mm256_blendv_ps(fill, a, m);
}
inline VecF vselect_range(VecF a, VecF x, VecF lo, VecF hi, float fill) {
  const __m256 f = _mm256_set1_ps(fill);
  return {select8(a.lo, x.lo, lo.lo, hi.lo, f), select8(a.hi, x.hi, lo.hi, hi.hi, f)};
}
inline __m256 exp2_8(__m256 x) {
  // Clamped above too: 2^128 builds the exponent field of infinity; larger n would wrap.
  // NaN passes both clamps (min/max return their second operand when one is NaN) and stays NaN.
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-150.f), x));
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(kC6);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_and_ps(r, _mm256_cmp_ps(xc, _mm256_set1_ps(-126.f), _CMP_NLT_UQ));
}
inline VecF vexp2(VecF x) { return {exp2_8(x.lo), exp2_8(x.hi)}; }
inline float vreduce_max(VecF a) {
  float t[16];
  vstore(t, a);
  float m = t[0];
  for (int i = 1; i < 16; ++i) m = t[i] > m ? t[i] : m;
  return m;
}
inline float vreduce_add(VecF a) {
  __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
inline VecF vtranspose_reduce16(const VecF* a) {
  alignas(32) float r[16];
  for (int j = 0; j < 16; ++j) r[j] = vreduce_add(a[j]);
  return vload(r);
}

#else  // portable C++: the compiler may still auto-vectorise these loops
struct VecF { float v[kLanes]; };
#define FI_LANES(expr) for (int i = 0; i < kLanes; ++i) expr
inline VecF vzero() { VecF r; FI_LANES(r.v[i] = 0.f); return r; }
inline VecF vset1(float x) { VecF r; FI_LANES(r.v[i] = x); return r; }
inline VecF vload(const float* p) { VecF r; FI_LANES(r.v[i] = p[i]); return r; }
inline void vstore(float* p, VecF a) { FI_LANES(p[i] = a.v[i]); }
inline VecF vfma(VecF a, VecF b, VecF c) { VecF r; FI_LANES(r.v[i] = a.v[i] * b.v[i] + c.v[i]); return r; }
inline VecF vadd(VecF a, VecF b) { VecF r; FI_LANES(r.v[i] = a.v[i] + b.v[i]); return r; }
inline VecF vsub(VecF a, VecF b) { VecF r; FI_LANES(r.v[i] = a.v[i] - b.v[i]); return r; }
inline VecF vmul(VecF a, VecF b) { VecF r; FI_LANES(r.v[i] = a.v[i] * b.v[i]); return r; }
inline VecF vmax(VecF a, VecF b) { VecF r; FI_LANES(r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]); return r; }
inline VecF vabs(VecF a) { VecF r; FI_LANES(r.v[i] = std::fabs(a.v[i])); return r; }
inline VecF vselect_range(VecF a, VecF x, VecF lo, VecF hi, float fill) {
  VecF r;
  FI_LANES(r.v[i] = (x.v[i] >= lo.v[i] && x.v[i] <= hi.v[i]) ? a.v[i] : fill);
  return r;
}
inline VecF vexp2(VecF x) {
  VecF r;
  FI_LANES(r.v[i] = x.v[i] < -126.f ? 0.f : std::exp2(x.v[i]));
  return r;
}
inline float vreduce_max(VecF a) {
  float m = a.v[0];
  for (int i = 1; i < kLanes; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}
inline float vreduce_add(VecF a) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += a.v[i];
  return s;
}
inline VecF vtranspose_reduce16(const VecF* a) {
  VecF r;
  FI_LANES(r.v[i] = vreduce_add(a[i]));
  return r;
}
#undef FI_LANES
#endif

// tanh through exp2 of a non-positive argument (no overflow): tanh|y| = (1-e)/(1+e), e = 2^(-2|y|log2e).
inline VecF vtanh(VecF y) {
  const VecF e = vexp2(vmul(vabs(y), vset1(-2.f * kLog2e)));
  const VecF one = vset1(1.f);
  VecF t;
  const VecF num = vsub(one, e), den = vadd(one, e);
#if defined(__AVX512F__)
  t.v = _mm512_div_ps(num.v, den.v);
  t.v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t.v),
        _mm512_and_si512(_mm512_castps_si512(y.v), _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
#elif defined(__AVX2__)
  const __m256 sgn = _mm256_set1_ps(-0.f);
  t.lo = _mm256_or_ps(_mm256_div_ps(num.lo, den.lo), _mm256_and_ps(y.lo, sgn));
  t.hi = _mm256_or_ps(_mm256_div_ps(num.hi, den.hi), _mm256_and_ps(y.hi, sgn));
#else
  for (int i = 0; i < kLanes; ++i) t.v[i] = std::copysign(num.v[i] / den.v[i], y.v[i]);
#endif
  return t;
}

// Converts n elements of a row in `dtype` (0 f32, 1 f16, 2 bf16) to float.
inline void row_to_f32(const void* src, int dtype, float* dst, int n) {
  int i = 0;
  if (dtype == 0) {  // inline copy: a libc call per short row costs more than the copy
    const float* f = static_cast<const float*>(src);
    for (; i + kLanes <= n; i += kLanes) vstore(dst + i, vload(f + i));
    for (; i < n; ++i) dst[i] = f[i];
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m512 f = dtype == 1 ? _mm512_cvtph_ps(h)
                                : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_storeu_ps(dst + i, f);
  }
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m256 f = dtype == 1 ? _mm256_cvtph_ps(h)
                                : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm256_storeu_ps(dst + i, f);
  }
#endif
  for (; i < n; ++i) dst[i] = dtype == 1 ? f16_to_f32(s[i]) : bf16_to_f32(s[i]);
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
