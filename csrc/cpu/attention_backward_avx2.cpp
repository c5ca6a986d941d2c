// Backward tile kernels built for the avx2 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx2
#include "cpu/backward_kernel.h"

namespace fastinfer::cpu {
BackwardKernels backward_kernels_avx2() { return {&avx2::dkdv_entry, &avx2::dq_entry}; }
}  // namespace fastinfer::cpu
