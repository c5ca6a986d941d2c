// What the AMX kernels share (attention's bf16 tiles, the quantised linear's int8 and bf16 tiles): the tile
// configuration (palette 1), and the f16 scales of two 8-row sub-panels as one 16-output vector.
#pragma once
#include <cstdint>

#if defined(__AMX_TILE__)
#include <immintrin.h>

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

struct alignas(64) AmxTileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];  // bytes per row of each tile
  uint8_t rows[16];
};

// fn(a, b, i) for each block of the sub-panels at `base` (nb packed blocks of `block` bytes each), taken two by two
// into B tiles: a and b the blocks of sub-panels 2 j and 2 j + 1 (b null past the last of `subs`), i = j nb + block.
template <class Fn>
void for_pair_blocks(const uint8_t* base, int64_t subs, int64_t nb, int64_t block, Fn&& fn) {
  for (int64_t j = 0; 2 * j < subs; ++j) {
    const uint8_t* sa = base + 2 * j * nb * block;
    const uint8_t* sb = 2 * j + 1 < subs ? sa + nb * block : nullptr;
    for (int64_t b = 0; b < nb; ++b) fn(sa + b * block, sb != nullptr ? sb + b * block : nullptr, j * nb + b);
  }
}

// 8 f16 values of sub-panel a and 8 of sub-panel b (null: zeros) as 16 floats.
inline __m512 scales16(const uint16_t* a, const uint16_t* b) {
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
  const __m256 hi = b != nullptr ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))) : _mm256_setzero_ps();
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
#endif
