// Tile kernel built for the avx512bf16 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx512bf16
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
TileFn tile_kernel_avx512bf16() { return &avx512bf16::tile_entry; }
}  // namespace fastinfer::cpu
