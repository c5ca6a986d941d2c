// Pointwise row kernels built for the scalar level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS scalar
#include "cpu/pointwise_kernel.h"

namespace fastinfer::cpu {
PointwiseKernels pointwise_scalar() { return {&scalar::rms_norm_row, &scalar::act_mul_row, &scalar::rotary_token}; }
}  // namespace fastinfer::cpu
