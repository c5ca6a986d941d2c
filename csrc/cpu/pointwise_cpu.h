// Interface between the CPU pointwise driver (pointwise_dispatch.cpp) and the per-ISA row
// kernels (pointwise_<isa>.cpp, built from pointwise_kernel.h).
#pragma once
#include "cpu/isa_list.h"
#include "fastinfer/cpu.h"

namespace fastinfer::cpu {

struct PointwiseKernels {
  void (*rms_norm_row)(const RmsNormParams& p, int64_t row, float* scratch);  // scratch: dim floats
  void (*act_mul_row)(const ActMulParams& p, int64_t row);
  void (*rotary_token)(const RotaryParams& p, int64_t token);
};

// pointwise_<suffix>() of every level of isa_list.h (defined where it has its own kernels).
#define FI_ISA_DECLARE(suffix, ...) PointwiseKernels pointwise_##suffix();
FI_CPU_ISAS(FI_ISA_DECLARE)
#undef FI_ISA_DECLARE

}  // namespace fastinfer::cpu
