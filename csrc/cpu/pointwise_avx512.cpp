// Pointwise row kernels built for the avx512 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx512
#include "cpu/pointwise_kernel.h"

namespace fastinfer::cpu {
PointwiseKernels pointwise_avx512() { return {&avx512::rms_norm_row, &avx512::act_mul_row, &avx512::rotary_token}; }
}  // namespace fastinfer::cpu
