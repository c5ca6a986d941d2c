// Interface between the ISA-independent CPU attention backward driver
// (attention_backward.cpp) and its per-ISA tile kernels (attention_backward_<isa>.cpp,
// all built from backward_kernel.h).
//
// Two passes, each output element written by exactly one task in a fixed order, so the
// CPU backward is always bitwise reproducible (any thread count, any schedule):
//   1. dK/dV: one task per (sequence, kv head, tile of kBwdKeys keys); it visits every
//      query row of the GQA group that can see those keys, so dK/dV are summed over the
//      query heads of the group without atomics;
//   2. dQ:    one task per (sequence, kv head, tile of up to kBwdRows GQA-packed rows).
// Both recompute P = exp2(S*log2e - lse2) from the saved log-sum-exp and
// dS = P * (dP - delta) with delta = rowsum(dO * O) (computed once by the driver).
#pragma once
#include "cpu/attention_cpu.h"
#include "fastinfer/attention_backward.h"

namespace fastinfer::cpu {

constexpr int kBwdKeys = 64;  // keys per dK/dV task (and per key tile of the dQ pass)
constexpr int kBwdRows = 32;  // query rows per tile (two 16-lane vectors)

// One task. Rows of (b, kv_head) are GQA-packed as in the forward: row r is query
// position r / group of head kv_head * group + r % group.
struct BwdTask {
  int b, kv_head;
  int begin, end;       // dK/dV pass: keys [begin, end); dQ pass: rows [begin, end)
  const float* lse2;    // per packed row of (b, kv_head): log-sum-exp in log2 units, +inf = no key
  const float* delta;   // per packed row: rowsum(dO * O)
};

// Per-worker scratch, in floats (head dims padded to a multiple of 16).
struct BwdScratchLayout {
  static constexpr int kRowT = kMaxHeadDim * kBwdRows;   // Q^T, dO^T: (Dp x R)
  static constexpr int kRow = kBwdRows * kMaxHeadDim;    // Q, dO rows; dQ accumulator: (R x Dp)
  static constexpr int kKey = kBwdKeys * kMaxHeadDim;    // K, V rows; dK, dV accumulators: (N x Dp)
  static constexpr int kScore = kBwdKeys * kBwdRows;     // S^T/P^T, dP^T/dS^T: (N x R)
  static constexpr int kRowInfo = 4 * kBwdRows;          // lse2, delta, position, ALiBi slope
  static constexpr int kTotal = 2 * kRowT + 3 * kRow + 4 * kKey + 2 * kScore + kRowInfo;
};

using BwdFn = void (*)(const AttentionBackwardParams& p, const BwdTask& task, float* scratch);
struct BackwardKernels {
  BwdFn dkdv;  // pass 1
  BwdFn dq;    // pass 2
};

// backward_kernels_<suffix>() of every level of isa_list.h (defined where it has its own kernels).
#define FI_ISA_DECLARE(suffix, ...) BackwardKernels backward_kernels_##suffix();
FI_CPU_ISAS(FI_ISA_DECLARE)
#undef FI_ISA_DECLARE

}  // namespace fastinfer::cpu
