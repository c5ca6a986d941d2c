// Tile kernel built for the avx2 level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS avx2
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
IsaKernels kernels_avx2() { return {&avx2::tile_entry, &avx2::stage_kv, false}; }
}  // namespace fastinfer::cpu
