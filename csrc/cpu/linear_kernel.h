// Tile kernel of the CPU linear, compiled once per SIMD level (each linear_<isa>.cpp
// defines FI_ISA_NS and gets its own flags). A tile is up to kRows rows of x against one
// 64-output weight panel: the accumulators stay in registers for the whole K loop, and the
// panel is read once per tile, in memory order.
#pragma once
#include <algorithm>
#include <cstring>

#include "cpu/linear_cpu.h"
#include "cpu/vec.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

constexpr int kVecs = kLinearPanel / kLanes;  // 4 vectors of 16 outputs per panel

inline uint32_t load_u32(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);  // x rows need not be 4-byte aligned
  return v;
}

// One K step of the next panel (256 bytes, what a step of this one reads): while this panel's
// rows are computed from cache, the next one streams in, so no tile starts on a cold panel.
inline void prefetch_step(const char* p) {
  for (int b = 0; b < 4 * kLinearPanel; b += 64) __builtin_prefetch(p + b, 0, 2);
}

// 16 interleaved (k, k+1) bf16 weight pairs -> the k weights and the k+1 weights as floats.
inline void load_pairs(const uint16_t* p, VecF& even, VecF& odd) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_loadu_si512(p);
  even.v = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd.v = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
#elif defined(__AVX2__)
  const __m256i mask = _mm256_set1_epi32(int(0xffff0000u));
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  even.lo = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
  even.hi = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
  odd.lo = _mm256_castsi256_ps(_mm256_and_si256(lo, mask));
  odd.hi = _mm256_castsi256_ps(_mm256_and_si256(hi, mask));
#else
  for (int i = 0; i < kLanes; ++i) {
    even.v[i] = bf16_to_f32(p[2 * i]);
    odd.v[i] = bf16_to_f32(p[2 * i + 1]);
  }
#endif
}

// float -> the output dtype, n elements (round to nearest even for bf16, as torch rounds).
inline void store_row(const float* src, DType dtype, void* dst, int n) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, sizeof(float) * n);
    return;
  }
  uint16_t* o = static_cast<uint16_t*>(dst);
  int i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src + i));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    // NaN stays a quiet NaN instead of rounding into infinity or the sign bit
    const __mmask16 nan = _mm512_cmp_ps_mask(_mm512_castsi512_ps(u), _mm512_castsi512_ps(u), _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), _mm512_cvtepi32_epi16(r));
  }
#endif
  for (; i < n; ++i) o[i] = f32_to_bf16(src[i]);
}

template <int R>
void store_tile(const LinearParams& p, const VecF (&acc)[R][kVecs], int64_t row0, int64_t col0, int valid,
                const float* bias, float* tmp) {
  const int esz = dtype_size(p.out_dtype);
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kVecs; ++j) vstore(tmp + j * kLanes, bias ? vadd(acc[r][j], vload(bias + j * kLanes)) : acc[r][j]);
    store_row(tmp, p.out_dtype, static_cast<char*>(p.out) + esz * ((row0 + r) * p.out_row_stride + col0), valid);
  }
}

#if defined(__AVX512BF16__)
constexpr int kRowsNative = 6;  // 24 accumulators + 4 weight vectors + 1 broadcast of the 32 zmm registers

// bf16 x bf16 pair dots (vdpbf16ps), reading x's (k, k+1) pairs straight from the row.
template <int R>
void tile_bf16_native(const LinearParams& p, const uint16_t* panel, int64_t row0, const char* prefetch,
                      VecF (&acc)[R][kVecs]) {
  const uint16_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = static_cast<const uint16_t*>(p.x) + (row0 + r) * p.x_row_stride;
  __m512 a[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVecs; ++j) a[r][j] = _mm512_setzero_ps();
  const int64_t pairs = p.k / 2;
  auto step = [&](const uint16_t* w, const uint32_t* xpair) {
    __m512bh wv[kVecs];
    for (int j = 0; j < kVecs; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + 32 * j);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(xpair[r]));
      for (int j = 0; j < kVecs; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], xv, wv[j]);
    }
  };
  for (int64_t i = 0; i < pairs; ++i) {
    uint32_t xp[R];
    for (int r = 0; r < R; ++r) xp[r] = load_u32(xr[r] + 2 * i);
    if (prefetch) prefetch_step(prefetch + 4 * kLinearPanel * i);
    step(panel + 2 * kLinearPanel * i, xp);
  }
  if (p.k & 1) {  // the packed pair's second weight is zero; x's partner must be a finite 0 too
    uint32_t xp[R];
    for (int r = 0; r < R; ++r) xp[r] = xr[r][p.k - 1];
    step(panel + 2 * kLinearPanel * pairs, xp);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVecs; ++j) acc[r][j].v = a[r][j];
}
#endif

// bf16 weights as floats, x staged as float rows (xs: R rows of k floats).
template <int R>
void tile_bf16_widened(const LinearParams& p, const uint16_t* panel, const float* xs, VecF (&acc)[R][kVecs]) {
  const int64_t k = p.k, pairs = k / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    VecF even[kVecs], odd[kVecs];
    for (int j = 0; j < kVecs; ++j) load_pairs(panel + 2 * kLinearPanel * i + 2 * kLanes * j, even[j], odd[j]);
    for (int r = 0; r < R; ++r) {
      const VecF x0 = vset1(xs[r * k + 2 * i]), x1 = vset1(xs[r * k + 2 * i + 1]);
      for (int j = 0; j < kVecs; ++j) acc[r][j] = vfma(x1, odd[j], vfma(x0, even[j], acc[r][j]));
    }
  }
  if (k & 1) {
    for (int j = 0; j < kVecs; ++j) {
      VecF even, odd;
      load_pairs(panel + 2 * kLinearPanel * pairs + 2 * kLanes * j, even, odd);
      for (int r = 0; r < R; ++r) acc[r][j] = vfma(vset1(xs[r * k + k - 1]), even, acc[r][j]);
    }
  }
}

template <int R>
void tile_f32(const LinearParams& p, const float* panel, int64_t row0, const char* prefetch, VecF (&acc)[R][kVecs]) {
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = static_cast<const float*>(p.x) + (row0 + r) * p.x_row_stride;
  for (int64_t kk = 0; kk < p.k; ++kk) {
    if (prefetch) prefetch_step(prefetch + 4 * kLinearPanel * kk);
    VecF w[kVecs];
    for (int j = 0; j < kVecs; ++j) w[j] = vload(panel + kLinearPanel * kk + kLanes * j);
    for (int r = 0; r < R; ++r) {
      const VecF x = vset1(xr[r][kk]);
      for (int j = 0; j < kVecs; ++j) acc[r][j] = vfma(x, w[j], acc[r][j]);
    }
  }
}

// Rows [row0, row0 + R) against one panel; scratch: staged x rows, then bias and a store buffer.
template <int R>
void rows_against_panel(const LinearParams& p, int64_t panel_idx, int64_t row0, const float* bias, float* scratch,
                        const char* prefetch) {
  VecF acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVecs; ++j) acc[r][j] = vzero();
  const int64_t packed_k = linear_packed_k(p.k, p.dtype);
  if (p.dtype == DType::kFloat32) {
    tile_f32<R>(p, static_cast<const float*>(p.w_packed) + panel_idx * kLinearPanel * packed_k, row0, prefetch, acc);
  } else {
    const uint16_t* panel = static_cast<const uint16_t*>(p.w_packed) + panel_idx * kLinearPanel * packed_k;
#if defined(__AVX512BF16__)
    tile_bf16_native<R>(p, panel, row0, prefetch, acc);
#else
    for (int r = 0; r < R; ++r)
      row_to_f32(static_cast<const uint16_t*>(p.x) + (row0 + r) * p.x_row_stride, 2, scratch + r * p.k, int(p.k));
    tile_bf16_widened<R>(p, panel, scratch, acc);
#endif
  }
  const int64_t col0 = panel_idx * kLinearPanel;
  const int valid = int(std::min<int64_t>(kLinearPanel, p.n - col0));
  store_tile<R>(p, acc, row0, col0, valid, bias, scratch + 8 * (p.k + 1) + kLinearPanel);
}

#if defined(__AVX512BF16__)
constexpr int kRows = kRowsNative;
#elif defined(__AVX512F__)
constexpr int kRows = 4;  // the widened bf16 path also holds 8 weight vectors
#else
constexpr int kRows = 2;  // 16 ymm registers: more rows only spill
#endif

void linear_tile(const LinearParams& p, int64_t panel_idx, int64_t row_begin, int64_t row_end, int64_t prefetch_panel,
                 float* scratch) {
  const float* bias = nullptr;
  if (p.bias) {  // the panel's bias as floats, zero past n
    float* b = scratch + 8 * (p.k + 1);
    const int64_t col0 = panel_idx * kLinearPanel;
    const int valid = int(std::min<int64_t>(kLinearPanel, p.n - col0));
    std::fill(b, b + kLinearPanel, 0.f);
    row_to_f32(static_cast<const char*>(p.bias) + dtype_size(p.dtype) * col0, p.dtype == DType::kFloat32 ? 0 : 2, b, valid);
    bias = b;
  }
  // The next panel is fetched during the first row block only (it is the one reading memory).
  const int64_t panel_bytes = int64_t(dtype_size(p.dtype)) * kLinearPanel * linear_packed_k(p.k, p.dtype);
  const char* prefetch = prefetch_panel >= 0 ? static_cast<const char*>(p.w_packed) + prefetch_panel * panel_bytes : nullptr;
  int64_t row = row_begin;
  for (; row + kRows <= row_end; row += kRows, prefetch = nullptr)
    rows_against_panel<kRows>(p, panel_idx, row, bias, scratch, prefetch);
  switch (row_end - row) {
    case 5: if constexpr (kRows > 5) rows_against_panel<5>(p, panel_idx, row, bias, scratch, prefetch); break;
    case 4: if constexpr (kRows > 4) rows_against_panel<4>(p, panel_idx, row, bias, scratch, prefetch); break;
    case 3: if constexpr (kRows > 3) rows_against_panel<3>(p, panel_idx, row, bias, scratch, prefetch); break;
    case 2: if constexpr (kRows > 2) rows_against_panel<2>(p, panel_idx, row, bias, scratch, prefetch); break;
    case 1: rows_against_panel<1>(p, panel_idx, row, bias, scratch, prefetch); break;
    default: break;
  }
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS

namespace fastinfer::cpu {
// This level's tile kernel (linear_tile_<suffix>, declared in linear_cpu.h).
LinearTileFn FI_ISA_CAT(linear_tile_, FI_ISA_NS)() { return &FI_ISA_NS::linear_tile; }
}  // namespace fastinfer::cpu

// The quantised linear's kernels share this level's flags, helpers and translation unit.
#include "cpu/qlinear_kernel.h"
