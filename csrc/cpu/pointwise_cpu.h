// Interface between the CPU pointwise driver (pointwise_dispatch.cpp) and the per-ISA row
// kernels (pointwise_<isa>.cpp, built from pointwise_kernel.h).
#pragma once
#include "fastinfer/cpu.h"

namespace fastinfer::cpu {

struct PointwiseKernels {
  void (*rms_norm_row)(const RmsNormParams& p, int64_t row, float* scratch);  // scratch: dim floats
  void (*act_mul_row)(const ActMulParams& p, int64_t row);
  void (*rotary_token)(const RotaryParams& p, int64_t token);
};

PointwiseKernels pointwise_scalar();
PointwiseKernels pointwise_avx2();
PointwiseKernels pointwise_avx512();

}  // namespace fastinfer::cpu
