// AMX-BF16 kernel of the float-activation path (QActivations::kFloat) for the 32-element block formats
// (q8_0, q4_0, q4_1, q5_0) with float32 x, included by qlinear_float.h where the level has AMX-BF16.
//
// A weight is d q + m per 32-block, with q a small integer (exact in bf16), so a row's output is
//   sum over blocks b of  d_b (sum_j q_j x_j) + m_b (sum_j x_j).
// x is split exactly into three bf16 parts (hi + mid + lo = x: 8 + 8 + 8 mantissa bits), and one 32-block's
// sum_j q_j x_j for 16 rows x 16 outputs is three tile products with float32 accumulation (the products of
// an 8-bit q and an 8-bit part are exact), then scaled in AVX-512: float32 accuracy, several times the
// speed of the FMA kernel. Every row runs on the tile unit (a last group of fewer than 16 rows in shorter
// tiles), and a row's arithmetic never involves another row, so its result does not depend on the batch.
#pragma once
#include "cpu/amx_tiles.h"
#include "cpu/qlinear_common.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
namespace fastinfer::cpu::FI_ISA_NS {
namespace {

constexpr int kAfRows = 16;          // activation rows per tile
constexpr int kAfPairBytes = 1024;   // a block of two sub-panels as one B tile: 16 rows (value pairs) x 64 bytes

struct QAmxFloatScratch;  // a task's weights as B tiles and the tile sums

// Tiles 0-2: A (x's hi, mid, lo parts: 16 rows x 32 bf16); 3, 5: B (16 pair rows x 16 outputs); 4, 6: C (16 x 16
// floats). Always 16 rows: a last group of fewer rows has zero rows after them (its scaling then runs in
// registers, a fixed 16 rows; a row's arithmetic is the same either way).
inline void qaf_configure() {
  AmxTileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = kAfRows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// 16 int32 lanes (|v| <= 128) -> 16 bf16, exactly.
inline __m256i i32_to_bf16(__m512i v) { return (__m256i)_mm512_cvtneps_pbh(_mm512_cvtepi32_ps(v)); }

// Block b of sub-panels a and b (null: zeros) as one B tile: row r holds, for each of the 16 outputs (a's 8
// rows, then b's), values 2 r and 2 r + 1 as bf16. Packed chunk c (32 bytes: 4 values of each of 8 rows)
// gives tile rows 2 c (values 4 c, 4 c + 1 of each row) and 2 c + 1 (4 c + 2, 4 c + 3).
inline void af_pair_block(QType t, const uint8_t* a, const uint8_t* b, uint8_t* u) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  // Chunk as 32 bf16 ([row][4 values]; as 16 dwords: dword 2 r = values 4c, 4c+1 of row r, 2 r + 1 the other two)
  // -> tile rows 2 c and 2 c + 1, a's outputs then b's.
  auto emit = [&](int c, __m512i va, __m512i vb) {
    _mm512_storeu_si512(u + 64 * (2 * c), _mm512_permutex2var_epi32(va, even, vb));
    _mm512_storeu_si512(u + 64 * (2 * c + 1), _mm512_permutex2var_epi32(va, odd, vb));
  };
  if (t == QType::kQ8_0) {
    auto chunk = [](const uint8_t* blk, int c) {
      const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 * c)));
      const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 * c + 16)));
      return _mm512_inserti64x4(_mm512_castsi256_si512(i32_to_bf16(v)), i32_to_bf16(w), 1);
    };
    for (int c = 0; c < kQBlock / 4; ++c) emit(c, chunk(a, c), b != nullptr ? chunk(b, c) : _mm512_setzero_si512());
    return;
  }
  // Nibbles: bytes 32 j .. hold chunk j in their low halves and chunk 4 + j in their high ones (q5_0: plus 16 for
  // the fifth bit); 0..31 -> bf16 by a 16-bit table lookup (the bf16 of v: 0x3f80 for 1, 0x4000 for 2, ...).
  alignas(64) static const uint16_t kBf16Of[32] = {
      0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
      0x4180, 0x4188, 0x4190, 0x4198, 0x41a0, 0x41a8, 0x41b0, 0x41b8, 0x41c0, 0x41c8, 0x41d0, 0x41d8, 0x41e0, 0x41e8, 0x41f0, 0x41f8};
  const __m512i table = _mm512_load_si512(kBf16Of);
  const __m512i low4 = _mm512_set1_epi16(15);
  const bool q5 = t == QType::kQ5_0;
  alignas(32) uint8_t ha[8][32] = {}, hb[8][32] = {};
  if (q5) {
    q5_high(a, ha);
    if (b != nullptr) q5_high(b, hb);
  }
  auto words = [](const uint8_t* p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); };
  for (int j = 0; j < 4; ++j) {
    const __m512i wa = words(a + 32 * j), wb = b != nullptr ? words(b + 32 * j) : _mm512_setzero_si512();
    __m512i la = _mm512_and_si512(wa, low4), lb = _mm512_and_si512(wb, low4);
    __m512i ua = _mm512_srli_epi16(wa, 4), ub = _mm512_srli_epi16(wb, 4);
    if (q5) {
      la = _mm512_or_si512(la, words(ha[j]));
      lb = _mm512_or_si512(lb, words(hb[j]));
      ua = _mm512_or_si512(ua, words(ha[4 + j]));
      ub = _mm512_or_si512(ub, words(hb[4 + j]));
    }
    emit(j, _mm512_permutexvar_epi16(la, table), _mm512_permutexvar_epi16(lb, table));
    emit(4 + j, _mm512_permutexvar_epi16(ua, table), _mm512_permutexvar_epi16(ub, table));
  }
}

// Rows x (float32, row stride ld) -> parts[3][16][k] bf16 with hi + mid + lo == x, and xsum[row][b], the
// float32 sum of each 32-block (in a fixed order); rows from `rows` to 16 zero.
inline void af_split_rows(const float* x, int64_t ld, int rows, int64_t k, uint16_t* parts, float* xsum) {
  const int64_t nb = k / kQBlock;
  for (int i = rows; i < kAfRows; ++i) {
    for (int part = 0; part < 3; ++part) std::memset(parts + (part * kAfRows + i) * k, 0, 2 * k);
    std::memset(xsum + i * nb, 0, sizeof(float) * nb);
  }
  for (int i = 0; i < rows; ++i) {
    const float* xr = x + i * ld;
    for (int64_t j = 0; j < k; j += 16) {
      const __m512 v = _mm512_loadu_ps(xr + j);
      const __m256i hi = (__m256i)_mm512_cvtneps_pbh(v);
      const __m512 r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16)));
      const __m256i mid = (__m256i)_mm512_cvtneps_pbh(r1);
      const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(mid), 16)));
      const __m256i lo = (__m256i)_mm512_cvtneps_pbh(r2);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts + i * k + j), hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts + (kAfRows + i) * k + j), mid);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts + (2 * kAfRows + i) * k + j), lo);
    }
    for (int64_t b = 0; b < nb; ++b)
      xsum[i * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(xr + 32 * b), _mm512_loadu_ps(xr + 32 * b + 16)));
  }
}

// The call's x, once: per group of 16 rows, its parts (3 x 16 x k bf16) then its block sums (16 x k / 32 floats).
inline int64_t af_group_bytes(int64_t k) { return 3 * kAfRows * k * 2 + 4 * kAfRows * (k / kQBlock); }
inline int64_t af_prep_bytes(const QLinearParams& p) { return (p.m + kAfRows - 1) / kAfRows * af_group_bytes(p.k); }
inline void af_prep(const QLinearParams& p, void* prep) {
  for (int64_t i0 = 0; i0 < p.m; i0 += kAfRows) {
    uint16_t* parts = reinterpret_cast<uint16_t*>(static_cast<char*>(prep) + i0 / kAfRows * af_group_bytes(p.k));
    af_split_rows(static_cast<const float*>(p.x) + i0 * p.x_row_stride, p.x_row_stride,
                  static_cast<int>(std::min<int64_t>(kAfRows, p.m - i0)), p.k, parts, reinterpret_cast<float*>(parts + 3 * kAfRows * p.k));
  }
}

// One block's three products into C for the tile set (B, C): A parts in tiles 0-2.
#define FI_AF_PRODUCT(B, C, w, sums) \
  do {                               \
    _tile_loadd(B, w, 64);           \
    _tile_zero(C);                   \
    _tile_dpbf16ps(C, 0, B);         \
    _tile_dpbf16ps(C, 1, B);         \
    _tile_dpbf16ps(C, 2, B);         \
    _tile_stored(C, sums, 64);       \
  } while (0)

// All m rows of out for sub-panels sub0 .. sub0 + subs - 1 (float32 x, a 32-block type).
template <class StoreFn>
void amx_float_panel(const QLinearParams& p, int64_t sub0, int64_t subs, const void* prep, StoreFn&& store) {
  const int64_t nb = p.k / kQBlock, block = qpacked_block_bytes(p.qtype), sub_bytes = nb * block;
  subs = std::min(subs, (p.n + kQRows - 1) / kQRows - sub0);  // sub-panels that hold outputs
  if (subs <= 0) return;
  const bool q8 = p.qtype == QType::kQ8_0;
  const int64_t pairs = (subs + 1) / 2, tile_sums = kAfRows * 2 * kQRows;
  // Scratch: the B tiles (pairs x nb x 1 KB), then the tile sums (pairs x nb x 1 KB).
  const int64_t tiles_bytes = pairs * nb * kAfPairBytes;
  char* buf = thread_scratch<QAmxFloatScratch>(tiles_bytes + 4 * pairs * nb * tile_sums);
  uint8_t* tiles = reinterpret_cast<uint8_t*>(buf);
  float* sums = reinterpret_cast<float*>(buf + tiles_bytes);
  const uint8_t* base = static_cast<const uint8_t*>(p.w_packed) + sub0 * sub_bytes;
  for_pair_blocks(base, subs, nb, block,
                  [&](const uint8_t* a, const uint8_t* b, int64_t i) { af_pair_block(p.qtype, a, b, tiles + i * kAfPairBytes); });
  const int vb = qtype_value_bytes(p.qtype);
  auto scales = [&](int64_t j, int64_t b, int which) {  // d (0) or m (1) of pair j's block b, 16 outputs
    const uint8_t* sa = base + 2 * j * sub_bytes + b * block + kQRows * vb + 2 * kQRows * which;
    return f16_pair(reinterpret_cast<const uint16_t*>(sa),
                    2 * j + 1 < subs ? reinterpret_cast<const uint16_t*>(sa + sub_bytes) : nullptr);
  };
  qaf_configure();
  for (int64_t i0 = 0; i0 < p.m; i0 += kAfRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kAfRows, p.m - i0));
    const uint16_t* parts = reinterpret_cast<const uint16_t*>(static_cast<const char*>(prep) + i0 / kAfRows * af_group_bytes(p.k));
    const float* xsum = reinterpret_cast<const float*>(parts + 3 * kAfRows * p.k);
    // Tile phase: per block, x's parts loaded once for every pair of sub-panels; sums[j][b] = 16 x 16 floats.
    for (int64_t b = 0; b < nb; ++b) {
      _tile_loadd(0, parts + 32 * b, 2 * p.k);
      _tile_loadd(1, parts + kAfRows * p.k + 32 * b, 2 * p.k);
      _tile_loadd(2, parts + 2 * kAfRows * p.k + 32 * b, 2 * p.k);
      int64_t j = 0;
      for (; j + 2 <= pairs; j += 2) {
        FI_AF_PRODUCT(3, 4, tiles + (j * nb + b) * kAfPairBytes, sums + (j * nb + b) * tile_sums);
        FI_AF_PRODUCT(5, 6, tiles + ((j + 1) * nb + b) * kAfPairBytes, sums + ((j + 1) * nb + b) * tile_sums);
      }
      if (j < pairs) FI_AF_PRODUCT(3, 4, tiles + (j * nb + b) * kAfPairBytes, sums + (j * nb + b) * tile_sums);
    }
    // Scaling: out = sum_b d_b C_b + sum_b m_b xsum_b (two accumulations, added at the end).
    for (int64_t j = 0; j < pairs; ++j) {
      float out[kAfRows][2 * kQRows], half[kAfRows][kQRows];
      {
        __m512 acc[kAfRows];  // 16 rows, a fixed count: the accumulators stay in registers
        for (int i = 0; i < kAfRows; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          const __m512 d = scales(j, b, 0);
          const float* c = sums + (j * nb + b) * tile_sums;
          for (int i = 0; i < kAfRows; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(c + 2 * kQRows * i), d, acc[i]);
        }
        for (int i = 0; i < kAfRows; ++i) _mm512_storeu_ps(out[i], acc[i]);
      }
      if (!q8) {
        __m512 macc[kAfRows];
        for (int i = 0; i < kAfRows; ++i) macc[i] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          const __m512 m = scales(j, b, 1);
          for (int i = 0; i < kAfRows; ++i) macc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[i * nb + b]), macc[i]);
        }
        for (int i = 0; i < kAfRows; ++i) _mm512_storeu_ps(out[i], _mm512_add_ps(_mm512_loadu_ps(out[i]), macc[i]));
      }
      for (int h = 0; h < (2 * j + 1 < subs ? 2 : 1); ++h) {
        for (int i = 0; i < rows; ++i) std::memcpy(half[i], out[i] + kQRows * h, sizeof(half[i]));
        store(sub0 + 2 * j + h, i0, rows, half);
      }
    }
  }
}

#undef FI_AF_PRODUCT

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
#endif
