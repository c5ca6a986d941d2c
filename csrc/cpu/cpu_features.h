// Run-time choice of the CPU SIMD level (wheels are built without -march=native).
#pragma once
#include "fastinfer/cpu.h"  // set_isa, active_isa_name, best_isa_name

namespace fastinfer::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

const char* isa_name(Isa isa);
// Best level this CPU supports and this build contains.
Isa best_isa();
// Level used by the kernels: best_isa() unless forced by FASTINFER_CPU_ISA or set_isa().
Isa active_isa();

}  // namespace fastinfer::cpu
