// Tile kernel built for the avx512bf16 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx512bf16
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
IsaKernels kernels_avx512bf16() { return {&avx512bf16::tile_entry, &avx512bf16::stage_kv, true}; }
}  // namespace fastinfer::cpu
