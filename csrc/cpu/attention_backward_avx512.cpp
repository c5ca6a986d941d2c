// Backward tile kernels built for the avx512 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx512
#include "cpu/backward_kernel.h"

namespace fastinfer::cpu {
BackwardKernels backward_kernels_avx512() { return {&avx512::dkdv_entry, &avx512::dq_entry}; }
}  // namespace fastinfer::cpu
