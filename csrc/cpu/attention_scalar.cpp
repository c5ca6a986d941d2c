// Tile kernel built for the scalar level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS scalar
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
IsaKernels kernels_scalar() { return {&scalar::tile_entry, &scalar::stage_kv, false}; }
}  // namespace fastinfer::cpu
