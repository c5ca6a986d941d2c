// Per-ISA entry points (tile_entry, stage_kv): each attention_<isa>.cpp defines
// FI_ISA_NS, is compiled with that level's flags and includes this header once.
#pragma once
#include "cpu/tile_amx.h"
#include "cpu/tile_decode.h"
#include "cpu/tile_rows.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

// See StageFn: bf16 rows + value pairs where the tile kernels use vdpbf16ps/AMX, float rows otherwise.
void stage_kv(const AttentionParams& p, int b, int hk, void* k_dst, void* v_dst) {
  const int D = p.head_dim, nkeys = p.k_len(b), dt = static_cast<int>(p.dtype);
  TileJob whole{};
  whole.b = b;
  whole.kv_head = hk;
  whole.kv_begin = 0;
  whole.kv_end = nkeys;
  KeyTiles tiles(p, whole);
  for (int j0 = 0; j0 < staged_rows(nkeys); j0 += kBlockN) {  // past nkeys KeyTiles yields zero rows
    const void* const* kr;
    const void* const* vr;
    tiles.start(j0, &kr, &vr);
#if defined(__AVX512BF16__)
    if (p.dtype == DType::kBFloat16) {
      uint16_t* kt = static_cast<uint16_t*>(k_dst) + static_cast<int64_t>(j0) * D;
      for (int jj = 0; jj < kBlockN; ++jj) copy_row(kt + jj * D, kr[jj], 2 * D);
      pack_v_bf16(vr, kBlockN, D, static_cast<uint32_t*>(v_dst) + static_cast<int64_t>(j0 / 2) * D);
      continue;
    }
#endif
    float* kt = static_cast<float*>(k_dst) + static_cast<int64_t>(j0) * D;
    float* vt = static_cast<float*>(v_dst) + static_cast<int64_t>(j0) * D;
    for (int jj = 0; jj < kBlockN; ++jj) {
      const int from = j0 + jj < nkeys ? dt : 0;  // kZeroRow past the end is float zeros
      row_to_f32(kr[jj], from, kt + jj * D, D);
      row_to_f32(vr[jj], from, vt + jj * D, D);
    }
  }
}

void tile_entry(const AttentionParams& p, const TileJob& job, float* scratch) {
  if (job.rows_per_tile == kFewRows) {
#if defined(__AVX512BF16__)
    if (p.dtype == DType::kBFloat16 && p.head_dim % 32 == 0) return run_few_rows_bf16(p, job, scratch);
#endif
    return run_few_rows(p, job, scratch);
  }
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (p.dtype == DType::kBFloat16 && p.head_dim % 32 == 0) {
    if (job.rows_per_tile == 32) return run_tile_amx<2>(p, job, scratch);
    return run_tile_amx<1>(p, job, scratch);
  }
#endif
#if defined(__AVX512BF16__)
  if (p.dtype == DType::kBFloat16) {
    if (job.rows_per_tile == 32) return run_tile<2, true>(p, job, scratch);
    return run_tile<1, true>(p, job, scratch);
  }
#endif
  if (job.rows_per_tile == 32) return run_tile<2, false>(p, job, scratch);
  return run_tile<1, false>(p, job, scratch);
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS

namespace fastinfer::cpu {
// This level's kernels (kernels_<suffix>, declared in attention_cpu.h); bf16 levels stage bf16 as bf16.
IsaKernels FI_ISA_CAT(kernels_, FI_ISA_NS)() {
#if defined(__AVX512BF16__)
  return {&FI_ISA_NS::tile_entry, &FI_ISA_NS::stage_kv, true};
#else
  return {&FI_ISA_NS::tile_entry, &FI_ISA_NS::stage_kv, false};
#endif
}
}  // namespace fastinfer::cpu
