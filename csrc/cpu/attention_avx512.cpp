// Tile kernel built for the avx512 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx512
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
TileFn tile_kernel_avx512() { return &avx512::tile_entry; }
}  // namespace fastinfer::cpu
