// K-quant kernels of the quantised CPU linear (q4_k, q5_k, q6_k; packed layouts in fastinfer/qlinear.h),
// compiled once per SIMD level with qlinear_kernel.h, which includes this header: the dot products of
// the activation rows with one 64-output panel (small batches), and the dequantisation of a sub-panel.
//
// The packed values interleave the 8 rows of a sub-panel 4 bytes at a time: one 32-byte load holds 4
// consecutive values of each row, and a dot-product instruction against 4 activation values broadcast
// to every lane leaves each row's partial sum in its own lane (no horizontal reduction); the unpacked
// weights of a sub-block serve up to kKDotRows activation rows.
//
// The activations stay int8 per 32-block (one scale da per block, as for q8_0/q4_0/q4_1), so each
// 32-element sub-block of a super-block is one exact integer dot product per row, scaled once:
//   q4_k/q5_k: (d sc) da sum(q a) - (dmin m) da sum(a); the values 0..15 / 0..31 are unsigned, so
//              maddubs(u8 weights, s8 activations) cannot saturate, and the int16 pair sums of 8 / 4
//              of them still fit int16 (8 * 2 * 15 * 127, 4 * 2 * 31 * 127 < 2^15) before madd widens
//   q6_k:      d da (sc0 sum_0..15((q - 32) a) + sc1 sum_16..31((q - 32) a)), with q in 0..63 run
//              through maddubs unsigned (2 * 2 * 63 * 127 < 2^15) and 32 sum(a) of each half (the
//              quantisation's per-16 sums) subtracted from the integer sums; the per-16 scales apply to
//              the two halves' sums (an exact float product and sum: both below 2^23).
// The float scales are gguf's: d * sc (and dmin * m) in float32, exact products of an f16 and a 6- or
// 8-bit integer.
#pragma once
#include <algorithm>
#include <cstring>
#include <utility>

#include "cpu/qlinear_common.h"
#include "cpu/qlinear_cpu.h"
#include "cpu/vec.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

// Byte offsets inside one packed super-block of a sub-panel (qlinear.h): the values, then the scales
// (q4_k/q5_k: sc, m at +64, d at +128, dmin at +144; q6_k: sc, d at +128).
constexpr int kQ4KScales = 1024, kQ5KScales = 1280, kQ6KScales = 1536;
constexpr int kQ6KHalf = 768;   // q6_k: the bytes of one 128-element half: ql [2][8][8 rows][4], qh [8][8][4]
constexpr int kKDotRows = 4;    // activation rows per pass over a sub-panel

constexpr int kscales_offset(QType t) {
  return t == QType::kQ6_K ? kQ6KScales : t == QType::kQ5_K ? kQ5KScales : kQ4KScales;
}
constexpr int kd_offset(QType t) { return kscales_offset(t) + 128; }

// Byte j (0..31) of row r in a 4-byte-interleaved run of 8 x 32 bytes.
inline int kil(int r, int j) { return (j / 4 * kQRows + r) * 4 + j % 4; }

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// Row r's sub-block s (32 elements) of a packed super-block: its integers q[j] and the float32 scales
// of w[j] = scale[j / 16] * q[j] - offset, as gguf dequantises (q6_k: q already less 32, offset 0).
struct KSub {
  int q[kQBlock];
  float scale[2], offset;
};

inline void ksub(QType t, const uint8_t* blk, int r, int s, KSub& o) {
  const uint8_t* sc = blk + kscales_offset(t);
  if (t == QType::kQ6_K) {
    const int u = s % 4;
    const uint8_t* half = blk + (s / 4) * kQ6KHalf;
    for (int j = 0; j < kQBlock; ++j) {
      const int lo = (half[(u & 1) * 256 + kil(r, j)] >> (4 * (u >> 1))) & 15;
      o.q[j] = (lo | (((half[512 + kil(r, j)] >> (2 * u)) & 3) << 4)) - 32;
    }
    const float d = f16_at(blk + kd_offset(t) + 2 * r);
    o.scale[0] = d * static_cast<float>(static_cast<int8_t>(sc[16 * s + r]));
    o.scale[1] = d * static_cast<float>(static_cast<int8_t>(sc[16 * s + 8 + r]));
    o.offset = 0.f;
    return;
  }
  const uint8_t* v = blk + (s / 2) * 256;
  for (int j = 0; j < kQBlock; ++j) {
    o.q[j] = (v[kil(r, j)] >> (4 * (s & 1))) & 15;
    if (t == QType::kQ5_K) o.q[j] |= ((blk[1024 + kil(r, j)] >> s) & 1) << 4;
  }
  o.scale[0] = o.scale[1] = f16_at(sc + 128 + 2 * r) * static_cast<float>(sc[8 * s + r]);
  o.offset = f16_at(sc + 144 + 2 * r) * static_cast<float>(sc[64 + 8 * s + r]);
}

// One quantised activation row: int8 values, per 32-block scale da and da * sum(q), and the per-block
// integer sums of elements 0..15 and 16..31 (hs, two per block).
struct KRow {
  const int8_t* q;
  const float* d;
  const float* s;
  const int32_t* hs;
};

#if defined(__AVX2__)
// v shifted left by N bits (right by -N) per 16-bit lane.
template <int N>
FI_ALWAYS_INLINE __m256i shift16(__m256i v) {
  if constexpr (N > 0) return _mm256_slli_epi16(v, N);
  else if constexpr (N < 0) return _mm256_srli_epi16(v, -N);
  else return v;
}

FI_ALWAYS_INLINE __m256i kload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

FI_ALWAYS_INLINE __m256i kbcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

FI_ALWAYS_INLINE __m256 bytes8_ps(const uint8_t* p, bool is_signed) {  // 8 bytes -> 8 floats
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}

// The 8 rows' 4 values c (elements 4c..4c+3) of sub-block S of a packed super-block, as u8 lanes.
template <QType T, int S>
FI_ALWAYS_INLINE __m256i kvalues(const uint8_t* blk, int c) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  if constexpr (T == QType::kQ6_K) {
    constexpr int u = S % 4;
    const uint8_t* half = blk + (S / 4) * kQ6KHalf;
    const __m256i ql = kload(half + (u & 1) * 256 + 32 * c), qh = kload(half + 512 + 32 * c);
    return _mm256_or_si256(_mm256_and_si256(u >= 2 ? _mm256_srli_epi16(ql, 4) : ql, low4),
                           _mm256_and_si256(shift16<4 - 2 * u>(qh), _mm256_set1_epi8(0x30)));  // bits 2u, 2u+1
  } else {
    const __m256i qs = kload(blk + (S / 2) * 256 + 32 * c);
    const __m256i w = _mm256_and_si256(S & 1 ? _mm256_srli_epi16(qs, 4) : qs, low4);
    if constexpr (T == QType::kQ4_K) return w;
    // q5_k: bit S of the qh byte to bit 4 (a 16-bit shift of at most 4 keeps it inside its byte)
    return _mm256_or_si256(w, _mm256_and_si256(shift16<4 - S>(kload(blk + 1024 + 32 * c)), _mm256_set1_epi8(0x10)));
  }
}

// Sums over values c0..c0+N-1 of sub-block S with R activation rows (a: each row's 32-block): int32
// lanes = rows, added to s. The int16 pair sums of N values fit (N * 2 * max q * 127 < 2^15).
template <QType T, int S, int R, int N>
FI_ALWAYS_INLINE void kdot_run(const uint8_t* blk, const int8_t* const (&a)[R], int c0, __m256i (&s)[R]) {
  __m256i p[R];
  for (int c = c0; c < c0 + N; ++c) {
    const __m256i w = kvalues<T, S>(blk, c);
    for (int i = 0; i < R; ++i) {
      const __m256i d = _mm256_maddubs_epi16(w, kbcast4(a[i] + 4 * c));
      p[i] = c == c0 ? d : _mm256_add_epi16(p[i], d);
    }
  }
  for (int i = 0; i < R; ++i) s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(p[i], _mm256_set1_epi16(1)));
}

// Sub-block S (32-block b of the rows) of one packed super-block into acc[i] (lanes = the 8 rows).
template <QType T, int S, int R>
FI_ALWAYS_INLINE void ksub_dot(const uint8_t* blk, const KRow* rows, int64_t b, __m256 (&acc)[R]) {
  const int8_t* a[R];
  for (int i = 0; i < R; ++i) a[i] = rows[i].q + b * kQBlock;
  __m256i s[R];
  [[maybe_unused]] __m256i s1[R];  // q6_k: the second half's sums
  for (int i = 0; i < R; ++i) s[i] = s1[i] = _mm256_setzero_si256();
  if constexpr (T == QType::kQ4_K) {
    kdot_run<T, S, R, 8>(blk, a, 0, s);
  } else if constexpr (T == QType::kQ5_K) {
    kdot_run<T, S, R, 4>(blk, a, 0, s);
    kdot_run<T, S, R, 4>(blk, a, 4, s);
  } else {  // q6_k: elements 0..15 (values 0..3) and 16..31 (4..7) have their own scales
    kdot_run<T, S, R, 2>(blk, a, 0, s);
    kdot_run<T, S, R, 2>(blk, a, 2, s);
    kdot_run<T, S, R, 2>(blk, a, 4, s1);
    kdot_run<T, S, R, 2>(blk, a, 6, s1);
  }
  const uint8_t* sc = blk + kscales_offset(T);
  const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + kd_offset(T))));
  if constexpr (T == QType::kQ6_K) {
    const __m256 sc0 = bytes8_ps(sc + 16 * S, true), sc1 = bytes8_ps(sc + 16 * S + 8, true);
    for (int i = 0; i < R; ++i) {
      const int32_t* hs = rows[i].hs + 2 * b;
      const __m256i lo = _mm256_sub_epi32(s[i], _mm256_set1_epi32(32 * hs[0]));
      const __m256i hi = _mm256_sub_epi32(s1[i], _mm256_set1_epi32(32 * hs[1]));
      const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), sc0, _mm256_mul_ps(_mm256_cvtepi32_ps(hi), sc1));
      acc[i] = _mm256_fmadd_ps(t, _mm256_mul_ps(d, _mm256_set1_ps(rows[i].d[b])), acc[i]);
    }
  } else {
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 144)));
    const __m256 dsc = _mm256_mul_ps(d, bytes8_ps(sc + 8 * S, false));
    const __m256 dm = _mm256_mul_ps(dmin, bytes8_ps(sc + 64 + 8 * S, false));
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i]), _mm256_mul_ps(dsc, _mm256_set1_ps(rows[i].d[b])), acc[i]);
      acc[i] = _mm256_fnmadd_ps(dm, _mm256_set1_ps(rows[i].s[b]), acc[i]);
    }
  }
}

template <QType T, int R, int... S>
FI_ALWAYS_INLINE void ksuper_dot(std::integer_sequence<int, S...>, const uint8_t* blk, const KRow* rows, int64_t b0,
                                 __m256 (&acc)[R]) {
  (ksub_dot<T, S, R>(blk, rows, b0 + S, acc), ...);
}

// out[i][r] = row r of the sub-panel (nsb packed super-blocks at sub) . activation row i, for R rows.
template <QType T, int R>
void kdot(const uint8_t* sub, int64_t nsb, const KRow* rows, float (*out)[kQRows], bool prefetch) {
  constexpr int kSubs = kQSuper / kQBlock;
  const int64_t bb = qpacked_block_bytes(T);
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    // As the 32-block kernel (qlinear_dot32.h): the weight stream kPrefetch bytes ahead, toward L2, on the
    // first pass over the sub-panel.
    if (prefetch)
      for (int64_t off = 0; off < bb; off += 64) __builtin_prefetch(sub + sb * bb + kPrefetch + off, 0, 2);
    ksuper_dot<T, R>(std::make_integer_sequence<int, kSubs>{}, sub + sb * bb, rows, sb * kSubs, acc);
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(out[i], acc[i]);
}
#if defined(__AVX512BW__)
// ---- Two sub-panels at once on 512-bit registers (lanes 0-7: sub-panel a's rows, 8-15: b's): half the
// instructions per weight byte, as dot32_pair. Per lane the very operations of the 256-bit kernel above, so a
// row's outputs are the same whichever kernel runs them.
template <int N>
FI_ALWAYS_INLINE __m512i shift16x2(__m512i v) {
  if constexpr (N > 0) return _mm512_slli_epi16(v, N);
  else if constexpr (N < 0) return _mm512_srli_epi16(v, -N);
  else return v;
}

template <QType T, int S>
FI_ALWAYS_INLINE __m512i kvalues2(const uint8_t* a, const uint8_t* b, int c) {  // kvalues of a and of b
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  if constexpr (T == QType::kQ6_K) {
    constexpr int u = S % 4;
    const int off = (S / 4) * kQ6KHalf;
    const __m512i ql = load_pair(a + off + (u & 1) * 256 + 32 * c, b + off + (u & 1) * 256 + 32 * c);
    const __m512i qh = load_pair(a + off + 512 + 32 * c, b + off + 512 + 32 * c);
    return _mm512_or_si512(_mm512_and_si512(u >= 2 ? _mm512_srli_epi16(ql, 4) : ql, low4),
                           _mm512_and_si512(shift16x2<4 - 2 * u>(qh), _mm512_set1_epi8(0x30)));
  } else {
    const __m512i qs = load_pair(a + (S / 2) * 256 + 32 * c, b + (S / 2) * 256 + 32 * c);
    const __m512i w = _mm512_and_si512(S & 1 ? _mm512_srli_epi16(qs, 4) : qs, low4);
    if constexpr (T == QType::kQ4_K) return w;
    return _mm512_or_si512(w, _mm512_and_si512(shift16x2<4 - S>(load_pair(a + 1024 + 32 * c, b + 1024 + 32 * c)),
                                               _mm512_set1_epi8(0x10)));
  }
}

template <QType T, int S, int R, int N>
FI_ALWAYS_INLINE void kdot_run2(const uint8_t* a, const uint8_t* b, const int8_t* const (&x)[R], int c0,
                                __m512i (&s)[R]) {
  __m512i p[R];
  for (int c = c0; c < c0 + N; ++c) {
    const __m512i w = kvalues2<T, S>(a, b, c);
    for (int i = 0; i < R; ++i) {
      int32_t v;
      std::memcpy(&v, x[i] + 4 * c, 4);
      const __m512i d = _mm512_maddubs_epi16(w, _mm512_set1_epi32(v));
      p[i] = c == c0 ? d : _mm512_add_epi16(p[i], d);
    }
  }
  for (int i = 0; i < R; ++i) s[i] = _mm512_add_epi32(s[i], _mm512_madd_epi16(p[i], _mm512_set1_epi16(1)));
}

// 8 bytes of a and 8 of b -> 16 floats (kernel above: bytes8_ps).
FI_ALWAYS_INLINE __m512 bytes8x2_ps(const uint8_t* a, const uint8_t* b, bool is_signed) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(bytes8_ps(a, is_signed)), bytes8_ps(b, is_signed), 1);
}

template <QType T, int S, int R>
FI_ALWAYS_INLINE void ksub_dot2(const uint8_t* ba, const uint8_t* bb, const KRow* rows, int64_t b, __m512 (&acc)[R]) {
  const int8_t* x[R];
  for (int i = 0; i < R; ++i) x[i] = rows[i].q + b * kQBlock;
  __m512i s[R];
  [[maybe_unused]] __m512i s1[R];
  for (int i = 0; i < R; ++i) s[i] = s1[i] = _mm512_setzero_si512();
  if constexpr (T == QType::kQ4_K) {
    kdot_run2<T, S, R, 8>(ba, bb, x, 0, s);
  } else if constexpr (T == QType::kQ5_K) {
    kdot_run2<T, S, R, 4>(ba, bb, x, 0, s);
    kdot_run2<T, S, R, 4>(ba, bb, x, 4, s);
  } else {
    kdot_run2<T, S, R, 2>(ba, bb, x, 0, s);
    kdot_run2<T, S, R, 2>(ba, bb, x, 2, s);
    kdot_run2<T, S, R, 2>(ba, bb, x, 4, s1);
    kdot_run2<T, S, R, 2>(ba, bb, x, 6, s1);
  }
  const uint8_t* sa = ba + kscales_offset(T);
  const uint8_t* sb = bb + kscales_offset(T);
  const __m512 d = f16_pair(ba + kd_offset(T), bb + kd_offset(T));
  if constexpr (T == QType::kQ6_K) {
    const __m512 sc0 = bytes8x2_ps(sa + 16 * S, sb + 16 * S, true), sc1 = bytes8x2_ps(sa + 16 * S + 8, sb + 16 * S + 8, true);
    for (int i = 0; i < R; ++i) {
      const int32_t* hs = rows[i].hs + 2 * b;
      const __m512i lo = _mm512_sub_epi32(s[i], _mm512_set1_epi32(32 * hs[0]));
      const __m512i hi = _mm512_sub_epi32(s1[i], _mm512_set1_epi32(32 * hs[1]));
      const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), sc0, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), sc1));
      acc[i] = _mm512_fmadd_ps(t, _mm512_mul_ps(d, _mm512_set1_ps(rows[i].d[b])), acc[i]);
    }
  } else {
    const __m512 dmin = f16_pair(sa + 144, sb + 144);
    const __m512 dsc = _mm512_mul_ps(d, bytes8x2_ps(sa + 8 * S, sb + 8 * S, false));
    const __m512 dm = _mm512_mul_ps(dmin, bytes8x2_ps(sa + 64 + 8 * S, sb + 64 + 8 * S, false));
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), _mm512_mul_ps(dsc, _mm512_set1_ps(rows[i].d[b])), acc[i]);
      acc[i] = _mm512_fnmadd_ps(dm, _mm512_set1_ps(rows[i].s[b]), acc[i]);
    }
  }
}

template <QType T, int R, int... S>
FI_ALWAYS_INLINE void ksuper_dot2(std::integer_sequence<int, S...>, const uint8_t* a, const uint8_t* b, const KRow* rows,
                                  int64_t b0, __m512 (&acc)[R]) {
  (ksub_dot2<T, S, R>(a, b, rows, b0 + S, acc), ...);
}

// out[i][0..7] = sub-panel a's rows . activation row i, out[i][8..15] = b's, for R rows.
template <QType T, int R>
void kdot2(const uint8_t* a, const uint8_t* b, int64_t nsb, const KRow* rows, float (*out)[2 * kQRows], bool prefetch) {
  constexpr int kSubs = kQSuper / kQBlock;
  const int64_t bb = qpacked_block_bytes(T);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    if (prefetch)
      for (int64_t off = 0; off < bb; off += 64) {
        __builtin_prefetch(a + sb * bb + kPrefetch + off, 0, 2);
        __builtin_prefetch(b + sb * bb + kPrefetch + off, 0, 2);
      }
    ksuper_dot2<T, R>(std::make_integer_sequence<int, kSubs>{}, a + sb * bb, b + sb * bb, rows, sb * kSubs, acc);
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(out[i], acc[i]);
}

template <QType T>
void kdot2_all(const uint8_t* a, const uint8_t* b, int64_t nsb, const KRow* rows, int64_t m, float (*out)[2 * kQRows]) {
  int64_t i = 0;
  for (; i + kKDotRows <= m; i += kKDotRows) kdot2<T, kKDotRows>(a, b, nsb, rows + i, out + i, i == 0);
  switch (m - i) {
    case 3: kdot2<T, 3>(a, b, nsb, rows + i, out + i, i == 0); break;
    case 2: kdot2<T, 2>(a, b, nsb, rows + i, out + i, i == 0); break;
    case 1: kdot2<T, 1>(a, b, nsb, rows + i, out + i, i == 0); break;
    default: break;
  }
}
#endif
#else
template <QType T, int R>
void kdot(const uint8_t* sub, int64_t nsb, const KRow* rows, float (*out)[kQRows], bool) {
  const int64_t bb = qpacked_block_bytes(T);
  float acc[R][kQRows] = {};
  KSub w;
  for (int64_t sb = 0; sb < nsb; ++sb)
    for (int s = 0; s < kQSuper / kQBlock; ++s) {
      const int64_t b = sb * (kQSuper / kQBlock) + s;
      for (int r = 0; r < kQRows; ++r) {
        ksub(T, sub + sb * bb, r, s, w);
        for (int i = 0; i < R; ++i) {
          const int8_t* a = rows[i].q + b * kQBlock;
          int32_t lo = 0, hi = 0;
          for (int j = 0; j < 16; ++j) lo += w.q[j] * a[j];
          for (int j = 16; j < kQBlock; ++j) hi += w.q[j] * a[j];
          acc[i][r] += (w.scale[0] * static_cast<float>(lo) + w.scale[1] * static_cast<float>(hi)) * rows[i].d[b] -
                       w.offset * rows[i].s[b];
        }
      }
    }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < kQRows; ++r) out[i][r] = acc[i][r];
}
#endif

// Rows [0, m) of the activations against one sub-panel, kKDotRows at a time.
template <QType T>
void kdot_all(const uint8_t* sub, int64_t nsb, const KRow* rows, int64_t m, float (*out)[kQRows]) {
  int64_t i = 0;
  for (; i + kKDotRows <= m; i += kKDotRows) kdot<T, kKDotRows>(sub, nsb, rows + i, out + i, i == 0);
  switch (m - i) {
    case 3: kdot<T, 3>(sub, nsb, rows + i, out + i, i == 0); break;
    case 2: kdot<T, 2>(sub, nsb, rows + i, out + i, i == 0); break;
    case 1: kdot<T, 1>(sub, nsb, rows + i, out + i, i == 0); break;
    default: break;
  }
}

// All m rows of out for the outputs of sub-panels sub0 .. sub0 + subs - 1 of a K-quant weight, from the quantised
// activations (qlinear_quantize's qa, da, as, hs).
void kquant_panel(const QLinearParams& p, int64_t sub0, int64_t subs, const int8_t* qa, const float* da,
                  const float* as, const int32_t* hs) {
  constexpr int kMaxRows = 16;
  const int64_t nb = p.k / kQBlock, nsb = p.k / kQSuper, sub_bytes = nsb * qpacked_block_bytes(p.qtype);
  const uint8_t* base = static_cast<const uint8_t*>(p.w_packed) + sub0 * sub_bytes;
  for (int64_t i0 = 0; i0 < p.m; i0 += kMaxRows) {
    const int64_t m = std::min<int64_t>(kMaxRows, p.m - i0);
    KRow rows[kMaxRows];
    for (int64_t i = 0; i < m; ++i)
      rows[i] = {qa + (i0 + i) * p.k, da + (i0 + i) * nb, as + (i0 + i) * nb, hs + 2 * (i0 + i) * nb};
    for (int64_t s = 0; s < subs && (sub0 + s) * kQRows < p.n; ++s) {
      const uint8_t* sub = base + s * sub_bytes;
      float out[kMaxRows][kQRows];
#if defined(__AVX512BW__)
      if (s + 1 < subs && (sub0 + s + 1) * kQRows < p.n) {  // this sub-panel and the next, which also holds outputs
        float both[kMaxRows][2 * kQRows];
        const uint8_t* next = sub + sub_bytes;
        if (p.qtype == QType::kQ4_K) kdot2_all<QType::kQ4_K>(sub, next, nsb, rows, m, both);
        else if (p.qtype == QType::kQ5_K) kdot2_all<QType::kQ5_K>(sub, next, nsb, rows, m, both);
        else kdot2_all<QType::kQ6_K>(sub, next, nsb, rows, m, both);
        for (int h = 0; h < 2; ++h) {
          for (int64_t i = 0; i < m; ++i) std::memcpy(out[i], both[i] + kQRows * h, sizeof(out[i]));
          store_sub_panel(p, sub0 + s + h, i0, m, out);
        }
        ++s;
        continue;
      }
#endif
      if (p.qtype == QType::kQ4_K) kdot_all<QType::kQ4_K>(sub, nsb, rows, m, out);
      else if (p.qtype == QType::kQ5_K) kdot_all<QType::kQ5_K>(sub, nsb, rows, m, out);
      else kdot_all<QType::kQ6_K>(sub, nsb, rows, m, out);
      store_sub_panel(p, sub0 + s, i0, m, out);
    }
  }
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
