// What the AMX kernels share (attention's bf16 tiles, the quantised linear's int8 and bf16 tiles): the tile
// configuration (palette 1), and the walk over a task's sub-panels two by two.
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

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
#endif
