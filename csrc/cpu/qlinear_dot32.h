// The int8 dot kernel of the 32-element block formats (q8_0, q4_0, q4_1, q5_0), included by qlinear_kernel.h
// (compiled per SIMD level). Their packed values interleave the 8 rows of a sub-panel 4 bytes at a
// time (fastinfer/qlinear.h), so that one 32-byte load holds 4 consecutive values of each of the 8
// rows: a dot-product instruction against 4 activation values broadcast to every lane gives each
// row's partial sum in its own lane, with no horizontal reduction; the unpacked weights of a block
// serve up to kDotRows activation rows before the next block is read.
#pragma once
#include "cpu/qlinear_common.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

constexpr int kDotRows = 4;  // activation rows per pass over a sub-panel
// Bytes ahead in the weight stream, fetched toward L2 (prefetcht1). Measured at 2 threads on a decode-sized
// (3072, 576) q4_1 weight read from memory: 32 KB to L2 16.5 GB/s, 4 KB to L1 13 GB/s, none 1.6x slower.
constexpr int64_t kPrefetch = 32768;

// One quantised activation row: its int8 values and per-32-block scale and scale * sum.
struct QRow {
  const int8_t* q;
  const float* d;
  const float* s;
};

// q5_0: a packed block's fifth bits as bit 4 of the value bytes, in the chunk layout of the values: hb[c][4 r + e]
// for element 4 c + e of row r (bit 4 c + e of the row's qh word). Or-ed into the nibbles, they give 0..31.
inline void q5_high(const uint8_t* blk, uint8_t (*hb)[32]) {
#if defined(__AVX2__)
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQ5HighOffset));  // lane r: row r
  for (int c = 0; c < 8; ++c) {  // 4 bits b0..b3 -> bytes 0..3, bit 4 each: x * (2^4 + 2^11 + 2^18 + 2^25), no carries
    const __m256i x = _mm256_and_si256(_mm256_srli_epi32(qh, 4 * c), _mm256_set1_epi32(15));
    const __m256i spread = _mm256_and_si256(_mm256_mullo_epi32(x, _mm256_set1_epi32(0x02040810)), _mm256_set1_epi32(0x10101010));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hb[c]), spread);
  }
#else
  for (int r = 0; r < kQRows; ++r) {
    uint32_t qh;
    std::memcpy(&qh, blk + kQ5HighOffset + 4 * r, 4);
    for (int c = 0; c < 8; ++c)
      for (int e = 0; e < 4; ++e) hb[c][4 * r + e] = static_cast<uint8_t>(((qh >> (4 * c + e)) & 1) << 4);
  }
#endif
}

#if defined(__AVX2__)
// acc (8 int32 lanes) += per lane, the dot product of 4 u8 weights with 4 s8 activations.
inline __m256i dot4(__m256i acc, __m256i w_u8, __m256i a_s8) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, w_u8, a_s8);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w_u8, a_s8);
#else  // pairs of products fit int16 here (|w| <= 128, |a| <= 127: 2 * 128 * 127 < 32768)
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w_u8, a_s8), _mm256_set1_epi16(1)));
#endif
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// out[i][r] = row r of the sub-panel . activation row i, for R activation rows.
template <int R>
void dot32(QType t, const uint8_t* sub, int64_t nb, const QRow* rows, float (*out)[kQRows], bool prefetch) {
  const int64_t block = qpacked_block_bytes(t);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  // Independent integer accumulators per row (summed once per block): one chain of 8 dependent dot
  // instructions per block would leave the core waiting on their latency when a single row runs (decode).
  constexpr int kAcc = R == 1 ? 4 : 2;
  __m256 acc[R], macc[R];
  for (int i = 0; i < R; ++i) acc[i] = macc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = sub + b * block;
    // The stream runs on into the next sub-panels: keep kPrefetch bytes of it on the way to L2 (the first
    // pass over a sub-panel only: the later ones find it in cache).
    if (prefetch)
      for (int64_t off = 0; off < block; off += 64) __builtin_prefetch(blk + kPrefetch + off, 0, 2);
    __m256i s[R][kAcc];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < kAcc; ++c) s[i][c] = _mm256_setzero_si256();
    if (t == QType::kQ8_0) {
      for (int c = 0; c < 8; ++c) {  // values 4c..4c+3 of each row; signed: |w| with w's sign on a
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * c));
        const __m256i aw = _mm256_sign_epi8(w, w);
        for (int i = 0; i < R; ++i)
          s[i][c % kAcc] = dot4(s[i][c % kAcc], aw, _mm256_sign_epi8(bcast4(rows[i].q + b * kQBlock + 4 * c), w));
      }
    } else {
      alignas(32) uint8_t hb[8][32];
      if (t == QType::kQ5_0) q5_high(blk, hb);
      for (int j = 0; j < 4; ++j) {  // low nibbles: values 4j..4j+3; high nibbles: 16+4j..16+4j+3
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * j));
        __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
        if (t == QType::kQ5_0) {
          lo = _mm256_or_si256(lo, _mm256_load_si256(reinterpret_cast<const __m256i*>(hb[j])));
          hi = _mm256_or_si256(hi, _mm256_load_si256(reinterpret_cast<const __m256i*>(hb[4 + j])));
        }
        for (int i = 0; i < R; ++i) {
          const int8_t* a = rows[i].q + b * kQBlock;
          __m256i& x = s[i][(2 * j) % kAcc];
          __m256i& y = s[i][(2 * j + 1) % kAcc];
          x = dot4(x, lo, bcast4(a + 4 * j));
          y = dot4(y, hi, bcast4(a + 16 + 4 * j));
        }
      }
    }
    __m256i sum[R];
    for (int i = 0; i < R; ++i) {
      sum[i] = s[i][0];
      for (int c = 1; c < kAcc; ++c) sum[i] = _mm256_add_epi32(sum[i], s[i][c]);
    }
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(blk + kQRows * qtype_value_bytes(t));
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales)));
    for (int i = 0; i < R; ++i)
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i]), _mm256_mul_ps(dw, _mm256_set1_ps(rows[i].d[b])), acc[i]);
    if (t != QType::kQ8_0) {
      const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + kQRows)));
      for (int i = 0; i < R; ++i) macc[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(rows[i].s[b]), macc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(out[i], _mm256_add_ps(acc[i], macc[i]));
}
#else
template <int R>
void dot32(QType t, const uint8_t* sub, int64_t nb, const QRow* rows, float (*out)[kQRows], bool) {
  const int64_t block = qpacked_block_bytes(t);
  float acc[R][kQRows] = {}, macc[R][kQRows] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = sub + b * block;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(blk + kQRows * qtype_value_bytes(t));
    for (int r = 0; r < kQRows; ++r) {
      int32_t w[kQBlock];
      if (t == QType::kQ8_0) {
        for (int e = 0; e < kQBlock; ++e) w[e] = reinterpret_cast<const int8_t*>(blk)[32 * (e / 4) + 4 * r + e % 4];
      } else {
        uint32_t qh = 0;
        if (t == QType::kQ5_0) std::memcpy(&qh, blk + kQ5HighOffset + 4 * r, 4);
        for (int e = 0; e < 16; ++e) {
          const uint8_t byte = blk[32 * (e / 4) + 4 * r + e % 4];
          w[e] = (byte & 15) | int32_t((qh >> e) & 1) << 4;
          w[e + 16] = (byte >> 4) | int32_t((qh >> (e + 16)) & 1) << 4;
        }
      }
      const float dw = f16_to_f32(scales[r]), mw = t == QType::kQ8_0 ? 0.f : f16_to_f32(scales[kQRows + r]);
      for (int i = 0; i < R; ++i) {
        const int8_t* a = rows[i].q + b * kQBlock;
        int32_t s = 0;
        for (int e = 0; e < kQBlock; ++e) s += w[e] * a[e];
        acc[i][r] += static_cast<float>(s) * (dw * rows[i].d[b]);
        macc[i][r] += mw * rows[i].s[b];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < kQRows; ++r) out[i][r] = acc[i][r] + macc[i][r];
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// Two sub-panels at once on 512-bit registers (lanes 0-7: a's rows, 8-15: b's): half the instructions per weight
// byte of dot32, so more of the weight stream is in flight (decode reads it from memory). Per lane, the very
// operations of dot32 on the same exact integer sums: a row's outputs are the same whichever kernel runs them.
// q8_0's signed weights go through vpdpbusd offset by 128 (w ^ 0x80), and 128 sum(a) is taken off the integer sum.
template <int R>
void dot32_pair(QType t, const uint8_t* a, const uint8_t* b, int64_t nb, const QRow* rows, const int32_t* const* hsum,
                float (*out)[2 * kQRows], bool prefetch) {
  const int64_t block = qpacked_block_bytes(t);
  const __m512i low4 = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(int8_t(0x80));
  constexpr int kAcc = R == 1 ? 4 : 2;
  __m512 acc[R], macc[R];
  for (int i = 0; i < R; ++i) acc[i] = macc[i] = _mm512_setzero_ps();
  auto bcast = [](const int8_t* q) {
    int32_t v;
    std::memcpy(&v, q, 4);
    return _mm512_set1_epi32(v);
  };
  for (int64_t bi = 0; bi < nb; ++bi) {
    const uint8_t* pa = a + bi * block;
    const uint8_t* pb = b + bi * block;
    if (prefetch)
      for (int64_t off = 0; off < block; off += 64) {
        __builtin_prefetch(pa + kPrefetch + off, 0, 2);
        __builtin_prefetch(pb + kPrefetch + off, 0, 2);
      }
    __m512i s[R][kAcc];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < kAcc; ++c) s[i][c] = _mm512_setzero_si512();
    if (t == QType::kQ8_0) {
      for (int c = 0; c < 8; ++c) {
        const __m512i w = _mm512_xor_si512(load_pair(pa + 32 * c, pb + 32 * c), flip);
        for (int i = 0; i < R; ++i)
          s[i][c % kAcc] = _mm512_dpbusd_epi32(s[i][c % kAcc], w, bcast(rows[i].q + bi * kQBlock + 4 * c));
      }
    } else {
      // q5_0: the 16 rows' qh words (a's, then b's); 4 of their bits -> bit 4 of 4 bytes by a 16-entry table
      const __m512i qh = t == QType::kQ5_0 ? load_pair(pa + kQ5HighOffset, pb + kQ5HighOffset) : _mm512_setzero_si512();
      const __m512i spread = _mm512_setr_epi32(0x00000000, 0x00000010, 0x00001000, 0x00001010, 0x00100000, 0x00100010,
                                               0x00101000, 0x00101010, 0x10000000, 0x10000010, 0x10001000, 0x10001010,
                                               0x10100000, 0x10100010, 0x10101000, 0x10101010);
      auto high = [&](int c) {  // bit 4 of element 4 c + e's byte, for each row
        return _mm512_permutexvar_epi32(_mm512_and_si512(_mm512_srli_epi32(qh, 4 * c), _mm512_set1_epi32(15)), spread);
      };
      for (int j = 0; j < 4; ++j) {
        const __m512i w = load_pair(pa + 32 * j, pb + 32 * j);
        __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
        if (t == QType::kQ5_0) {
          lo = _mm512_or_si512(lo, high(j));
          hi = _mm512_or_si512(hi, high(4 + j));
        }
        for (int i = 0; i < R; ++i) {
          const int8_t* q = rows[i].q + bi * kQBlock;
          __m512i& x = s[i][(2 * j) % kAcc];
          __m512i& y = s[i][(2 * j + 1) % kAcc];
          x = _mm512_dpbusd_epi32(x, lo, bcast(q + 4 * j));
          y = _mm512_dpbusd_epi32(y, hi, bcast(q + 16 + 4 * j));
        }
      }
    }
    const uint16_t* sa = reinterpret_cast<const uint16_t*>(pa + kQRows * qtype_value_bytes(t));
    const uint16_t* sb = reinterpret_cast<const uint16_t*>(pb + kQRows * qtype_value_bytes(t));
    const __m512 dw = f16_pair(sa, sb);
    for (int i = 0; i < R; ++i) {
      __m512i sum = s[i][0];
      for (int c = 1; c < kAcc; ++c) sum = _mm512_add_epi32(sum, s[i][c]);
      if (t == QType::kQ8_0)
        sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * (hsum[i][2 * bi] + hsum[i][2 * bi + 1])));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(rows[i].d[bi])), acc[i]);
    }
    if (t != QType::kQ8_0) {
      const __m512 mw = f16_pair(sa + kQRows, sb + kQRows);
      for (int i = 0; i < R; ++i) macc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(rows[i].s[bi]), macc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(out[i], _mm512_add_ps(acc[i], macc[i]));
}

// Rows [0, m) against sub-panels a and b, kDotRows at a time.
void dot32_pair_all(QType t, const uint8_t* a, const uint8_t* b, int64_t nb, const QRow* rows,
                    const int32_t* const* hsum, int64_t m, float (*out)[2 * kQRows]) {
  int64_t i = 0;
  for (; i + kDotRows <= m; i += kDotRows) dot32_pair<kDotRows>(t, a, b, nb, rows + i, hsum + i, out + i, i == 0);
  switch (m - i) {
    case 3: dot32_pair<3>(t, a, b, nb, rows + i, hsum + i, out + i, i == 0); break;
    case 2: dot32_pair<2>(t, a, b, nb, rows + i, hsum + i, out + i, i == 0); break;
    case 1: dot32_pair<1>(t, a, b, nb, rows + i, hsum + i, out + i, i == 0); break;
    default: break;
  }
}
#endif

// Rows [0, m) of the activations against one sub-panel, kDotRows at a time.
void dot32_all(QType t, const uint8_t* sub, int64_t nb, const QRow* rows, int64_t m, float (*out)[kQRows]) {
  int64_t i = 0;
  for (; i + kDotRows <= m; i += kDotRows) dot32<kDotRows>(t, sub, nb, rows + i, out + i, i == 0);
  switch (m - i) {
    case 3: dot32<3>(t, sub, nb, rows + i, out + i, i == 0); break;
    case 2: dot32<2>(t, sub, nb, rows + i, out + i, i == 0); break;
    case 1: dot32<1>(t, sub, nb, rows + i, out + i, i == 0); break;
    default: break;
  }
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
