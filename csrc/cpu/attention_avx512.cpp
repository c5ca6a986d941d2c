// Tile kernel built for the avx512 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx512
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
IsaKernels kernels_avx512() { return {&avx512::tile_entry, &avx512::stage_kv, false}; }
}  // namespace fastinfer::cpu
