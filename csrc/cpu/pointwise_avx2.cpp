// Pointwise row kernels built for the avx2 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx2
#include "cpu/pointwise_kernel.h"

namespace fastinfer::cpu {
PointwiseKernels pointwise_avx2() { return {&avx2::rms_norm_row, &avx2::act_mul_row, &avx2::rotary_token}; }
}  // namespace fastinfer::cpu
