// Kernels of the quantised CPU linear (fastinfer/qlinear.h), compiled once per SIMD level inside
// linear_<isa>.cpp (this header is included by linear_kernel.h): quantise the activations to int8
// per 32-block, the int8 dot products of one 64-output panel against every row (small batches),
// and the dequantisation of one panel into the float linear's packed layout (large batches, where
// the float tile kernels are faster and the dequantisation is paid once per panel for all rows).
// The K-quants' kernels are in qlinear_kquant.h.
#pragma once
#include <cmath>

#include "cpu/qlinear_cpu.h"
#include "cpu/qlinear_kquant.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

inline float x_at(const void* row, DType t, int64_t i) {
  return t == DType::kFloat32 ? static_cast<const float*>(row)[i] : bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
}

// Row i of x -> int8 per 32-block: q = round(x / d) with d = max|x| / 127; da = d, as = d * sum(q),
// hs = the sums of q over the block's elements 0..15 and 16..31 (q6_k's offsets).
void qlinear_quantize(const QLinearParams& p, int8_t* qa, float* da, float* as, int32_t* hs) {
  const int64_t nb = p.k / kQBlock, esz = dtype_size(p.dtype);
  for (int64_t i = 0; i < p.m; ++i) {
    const char* row = static_cast<const char*>(p.x) + esz * i * p.x_row_stride;
    for (int64_t b = 0; b < nb; ++b) {
      float v[kQBlock], amax = 0.f;
      for (int j = 0; j < kQBlock; ++j) {
        v[j] = x_at(row, p.dtype, b * kQBlock + j);
        amax = std::max(amax, std::fabs(v[j]));
      }
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = qa + i * p.k + b * kQBlock;
      int half[2] = {0, 0};
      for (int j = 0; j < kQBlock; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
        half[j / 16] += q[j];
      }
      da[i * nb + b] = d;
      as[i * nb + b] = d * static_cast<float>(half[0] + half[1]);
      hs[2 * (i * nb + b)] = half[0];
      hs[2 * (i * nb + b) + 1] = half[1];
    }
  }
}

// Sub-panel block pointers: the 8 rows' values, then their f16 scales, then (q4) their f16 offsets.
struct QBlockView {
  const uint8_t* values;
  const uint16_t* d;
  const uint16_t* m;  // null for q8_0
};

inline QBlockView qblock(QType t, const uint8_t* sub, int64_t b) {
  const uint8_t* blk = sub + b * qpacked_block_bytes(t);
  const uint8_t* scales = blk + kQRows * qtype_value_bytes(t);
  const uint16_t* d = reinterpret_cast<const uint16_t*>(scales);
  return {blk, d, qtype_has_offset(t) ? d + kQRows : nullptr};
}

#if defined(__AVX2__)
// Eight vectors of 8 int32 -> one vector whose lane r is the sum of vector r's lanes.
inline __m256i hsum8(const __m256i (&s)[kQRows]) {
  const __m256i t0 = _mm256_hadd_epi32(s[0], s[1]), t1 = _mm256_hadd_epi32(s[2], s[3]);
  const __m256i t2 = _mm256_hadd_epi32(s[4], s[5]), t3 = _mm256_hadd_epi32(s[6], s[7]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}
#endif

// out8[r] = the dot product of sub-panel row r with one quantised activation row.
void qdot_subpanel(QType t, const uint8_t* sub, int64_t nb, const int8_t* qa, const float* da, const float* as,
                   float* out8) {
#if defined(__AVX2__)
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f);
  __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const QBlockView v = qblock(t, sub, b);
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + b * kQBlock));
    __m256i s[kQRows];
    if (t == QType::kQ8_0) {
      for (int r = 0; r < kQRows; ++r) {  // signed x signed: |w| times a with w's sign (ggml's trick)
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.values + r * 32));
        s[r] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)), ones);
      }
    } else {
      for (int r = 0; r < kQRows; ++r) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v.values + r * 16));
        const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low4);
        s[r] = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v.d)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8(s)), _mm256_mul_ps(dw, _mm256_set1_ps(da[b])), acc);
    if (v.m != nullptr) {
      const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v.m)));
      macc = _mm256_fmadd_ps(mw, _mm256_set1_ps(as[b]), macc);
    }
  }
  _mm256_storeu_ps(out8, _mm256_add_ps(acc, macc));
#else
  float acc[kQRows] = {}, macc[kQRows] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const QBlockView v = qblock(t, sub, b);
    const int8_t* a = qa + b * kQBlock;
    for (int r = 0; r < kQRows; ++r) {
      int32_t s = 0;
      if (t == QType::kQ8_0) {
        const int8_t* w = reinterpret_cast<const int8_t*>(v.values + r * 32);
        for (int j = 0; j < kQBlock; ++j) s += int32_t(w[j]) * a[j];
      } else {
        const uint8_t* w = v.values + r * 16;
        for (int j = 0; j < 16; ++j) s += int32_t(w[j] & 15) * a[j] + int32_t(w[j] >> 4) * a[j + 16];
      }
      acc[r] += static_cast<float>(s) * (f16_to_f32(v.d[r]) * da[b]);
      if (v.m != nullptr) macc[r] += f16_to_f32(v.m[r]) * as[b];
    }
  }
  for (int r = 0; r < kQRows; ++r) out8[r] = acc[r] + macc[r];
#endif
}

// All m rows of `out` for the outputs of one panel, from the quantised activations.
void qlinear_panel(const QLinearParams& p, int64_t panel, const int8_t* qa, const float* da, const float* as,
                   const int32_t* hs) {
  if (qtype_is_k(p.qtype)) return kquant_panel(p, panel, qa, da, as, hs);
  const int64_t nb = p.k / kQBlock, sub_bytes = nb * qpacked_block_bytes(p.qtype);
  const uint8_t* base = static_cast<const uint8_t*>(p.w_packed) + panel * (kLinearPanel / kQRows) * sub_bytes;
  const int esz = dtype_size(p.out_dtype), bsz = dtype_size(p.dtype);
  for (int s = 0; s < kLinearPanel / kQRows; ++s) {
    const int64_t col0 = panel * kLinearPanel + s * kQRows;
    if (col0 >= p.n) break;
    const int valid = static_cast<int>(std::min<int64_t>(kQRows, p.n - col0));
    float bias[kQRows] = {};
    if (p.bias != nullptr)
      for (int r = 0; r < valid; ++r) bias[r] = x_at(static_cast<const char*>(p.bias) + bsz * col0, p.dtype, r);
    for (int64_t i = 0; i < p.m; ++i) {
      float out8[kQRows];
      qdot_subpanel(p.qtype, base + s * sub_bytes, nb, qa + i * p.k, da + i * nb, as + i * nb, out8);
      for (int r = 0; r < valid; ++r) out8[r] += bias[r];
      store_row(out8, p.out_dtype, static_cast<char*>(p.out) + esz * (i * p.out_row_stride + col0), valid);
    }
  }
}

// One panel's weights as floats in the float linear's packed layout of p.dtype (linear.h): float32
// [k][64], bfloat16 [k/2][64][2] (k is a multiple of 32, so even).
void qlinear_dequantize(const QLinearParams& p, int64_t panel, void* dst) {
  const int64_t nb = p.k / qtype_block_elems(p.qtype), sub_bytes = nb * qpacked_block_bytes(p.qtype);
  const uint8_t* base = static_cast<const uint8_t*>(p.w_packed) + panel * (kLinearPanel / kQRows) * sub_bytes;
  if (qtype_is_k(p.qtype)) {
    for (int s = 0; s < kLinearPanel / kQRows; ++s) kdequantize_subpanel(p.qtype, base + s * sub_bytes, nb, s, p.dtype, dst);
    return;
  }
  for (int s = 0; s < kLinearPanel / kQRows; ++s)
    for (int64_t b = 0; b < nb; ++b) {
      const QBlockView v = qblock(p.qtype, base + s * sub_bytes, b);
      for (int r = 0; r < kQRows; ++r) {
        const float d = f16_to_f32(v.d[r]), m = v.m != nullptr ? f16_to_f32(v.m[r]) : 0.f;
        const int c = s * kQRows + r;
        for (int j = 0; j < kQBlock; ++j) {
          int q;
          if (p.qtype == QType::kQ8_0) {
            q = reinterpret_cast<const int8_t*>(v.values + r * 32)[j];
          } else {
            const uint8_t byte = v.values[r * 16 + (j & 15)];
            q = j < 16 ? byte & 15 : byte >> 4;
          }
          const float w = d * static_cast<float>(q) + m;
          const int64_t kk = b * kQBlock + j;
          if (p.dtype == DType::kFloat32)
            static_cast<float*>(dst)[kk * kLinearPanel + c] = w;
          else
            static_cast<uint16_t*>(dst)[kk / 2 * 2 * kLinearPanel + 2 * c + (kk & 1)] = f32_to_bf16(w);
        }
      }
    }
}

// Rows ids of a packed (n, k) weight as float32, w = d q + m as qlinear_dequantize (K-quants: ksub).
void qlinear_rows(QType t, int64_t k, const void* packed, const int64_t* ids, int64_t count, float* out) {
  const int64_t nb = k / qtype_block_elems(t), sub_bytes = nb * qpacked_block_bytes(t);
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* sub = static_cast<const uint8_t*>(packed) + ids[i] / kQRows * sub_bytes;
    const int r = static_cast<int>(ids[i] % kQRows);
    float* o = out + i * k;
    if (qtype_is_k(t)) {
      KSub w;
      for (int64_t sb = 0; sb < nb; ++sb)
        for (int s = 0; s < kQSuper / kQBlock; ++s) {
          ksub(t, sub + sb * qpacked_block_bytes(t), r, s, w);
          for (int j = 0; j < kQBlock; ++j)
            o[sb * kQSuper + s * kQBlock + j] = w.scale[j / 16] * static_cast<float>(w.q[j]) - w.offset;
        }
      continue;
    }
    for (int64_t b = 0; b < nb; ++b) {
      const QBlockView v = qblock(t, sub, b);
      const float d = f16_to_f32(v.d[r]), m = v.m != nullptr ? f16_to_f32(v.m[r]) : 0.f;
      for (int j = 0; j < kQBlock; ++j) {
        const int q = t == QType::kQ8_0 ? reinterpret_cast<const int8_t*>(v.values + r * 32)[j]
                                        : (v.values[r * 16 + (j & 15)] >> (j < 16 ? 0 : 4)) & 15;
        o[b * kQBlock + j] = d * static_cast<float>(q) + m;
      }
    }
  }
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS

namespace fastinfer::cpu {
// This level's quantised-linear kernels (qlinear_kernels_<suffix>, declared in qlinear_cpu.h).
QLinearKernels FI_ISA_CAT(qlinear_kernels_, FI_ISA_NS)() {
  return {&FI_ISA_NS::qlinear_quantize, &FI_ISA_NS::qlinear_panel, &FI_ISA_NS::qlinear_dequantize,
          &FI_ISA_NS::qlinear_rows};
}
}  // namespace fastinfer::cpu
