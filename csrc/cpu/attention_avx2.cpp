// Tile kernel built for the avx2 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx2
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
TileFn tile_kernel_avx2() { return &avx2::tile_entry; }
}  // namespace fastinfer::cpu
