// Tile kernel built for the scalar level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS scalar
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
TileFn tile_kernel_scalar() { return &scalar::tile_entry; }
}  // namespace fastinfer::cpu
