// Linear tile kernel built for the avx512 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx512
#include "cpu/linear_kernel.h"

namespace fastinfer::cpu {
LinearTileFn linear_tile_avx512() { return &avx512::linear_tile; }
}  // namespace fastinfer::cpu
