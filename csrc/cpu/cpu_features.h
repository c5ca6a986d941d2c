// Run-time choice of the CPU SIMD level (wheels are built without -march=native); the levels
// are the rows of isa_list.h.
#pragma once
#include "cpu/isa_list.h"
#include "fastinfer/cpu.h"  // set_isa, active_isa_name, best_isa_name

namespace fastinfer::cpu {

#define FI_ISA_ENUM(suffix, Enum, ...) Enum,
enum class Isa : int { FI_CPU_ISAS(FI_ISA_ENUM) };
#undef FI_ISA_ENUM

const char* isa_name(Isa isa);
// Best level this CPU supports and this build contains.
Isa best_isa();
// Level used by the kernels: best_isa() unless forced by FASTINFER_CPU_ISA or set_isa().
Isa active_isa();

// The kernels of the active level from a family's table (one getter per level, null where the
// level has none of its own): a level without them runs the next level below's.
template <class Getter, int N>
Getter pick_isa(Getter const (&table)[N]) {
  int i = static_cast<int>(active_isa());
  while (i > 0 && !table[i]) --i;
  return table[i];
}

}  // namespace fastinfer::cpu
