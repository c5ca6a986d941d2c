// ISA-independent driver of the CPU pointwise ops: rows run inline when the call is small
// (a decode step's rows: waking a worker costs more than the work), else on the thread pool.
#include <algorithm>

#include "cpu/cpu_features.h"
#include "cpu/pointwise_cpu.h"
#include "cpu/scratch.h"
#include "cpu/thread_pool.h"

namespace fastinfer::cpu {

namespace {

constexpr int64_t kInlineElements = int64_t(1) << 14;  // ~5 us of one core; the pool worker spins, so it starts at once

// One getter per level of isa_list.h (null: the level runs the next lower level's; bf16/AMX the AVX-512 ones).
PointwiseKernels pick() {
#define FI_ISA_ROW(suffix, Enum, name, arch, flags, att, bwd, lin, pw, pred) FI_ISA_ENTRY(arch, pw, pointwise_##suffix)
  static constexpr PointwiseKernels (*kTable[])() = {FI_CPU_ISAS(FI_ISA_ROW)};
#undef FI_ISA_ROW
  return pick_isa(kTable)();
}

template <class Fn>
void for_rows(int64_t rows, int64_t elements_per_row, Fn fn) {
  if (rows * elements_per_row <= kInlineElements || rows == 1) {
    for (int64_t i = 0; i < rows; ++i) fn(i);
    return;
  }
  const int64_t per_task = std::max<int64_t>(1, kInlineElements / 4 / std::max<int64_t>(1, elements_per_row));
  parallel_for((rows + per_task - 1) / per_task, [&](int64_t task, int) {
    for (int64_t i = task * per_task; i < std::min(rows, (task + 1) * per_task); ++i) fn(i);
  });
}

struct RowTag;  // tag of this driver's per-thread buffer

float* row_scratch(int64_t floats) { return reinterpret_cast<float*>(thread_scratch<RowTag>(sizeof(float) * floats)); }

}  // namespace

void rms_norm(const RmsNormParams& p) {
  const auto k = pick().rms_norm_row;
  for_rows(p.rows, p.dim, [&](int64_t i) { k(p, i, row_scratch(p.dim)); });
}

void act_mul(const ActMulParams& p) {
  const auto k = pick().act_mul_row;
  for_rows(p.rows, p.dim, [&](int64_t i) { k(p, i); });
}

void rotary(const RotaryParams& p) {
  const auto k = pick().rotary_token;
  for_rows(p.tokens, p.heads * 2 * p.half, [&](int64_t i) { k(p, i); });
}

}  // namespace fastinfer::cpu
