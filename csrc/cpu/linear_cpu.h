// Interface between the ISA-independent CPU linear driver (linear_dispatch.cpp) and the
// per-ISA tile kernels (linear_<isa>.cpp, all built from linear_kernel.h).
#pragma once
#include "cpu/isa_list.h"
#include "fastinfer/cpu.h"

namespace fastinfer::cpu {

// Computes rows [row_begin, row_end) of `out` for the 64 outputs of one weight panel, and
// prefetches panel prefetch_panel meanwhile (-1: none). scratch holds at least
// linear_scratch_floats(k) floats (per worker, reused).
using LinearTileFn = void (*)(const LinearParams& p, int64_t panel, int64_t row_begin, int64_t row_end,
                              int64_t prefetch_panel, float* scratch);
inline int64_t linear_scratch_floats(int64_t k) { return 8 * (k + 1) + 2 * kLinearPanel; }

// linear_tile_<suffix>() of every level of isa_list.h (defined where it has its own kernel).
#define FI_ISA_DECLARE(suffix, ...) LinearTileFn linear_tile_##suffix();
FI_CPU_ISAS(FI_ISA_DECLARE)
#undef FI_ISA_DECLARE

}  // namespace fastinfer::cpu
