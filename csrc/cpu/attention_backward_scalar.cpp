// Backward tile kernels built for the scalar level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS scalar
#include "cpu/backward_kernel.h"

namespace fastinfer::cpu {
BackwardKernels backward_kernels_scalar() { return {&scalar::dkdv_entry, &scalar::dq_entry}; }
}  // namespace fastinfer::cpu
