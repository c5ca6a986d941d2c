// Linear tile kernel built for the avx512bf16 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx512bf16
#include "cpu/linear_kernel.h"

namespace fastinfer::cpu {
LinearTileFn linear_tile_avx512bf16() { return &avx512bf16::linear_tile; }
}  // namespace fastinfer::cpu
