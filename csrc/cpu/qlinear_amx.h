// AMX-INT8 kernel of the 32-element block formats (q8_0, q4_0, q4_1, q5_0), included by qlinear_kernel.h and
// compiled where the level has AMX-INT8: 16 activation rows at a time against one 8-row sub-panel. Per
// 32-block one tile product gives the 16 x 8 exact integer sums (q8_0: signed x signed; q4: signed
// activations x the unsigned nibbles, their offsets applied through the activation sums as dot32 does),
// then the block's scales are folded in AVX-512 with the very float operations of dot32, in the same
// order, lane for lane: a row's output is bit for bit what the VNNI kernel gives it, so which kernel a
// row runs (batch size) never changes its result.
#pragma once
#include "cpu/amx_tiles.h"
#include "cpu/qlinear_common.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
namespace fastinfer::cpu::FI_ISA_NS {
namespace {

constexpr int kAmxRows = 16;  // activation rows per tile product

struct QAmxScratch;  // a task's weights as B tiles and one product's integer sums

// Per task: another kernel (attention's bf16 tiles, oneDNN in torch) may have configured the tiles differently.
// Two sets of tiles, for even and odd blocks, so one block's product need not wait for the last one's store.
inline void qamx_configure() {
  AmxTileConfig cfg{};
  cfg.palette = 1;
  for (int set = 0; set < 2; ++set) {
    cfg.rows[3 * set] = 8;  // B: the block's 8 groups of 4 values, each for the 16 rows of two sub-panels
    cfg.colsb[3 * set] = 64;
    cfg.rows[3 * set + 1] = kAmxRows;  // A: 16 activation rows x the block's 32 int8 values
    cfg.colsb[3 * set + 1] = 32;
    cfg.rows[3 * set + 2] = kAmxRows;  // C: 16 rows x 16 int32 sums
    cfg.colsb[3 * set + 2] = 64;
  }
  _tile_loadconfig(&cfg);
}

// The exact integer sums of one block into `sums` (16 x 16 int32), with tiles B, A, C (the tile intrinsics
// take literal numbers): 16 activation rows (qa, row stride k) x the 16 weight rows of wvals.
#define FI_AMX_BLOCK(B, A, C, q8, wvals, qa, k, sums) \
  do {                                               \
    _tile_loadd(B, wvals, 64);                       \
    _tile_loadd(A, qa, k);                           \
    _tile_zero(C);                                   \
    if (q8)                                          \
      _tile_dpbssd(C, A, B);                         \
    else                                             \
      _tile_dpbsud(C, A, B);                         \
    _tile_stored(C, sums, 64);                       \
  } while (0)

constexpr int kPairBytes = 512;  // a block of two sub-panels as one B tile: 8 rows of 64 bytes

// Block values of sub-panels a and b (null: zeros) as one B tile: row c = values 4 c .. 4 c + 3 of a's 8 rows,
// then of b's, a byte each (q4: nibbles unpacked; packed byte 32 j + 4 r + e holds value 4 j + e of row r in its
// low half and 16 + 4 j + e in its high half; q5_0: the fifth bits or-ed in).
inline void pair_block(QType t, const uint8_t* a, const uint8_t* b, uint8_t* u) {
  auto emit = [u](int c, __m512i va, __m512i vb) {  // va, vb: rows c and c + 1, 32 bytes each
    _mm512_storeu_si512(u + 64 * c, _mm512_shuffle_i64x2(va, vb, 0x44));
    _mm512_storeu_si512(u + 64 * (c + 1), _mm512_shuffle_i64x2(va, vb, 0xee));
  };
  const bool q8 = t == QType::kQ8_0, q5 = t == QType::kQ5_0;
  alignas(64) uint8_t ha[8][32] = {}, hb[8][32] = {};
  if (q5) {
    q5_high(a, ha);
    if (b != nullptr) q5_high(b, hb);
  }
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  for (int h = 0; h < (q8 ? 4 : 2); ++h) {
    const __m512i va = _mm512_loadu_si512(a + 64 * h);
    const __m512i vb = b != nullptr ? _mm512_loadu_si512(b + 64 * h) : _mm512_setzero_si512();
    if (q8) {
      emit(2 * h, va, vb);
      continue;
    }
    __m512i la = _mm512_and_si512(va, low4), lb = _mm512_and_si512(vb, low4);
    __m512i ua = _mm512_and_si512(_mm512_srli_epi16(va, 4), low4), ub = _mm512_and_si512(_mm512_srli_epi16(vb, 4), low4);
    if (q5) {  // chunks 2 h, 2 h + 1 (low nibbles) and 4 + 2 h, 5 + 2 h (high): 64 bytes of ha / hb each
      la = _mm512_or_si512(la, _mm512_load_si512(ha[2 * h]));
      lb = _mm512_or_si512(lb, _mm512_load_si512(hb[2 * h]));
      ua = _mm512_or_si512(ua, _mm512_load_si512(ha[4 + 2 * h]));
      ub = _mm512_or_si512(ub, _mm512_load_si512(hb[4 + 2 * h]));
    }
    emit(2 * h, la, lb);
    emit(4 + 2 * h, ua, ub);
  }
}

// Activation rows i0 .. i0 + 15 against sub-panels sa and sb (null: none) -> out[16][16] (columns 0..7: sa's
// rows, 8..15: sb's). u: the pair's values as pair_block lays them out, kPairBytes a block. sums: nb * 256 int32.
void amx_rows16(const QLinearParams& p, const uint8_t* sa, const uint8_t* sb, const uint8_t* u, const int8_t* qa,
                const float* da, const float* as, int64_t i0, int32_t* sums, float (*out)[2 * kQRows]) {
  const int64_t nb = p.k / kQBlock, block = qpacked_block_bytes(p.qtype), k = p.k;
  const bool q8 = p.qtype == QType::kQ8_0;
  constexpr int kSums = kAmxRows * 2 * kQRows;
  const int8_t* a = qa + i0 * k;
  // Every block's tile product first: the products run back to back, and the scaling below reads sums stored
  // long before (a vector load right behind a tile store of the same bytes waits for it).
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    FI_AMX_BLOCK(0, 1, 2, q8, u + b * kPairBytes, a + b * kQBlock, k, sums + b * kSums);
    FI_AMX_BLOCK(3, 4, 5, q8, u + (b + 1) * kPairBytes, a + (b + 1) * kQBlock, k, sums + (b + 1) * kSums);
  }
  if (b < nb) FI_AMX_BLOCK(0, 1, 2, q8, u + b * kPairBytes, a + b * kQBlock, k, sums + b * kSums);
  const int vb = qtype_value_bytes(p.qtype);
  auto scales = [&](int64_t blk, int which) {  // d (0) or m (1) of both sub-panels' block blk
    const uint8_t* pa = sa + blk * block + kQRows * vb + 2 * kQRows * which;
    const uint8_t* pb = sb != nullptr ? sb + blk * block + kQRows * vb + 2 * kQRows * which : nullptr;
    return f16_pair(reinterpret_cast<const uint16_t*>(pa), reinterpret_cast<const uint16_t*>(pb));
  };
  // dot32's float operations, lane for lane and in its order: acc += sum * (dw * da); macc += mw * (da * sum q).
  __m512 acc[kAmxRows];
  for (int i = 0; i < kAmxRows; ++i) acc[i] = _mm512_setzero_ps();
  for (b = 0; b < nb; ++b) {
    const __m512 dw = scales(b, 0);
    const int32_t* s = sums + b * kSums;
    for (int i = 0; i < kAmxRows; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(s + 2 * kQRows * i)),
                               _mm512_mul_ps(dw, _mm512_set1_ps(da[(i0 + i) * nb + b])), acc[i]);
  }
  __m512 macc[kAmxRows];
  for (int i = 0; i < kAmxRows; ++i) macc[i] = _mm512_setzero_ps();
  if (!q8)
    for (b = 0; b < nb; ++b) {
      const __m512 mw = scales(b, 1);
      for (int i = 0; i < kAmxRows; ++i) macc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(as[(i0 + i) * nb + b]), macc[i]);
    }
  for (int i = 0; i < kAmxRows; ++i) _mm512_storeu_ps(out[i], _mm512_add_ps(acc[i], macc[i]));
}

// Whole groups of 16 rows of the 32-block formats; returns the number of rows done (the rest runs dot32).
template <class StoreFn>
int64_t amx_panel(const QLinearParams& p, int64_t sub0, int64_t subs, const int8_t* qa, const float* da,
                  const float* as, StoreFn&& store) {
  const int64_t groups = p.m / kAmxRows, nb = p.k / kQBlock, block = qpacked_block_bytes(p.qtype);
  const int64_t sub_bytes = nb * block;
  if (groups == 0) return 0;
  subs = std::min(subs, (p.n + kQRows - 1) / kQRows - sub0);  // sub-panels that hold outputs
  const bool q8 = p.qtype == QType::kQ8_0;
  const int64_t pairs = (subs + 1) / 2;
  // Scratch: the task's sub-panels two by two as B tiles (pair_block), then the sums of one pair (nb x 16 x 16).
  char* buf = thread_scratch<QAmxScratch>(pairs * nb * kPairBytes + sizeof(int32_t) * nb * kAmxRows * 2 * kQRows);
  uint8_t* tiles = reinterpret_cast<uint8_t*>(buf);
  int32_t* sums = reinterpret_cast<int32_t*>(buf + pairs * nb * kPairBytes);
  const uint8_t* base = static_cast<const uint8_t*>(p.w_packed) + sub0 * sub_bytes;
  for_pair_blocks(base, subs, nb, block,
                  [&](const uint8_t* a, const uint8_t* b, int64_t i) { pair_block(p.qtype, a, b, tiles + i * kPairBytes); });
  qamx_configure();
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < pairs; ++j) {
      const uint8_t* sa = base + 2 * j * sub_bytes;
      const bool two = 2 * j + 1 < subs;
      float out[kAmxRows][2 * kQRows], half[kAmxRows][kQRows];
      amx_rows16(p, sa, two ? sa + sub_bytes : nullptr, tiles + j * nb * kPairBytes, qa, da, as, g * kAmxRows, sums, out);
      for (int h = 0; h < (two ? 2 : 1); ++h) {
        for (int i = 0; i < kAmxRows; ++i) std::memcpy(half[i], out[i] + kQRows * h, sizeof(half[i]));
        store(sub0 + 2 * j + h, g * kAmxRows, kAmxRows, half);
      }
    }
  return groups * kAmxRows;
}

#undef FI_AMX_BLOCK

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
#endif
