// Interface between the ISA-independent driver of the quantised CPU linear (qlinear_dispatch.cpp)
// and its per-ISA kernels (qlinear_kernel.h, compiled inside each linear_<isa>.cpp).
#pragma once
#include "cpu/isa_list.h"
#include "cpu/linear_cpu.h"
#include "fastinfer/qlinear.h"

namespace fastinfer::cpu {

struct QLinearKernels {
  // Every row of x to int8 per 32-block: qa (m, k), da and as (m, k / 32): scale, scale * sum.
  void (*quantize)(const QLinearParams& p, int8_t* qa, float* da, float* as);
  // All m rows of out for one 64-output panel, from the quantised activations.
  void (*panel)(const QLinearParams& p, int64_t panel, const int8_t* qa, const float* da, const float* as);
  // One panel's weights into the float linear's packed layout of p.dtype (64 * k elements).
  void (*dequantize)(const QLinearParams& p, int64_t panel, void* dst);
};

#define FI_ISA_DECLARE(suffix, ...) QLinearKernels qlinear_kernels_##suffix();
FI_CPU_ISAS(FI_ISA_DECLARE)
#undef FI_ISA_DECLARE

// The float linear's tile kernel of the active level (linear_dispatch.cpp).
LinearTileFn active_linear_tile();

}  // namespace fastinfer::cpu
