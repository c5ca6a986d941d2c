// Tile kernel built for the amx level (AVX-512 BF16 + AMX-BF16; flags in CMakeLists.txt).
#define FI_ISA_NS amx
#include "cpu/attention_kernel.h"

namespace fastinfer::cpu {
IsaKernels kernels_amx() { return {&amx::tile_entry, &amx::stage_kv, true}; }
}  // namespace fastinfer::cpu
