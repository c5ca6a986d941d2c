// Interface between the ISA-independent driver of the quantised CPU linear (qlinear_dispatch.cpp)
// and its per-ISA kernels (qlinear_kernel.h, compiled inside each linear_<isa>.cpp).
#pragma once
#include "cpu/isa_list.h"
#include "cpu/linear_cpu.h"
#include "fastinfer/qlinear.h"

namespace fastinfer::cpu {

struct QLinearKernels {
  // Every row of x to int8 per 32-block: qa (m, k), da and as (m, k / 32): scale, scale * sum; hs
  // (m, k / 32, 2): the integer sums of each block's two halves of 16.
  void (*quantize)(const QLinearParams& p, int8_t* qa, float* da, float* as, int32_t* hs);
  // All m rows of out for the outputs of sub-panels sub0 .. sub0 + subs - 1 (8 each; sub-panels are
  // contiguous across panels), from the quantised activations.
  void (*panel)(const QLinearParams& p, int64_t sub0, int64_t subs, const int8_t* qa, const float* da, const float* as,
                const int32_t* hs);
  // Rows ids of a packed (n, k) weight as float32 (count, k) (qlinear_rows, fastinfer/cpu.h).
  void (*rows)(QType t, int64_t k, const void* packed, const int64_t* ids, int64_t count, float* out);
  // QActivations::kFloat: all m rows of out for sub-panels sub0 .. sub0 + subs - 1; xf: x as float32 (m, k)
  // where the level does not read x as it is (see float_reads_bf16), else null; prep: what float_prep made
  // of x for this call (null where float_prep_bytes is 0); scratch: qfloat_scratch_floats(k) floats.
  void (*float_panel)(const QLinearParams& p, int64_t sub0, int64_t subs, const float* xf, const void* prep,
                      float* scratch);
  bool float_reads_bf16;  // the level has bf16 dot products and multiplies bf16 x as it is
  // Bytes of x prepared once per call for float_panel (the AMX level's bf16 parts of x), 0: none; float_prep
  // writes them.
  int64_t (*float_prep_bytes)(const QLinearParams& p);
  void (*float_prep)(const QLinearParams& p, void* prep);
};
// Per-worker scratch of float_panel: a sub-panel dequantised to float32, then its bf16 copy.
inline int64_t qfloat_scratch_floats(int64_t k) { return int64_t(kQRows) * k * 3 / 2 + 16; }

#define FI_ISA_DECLARE(suffix, ...) QLinearKernels qlinear_kernels_##suffix();
FI_CPU_ISAS(FI_ISA_DECLARE)
#undef FI_ISA_DECLARE
}  // namespace fastinfer::cpu
