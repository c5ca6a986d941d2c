// The float-activation kernel of the quantised CPU linear (QActivations::kFloat, fastinfer/qlinear.h),
// included by qlinear_kernel.h (compiled per SIMD level). Each 8-row sub-panel is dequantised once
// into a small buffer of chunks, a chunk being 4 consecutive values of each of the 8 rows (the
// packed blocks' own interleaving), then every activation row runs against it: a 4-value broadcast
// of the row times a chunk gives each (weight row, value) its own lane, so the 8 row sums come
// from one fixed reduction at the end. Each activation row's arithmetic is the same whatever the
// other rows are, so its result never depends on the batch.
#pragma once
#include <type_traits>

#include "cpu/scratch.h"
#include "cpu/qlinear_amx_float.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

// Floats of the dequantised sub-panel buffer for k inputs (8 rows x k), and its bf16 copy after it.
inline int64_t qfloat_sub_floats(int64_t k) { return int64_t(kQRows) * k; }

// 16 bytes as floats: signed (q8_0), or an unsigned nibble (bits shift .. shift + 3).
inline VecF s8_to_f32(const int8_t* p) {
#if defined(__AVX512F__)
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
#elif defined(__AVX2__)
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
#else
  VecF r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = float(p[i]);
  return r;
#endif
}
inline VecF nibble_to_f32(const uint8_t* p, int shift) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(15)))};
#elif defined(__AVX2__)
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  const __m256i m = _mm256_set1_epi32(15);
  const __m128i sh = _mm_cvtsi32_si128(shift);
  return {_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(lo, sh), m)),
          _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(hi, sh), m))};
#else
  VecF r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = float((p[i] >> shift) & 15);
  return r;
#endif
}

// 8 f16 values (one per row of a sub-panel) -> each repeated over its row's 4 lanes of a chunk: rows 0-3
// in r03, rows 4-7 in r47.
inline void row_values(const uint16_t* h, VecF& r03, VecF& r47) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))));
  r03.v = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), v);
  r47.v = _mm512_permutexvar_ps(_mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7), v);
#elif defined(__AVX2__)
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  auto pick = [&](int a) { return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(a, a, a, a, a + 1, a + 1, a + 1, a + 1)); };
  r03 = {pick(0), pick(2)};
  r47 = {pick(4), pick(6)};
#else
  for (int i = 0; i < kLanes; ++i) {
    r03.v[i] = f16_to_f32(h[i / 4]);
    r47.v[i] = f16_to_f32(h[4 + i / 4]);
  }
#endif
}

// One packed sub-panel (8 rows x k, qlinear.h) -> w[(c * 8 + r) * 4 + e] = W[r][4 c + e], float32.
void dequant_sub(QType t, const uint8_t* sub, int64_t k, float* w) {
  const int64_t block = qpacked_block_bytes(t);
  if (qtype_is_k(t)) {
    KSub s;
    for (int64_t sb = 0; sb < k / kQSuper; ++sb)
      for (int r = 0; r < kQRows; ++r)
        for (int j32 = 0; j32 < kQSuper / kQBlock; ++j32) {
          ksub(t, sub + sb * block, r, j32, s);
          float* o = w + (sb * (kQSuper / 4) + j32 * (kQBlock / 4)) * (4 * kQRows) + 4 * r;
          for (int j = 0; j < kQBlock; ++j) o[j / 4 * (4 * kQRows) + j % 4] = s.scale[j / 16] * float(s.q[j]) - s.offset;
        }
    return;
  }
  const bool q8 = t == QType::kQ8_0, q5 = t == QType::kQ5_0;
  for (int64_t b = 0; b < k / kQBlock; ++b) {
    const uint8_t* blk = sub + b * block;
    const uint16_t* dm = reinterpret_cast<const uint16_t*>(blk + kQRows * qtype_value_bytes(t));
    float* o = w + b * kQBlock * kQRows;
    VecF d0, d1, m0 = vzero(), m1 = vzero();  // each row's scale and offset, over the 4 lanes of it a chunk holds
    row_values(dm, d0, d1);
    if (!q8) row_values(dm + kQRows, m0, m1);
    alignas(32) uint8_t hb[8][32];  // q5_0: 16 where the fifth bit is set
    if (q5) q5_high(blk, hb);
    for (int c = 0; c < kQBlock / 4; ++c) {  // chunk c: values 4c..4c+3 of the 8 rows, 32 lanes
      if (q8) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk) + 32 * c;
        vstore(o + 32 * c, vmul(d0, s8_to_f32(q)));
        vstore(o + 32 * c + 16, vmul(d1, s8_to_f32(q + 16)));
      } else {  // nibbles: chunk c < 4 in the low halves of bytes 32c.., chunk c >= 4 in the high halves
        const uint8_t* q = blk + 32 * (c % 4);
        const int shift = 4 * (c / 4);
        VecF v0 = nibble_to_f32(q, shift), v1 = nibble_to_f32(q + 16, shift);
        if (q5) {
          v0 = vadd(v0, s8_to_f32(reinterpret_cast<const int8_t*>(hb[c])));
          v1 = vadd(v1, s8_to_f32(reinterpret_cast<const int8_t*>(hb[c]) + 16));
        }
        vstore(o + 32 * c, vfma(d0, v0, m0));
        vstore(o + 32 * c + 16, vfma(d1, v1, m1));
      }
    }
  }
}

// xs[0..3] to every group of 4 lanes.
inline VecF bcast4(const float* xs) {
#if defined(__AVX512F__)
  return {_mm512_broadcast_f32x4(_mm_loadu_ps(xs))};
#elif defined(__AVX2__)
  const __m256 b = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xs));
  return {b, b};
#else
  VecF r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = xs[i % 4];
  return r;
#endif
}

// out[i][r] = x row i . W row r for R rows of float x (rows[i]), from the float chunk buffer w.
template <int R>
void float_rows(const float* w, int64_t k, const float* const* rows, float (*out)[kQRows]) {
  VecF acc[R][2];  // lanes: rows 0-3 x 4 values, rows 4-7 x 4 values
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = vzero();
  for (int64_t c = 0; c < k / 4; ++c) {
    const VecF w0 = vload(w + 32 * c), w1 = vload(w + 32 * c + 16);
    for (int i = 0; i < R; ++i) {
      const VecF x = bcast4(rows[i] + 4 * c);
      acc[i][0] = vfma(x, w0, acc[i][0]);
      acc[i][1] = vfma(x, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    float lanes[32];
    vstore(lanes, acc[i][0]);
    vstore(lanes + 16, acc[i][1]);
    for (int r = 0; r < kQRows; ++r) out[i][r] = (lanes[4 * r] + lanes[4 * r + 1]) + (lanes[4 * r + 2] + lanes[4 * r + 3]);
  }
}

#if defined(__AVX512BF16__)
// The same for bf16 x (rows[i]) against the bf16 chunk buffer: pair dots, lanes (row, pair).
template <int R>
void bf16_rows(const uint16_t* w, int64_t k, const uint16_t* const* rows, float (*out)[kQRows]) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k / 4; ++c) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + 32 * c);
    for (int i = 0; i < R; ++i) {
      int64_t x4;
      std::memcpy(&x4, rows[i] + 4 * c, 8);
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi64(x4), wv);
    }
  }
  for (int i = 0; i < R; ++i) {
    float lanes[16];
    _mm512_storeu_ps(lanes, acc[i]);
    for (int r = 0; r < kQRows; ++r) out[i][r] = lanes[2 * r] + lanes[2 * r + 1];
  }
}
constexpr bool kBf16Dots = true;
#else
constexpr bool kBf16Dots = false;
#endif

// Whether this level multiplies bf16 x as it is (else the driver hands it float copies of the rows).
bool qlinear_float_reads_bf16() { return kBf16Dots; }

// All m rows of out for sub-panels sub0 .. sub0 + subs - 1, activations kept in float (QActivations::kFloat).
// xf: the rows of x as float32 (m, k), or null where x is read as it is (float32 x, or bf16 x on a level
// with bf16 dot products). scratch: qfloat_sub_floats(k) floats and as many bf16 after them; prep: see
// qlinear_float_prep.
// x prepared once per call: the tile unit's bf16 parts of float32 x (qlinear_amx_float.h); elsewhere nothing.
int64_t qlinear_float_prep_bytes(const QLinearParams& p) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  if (p.dtype == DType::kFloat32 && !qtype_is_k(p.qtype)) return af_prep_bytes(p);
#endif
  (void)p;
  return 0;
}
void qlinear_float_prep(const QLinearParams& p, void* prep) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  if (p.dtype == DType::kFloat32 && !qtype_is_k(p.qtype)) return af_prep(p, prep);
#endif
  (void)p, (void)prep;
}

void qlinear_float_panel(const QLinearParams& p, int64_t sub0, int64_t subs, const float* xf, const void* prep,
                         float* scratch) {
  constexpr int kRowsPerPass = 6;
  const int64_t sub_bytes = p.k / qtype_block_elems(p.qtype) * qpacked_block_bytes(p.qtype);
  const int esz = dtype_size(p.out_dtype), bsz = dtype_size(p.dtype);
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  if (p.dtype == DType::kFloat32 && !qtype_is_k(p.qtype)) {  // the tile unit (qlinear_amx_float.h)
    auto store = [&](int64_t sub, int64_t i0, int64_t m, float (*out)[kQRows]) { store_sub_panel(p, sub, i0, m, out); };
    return amx_float_panel(p, sub0, subs, prep, store);
  }
#endif
  const bool bf16 = p.dtype == DType::kBFloat16 && xf == nullptr;
  uint16_t* wb = reinterpret_cast<uint16_t*>(scratch + qfloat_sub_floats(p.k));
  for (int64_t s = 0; s < subs; ++s) {
    const int64_t col0 = (sub0 + s) * kQRows;
    if (col0 >= p.n) break;
    const int valid = static_cast<int>(std::min<int64_t>(kQRows, p.n - col0));
    dequant_sub(p.qtype, static_cast<const uint8_t*>(p.w_packed) + (sub0 + s) * sub_bytes, p.k, scratch);
    // bf16 x: the weights rounded to bf16 too, as the dequantised bf16 model holds them.
    if (bf16) store_row(scratch, DType::kBFloat16, wb, static_cast<int>(qfloat_sub_floats(p.k)));
    float bias[kQRows] = {};
    if (p.bias != nullptr)
      for (int r = 0; r < valid; ++r)
        bias[r] = bsz == 4 ? static_cast<const float*>(p.bias)[col0 + r]
                           : bf16_to_f32(static_cast<const uint16_t*>(p.bias)[col0 + r]);
    for (int64_t i0 = 0; i0 < p.m; i0 += kRowsPerPass) {
      const int n = static_cast<int>(std::min<int64_t>(kRowsPerPass, p.m - i0));
      float out[kRowsPerPass][kQRows];
      auto run = [&](auto rows_kernel, auto const* const* rows) {
        switch (n) {
          case 6: rows_kernel(std::integral_constant<int, 6>{}, rows); break;
          case 5: rows_kernel(std::integral_constant<int, 5>{}, rows); break;
          case 4: rows_kernel(std::integral_constant<int, 4>{}, rows); break;
          case 3: rows_kernel(std::integral_constant<int, 3>{}, rows); break;
          case 2: rows_kernel(std::integral_constant<int, 2>{}, rows); break;
          default: rows_kernel(std::integral_constant<int, 1>{}, rows); break;
        }
      };
#if defined(__AVX512BF16__)
      if (bf16) {
        const uint16_t* rows[kRowsPerPass];
        for (int i = 0; i < n; ++i) rows[i] = static_cast<const uint16_t*>(p.x) + (i0 + i) * p.x_row_stride;
        run([&](auto r, const uint16_t* const* rs) { bf16_rows<decltype(r)::value>(wb, p.k, rs, out); }, rows);
      } else
#endif
      {
        const float* rows[kRowsPerPass];
        for (int i = 0; i < n; ++i)
          rows[i] = xf != nullptr ? xf + (i0 + i) * p.k : static_cast<const float*>(p.x) + (i0 + i) * p.x_row_stride;
        run([&](auto r, const float* const* rs) { float_rows<decltype(r)::value>(scratch, p.k, rs, out); }, rows);
      }
      for (int i = 0; i < n; ++i) {
        for (int r = 0; r < valid; ++r) out[i][r] += bias[r];
        store_row(out[i], p.out_dtype, static_cast<char*>(p.out) + esz * ((i0 + i) * p.out_row_stride + col0), valid);
      }
    }
  }
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
