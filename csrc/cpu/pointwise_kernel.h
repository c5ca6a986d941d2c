// Row kernels of the CPU pointwise ops (fastinfer/pointwise.h), compiled once per SIMD level
// like attention_kernel.h. Sixteen elements at a time in VecF, a scalar loop for the tail, the
// same arithmetic in both so a row's result does not depend on where the tail starts.
#pragma once
#include <cmath>

#include "cpu/pointwise_cpu.h"
#include "cpu/vec.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

// 16 elements of a float32 or bfloat16 row as floats.
inline VecF load16(const void* p, DType t) {
  if (t == DType::kFloat32) return vload(static_cast<const float*>(p));
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
#else
  alignas(64) float f[kLanes];
  row_to_f32(p, 2, f, kLanes);
  return vload(f);
#endif
}

inline float load1(const void* p, DType t, int64_t i) {
  return t == DType::kFloat32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// Rounds to the nearest bfloat16 (ties to even) and back, as a torch bf16 op rounds its result.
inline float round1(float v, DType t) { return t == DType::kFloat32 ? v : bf16_to_f32(f32_to_bf16(v)); }

inline VecF round16(VecF v, DType t) {
  if (t == DType::kFloat32) return v;
#if defined(__AVX512F__)
  const __m512i u = _mm512_castps_si512(v.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                                     _mm512_set1_epi32(int(0xffff0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q);
  return {_mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), v.v)};
#else
  alignas(64) float f[kLanes];
  vstore(f, v);
  for (int i = 0; i < kLanes; ++i) f[i] = round1(f[i], DType::kBFloat16);
  return vload(f);
#endif
}

inline void store16(void* p, VecF v, DType t) {
  if (t == DType::kFloat32) {
    vstore(static_cast<float*>(p), v);
    return;
  }
#if defined(__AVX512F__)
  const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(round16(v, t).v), 16);
  _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
#else
  alignas(64) float f[kLanes];
  vstore(f, v);
  uint16_t* o = static_cast<uint16_t*>(p);
  for (int i = 0; i < kLanes; ++i) o[i] = f32_to_bf16(f[i]);
#endif
}

inline void store1(void* p, DType t, int64_t i, float v) {
  if (t == DType::kFloat32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}

inline const char* at(const void* base, DType t, int64_t elems) {
  return static_cast<const char*>(base) + dtype_size(t) * elems;
}
inline char* at(void* base, DType t, int64_t elems) { return static_cast<char*>(base) + dtype_size(t) * elems; }

// ---- RMSNorm: row i; h (dim floats of scratch) holds the row being normalised.
void rms_norm_row(const RmsNormParams& p, int64_t i, float* h) {
  const DType t = p.dtype;
  const int64_t d = p.dim, vec_end = d / kLanes * kLanes;
  const char* x = at(p.x, t, i * p.x_row_stride);
  char* res = p.residual ? at(p.residual, t, i * p.residual_row_stride) : nullptr;
  VecF ss = vzero();
  int64_t j = 0;
  for (; j < vec_end; j += kLanes) {
    VecF v = load16(at(x, t, j), t);
    if (res) {
      v = round16(vadd(v, load16(at(res, t, j), t)), t);
      store16(at(res, t, j), v, t);
    }
    vstore(h + j, v);
    ss = vfma(v, v, ss);
  }
  float tail = 0.f;
  for (; j < d; ++j) {
    float v = load1(x, t, j);
    if (res) {
      v = round1(v + load1(res, t, j), t);
      store1(res, t, j, v);
    }
    h[j] = v;
    tail += v * v;
  }
  const float inv = 1.f / std::sqrt((vreduce_add(ss) + tail) / static_cast<float>(d) + p.eps);
  char* out = at(p.out, t, i * p.out_row_stride);
  const VecF vinv = vset1(inv);
  for (j = 0; j < vec_end; j += kLanes) store16(at(out, t, j), vmul(vmul(vload(h + j), vinv), vload(p.weight + j)), t);
  for (; j < d; ++j) store1(out, t, j, h[j] * inv * p.weight[j]);
}

// ---- gated activation
inline VecF vdiv(VecF a, VecF b) {
#if defined(__AVX512F__)
  return {_mm512_div_ps(a.v, b.v)};
#elif defined(__AVX2__)
  return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)};
#else
  VecF r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] / b.v[i];
  return r;
#endif
}

constexpr float kSqrt2OverPi = 0.7978845608028654f, kGeluCubic = 0.044715f;

inline VecF act16(VecF g, Activation a) {
  if (a == Activation::kSilu) return vdiv(g, vadd(vset1(1.f), vexp2(vmul(g, vset1(-kLog2e)))));
  const VecF inner = vmul(vset1(kSqrt2OverPi), vfma(vmul(vmul(g, g), g), vset1(kGeluCubic), g));
  return vmul(vmul(vset1(0.5f), g), vadd(vset1(1.f), vtanh(inner)));
}

inline float act1(float g, Activation a) {
  alignas(64) float f[kLanes] = {g};
  vstore(f, act16(vload(f), a));  // the vector formula, so tails round like the body
  return f[0];
}

void act_mul_row(const ActMulParams& p, int64_t i) {
  const DType t = p.dtype;
  const int64_t d = p.dim, vec_end = d / kLanes * kLanes;
  const char* gate = at(p.x, t, i * p.x_row_stride);
  const char* up = at(gate, t, d);
  char* out = at(p.out, t, i * p.out_row_stride);
  int64_t j = 0;
  for (; j < vec_end; j += kLanes)
    store16(at(out, t, j), vmul(round16(act16(load16(at(gate, t, j), t), p.act), t), load16(at(up, t, j), t)), t);
  for (; j < d; ++j) store1(out, t, j, round1(act1(load1(gate, t, j), p.act), t) * load1(up, t, j));
}

// ---- rotary: all heads of token i
void rotary_token(const RotaryParams& p, int64_t i) {
  const DType t = p.dtype;
  const int64_t half = p.half, vec_end = half / kLanes * kLanes;
  const char* c = at(p.cos, t, p.positions[i] * half);
  const char* s = at(p.sin, t, p.positions[i] * half);
  for (int64_t h = 0; h < p.heads; ++h) {
    char* x1 = at(p.x, t, i * p.token_stride + h * p.head_stride);
    char* x2 = at(x1, t, half);
    int64_t j = 0;
    for (; j < vec_end; j += kLanes) {
      const VecF a = load16(at(x1, t, j), t), b = load16(at(x2, t, j), t);
      const VecF cv = load16(at(c, t, j), t), sv = load16(at(s, t, j), t);
      store16(at(x1, t, j), vsub(round16(vmul(a, cv), t), round16(vmul(b, sv), t)), t);
      store16(at(x2, t, j), vadd(round16(vmul(b, cv), t), round16(vmul(a, sv), t)), t);
    }
    for (; j < half; ++j) {
      const float a = load1(x1, t, j), b = load1(x2, t, j), cv = load1(c, t, j), sv = load1(s, t, j);
      store1(x1, t, j, round1(a * cv, t) - round1(b * sv, t));
      store1(x2, t, j, round1(b * cv, t) + round1(a * sv, t));
    }
  }
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS

namespace fastinfer::cpu {
// This level's row kernels (pointwise_<suffix>, declared in pointwise_cpu.h).
PointwiseKernels FI_ISA_CAT(pointwise_, FI_ISA_NS)() {
  return {&FI_ISA_NS::rms_norm_row, &FI_ISA_NS::act_mul_row, &FI_ISA_NS::rotary_token};
}
}  // namespace fastinfer::cpu
