// Helpers the quantised linear's kernels share (compiled per SIMD level with them): writing a sub-panel's
// outputs, and, on 512-bit registers, two 8-row sub-panels loaded as one 16-lane vector.
#pragma once
#include <algorithm>
#include <cstring>

#include "cpu/qlinear_cpu.h"
#include "cpu/vec.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

// Rows i0 .. i0 + m - 1 of sub-panel `sub`'s 8 outputs (out[i][r]): plus bias, to the output dtype.
inline void store_sub_panel(const QLinearParams& p, int64_t sub, int64_t i0, int64_t m, float (*out)[kQRows]) {
  const int64_t col0 = sub * kQRows;
  const int valid = static_cast<int>(std::min<int64_t>(kQRows, p.n - col0));
  const int esz = dtype_size(p.out_dtype), bsz = dtype_size(p.dtype);
  float bias[kQRows] = {};
  if (p.bias != nullptr)
    for (int r = 0; r < valid; ++r) {
      const char* bp = static_cast<const char*>(p.bias) + bsz * (col0 + r);
      bias[r] = p.dtype == DType::kFloat32 ? *reinterpret_cast<const float*>(bp)
                                           : bf16_to_f32(*reinterpret_cast<const uint16_t*>(bp));
    }
  for (int64_t i = 0; i < m; ++i) {
    for (int r = 0; r < valid; ++r) out[i][r] += bias[r];
    store_row(out[i], p.out_dtype, static_cast<char*>(p.out) + esz * ((i0 + i) * p.out_row_stride + col0), valid);
  }
}

#if defined(__AVX512F__)
// 32 bytes of sub-panel a in the low half, 32 of b in the high half.
FI_ALWAYS_INLINE __m512i load_pair(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

// 8 f16 values of sub-panel a and 8 of sub-panel b (null: zeros) as 16 floats.
FI_ALWAYS_INLINE __m512 f16_pair(const void* a, const void* b) {
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(a)));
  const __m256 hi = b != nullptr ? _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(b))) : _mm256_setzero_ps();
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}
#endif

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
