// Linear tile kernel built for the avx2 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx2
#include "cpu/linear_kernel.h"

namespace fastinfer::cpu {
LinearTileFn linear_tile_avx2() { return &avx2::linear_tile; }
}  // namespace fastinfer::cpu
