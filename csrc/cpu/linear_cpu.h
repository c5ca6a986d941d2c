// Interface between the ISA-independent CPU linear driver (linear_dispatch.cpp) and the
// per-ISA tile kernels (linear_<isa>.cpp, all built from linear_kernel.h).
#pragma once
#include "fastinfer/cpu.h"

namespace fastinfer::cpu {

// Computes rows [row_begin, row_end) of `out` for the 64 outputs of one weight panel, and
// prefetches panel prefetch_panel meanwhile (-1: none). scratch holds at least
// linear_scratch_floats(k) floats (per worker, reused).
using LinearTileFn = void (*)(const LinearParams& p, int64_t panel, int64_t row_begin, int64_t row_end,
                              int64_t prefetch_panel, float* scratch);
inline int64_t linear_scratch_floats(int64_t k) { return 8 * (k + 1) + 2 * kLinearPanel; }

LinearTileFn linear_tile_scalar();
LinearTileFn linear_tile_avx2();
LinearTileFn linear_tile_avx512();
LinearTileFn linear_tile_avx512bf16();

}  // namespace fastinfer::cpu
