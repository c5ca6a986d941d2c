// Linear tile kernel built for the scalar level (flags set per file in CMakeLists.txt).
#define FI_ISA_NS scalar
#include "cpu/linear_kernel.h"

namespace fastinfer::cpu {
LinearTileFn linear_tile_scalar() { return &scalar::linear_tile; }
}  // namespace fastinfer::cpu
