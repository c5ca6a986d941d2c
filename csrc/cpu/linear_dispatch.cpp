// ISA-independent driver of the CPU linear: cuts y = x W^T into (weight panel, row chunk)
// tasks, runs them on the thread pool, and packs weights into the panel layout.
#include <algorithm>

#include "cpu/cpu_features.h"
#include "cpu/linear_cpu.h"
#include "cpu/scratch.h"
#include "cpu/thread_pool.h"

namespace fastinfer::cpu {

namespace {

// Below this many multiply-adds a call runs on the calling thread: waking a worker costs more.
constexpr int64_t kInlineMacs = int64_t(1) << 17;
// Rows per task once rows are split: 8 tiles of 6 rows keep a panel hot in L1/L2 across them.
constexpr int64_t kRowChunk = 48;
constexpr int64_t kTileRows = 6;  // rows a tile kernel keeps in registers at most

// One getter per level of isa_list.h (null: the level runs the next lower level's tile). AMX's float tile is the
// bf16 level's code; the level has its own unit for the quantised linear's AMX-INT8 kernel (qlinear_amx.h).
LinearTileFn pick_tile() {
#define FI_ISA_ROW(suffix, Enum, name, arch, flags, att, bwd, lin, pw, pred) FI_ISA_ENTRY(arch, lin, linear_tile_##suffix)
  static constexpr LinearTileFn (*kTable[])() = {FI_CPU_ISAS(FI_ISA_ROW)};
#undef FI_ISA_ROW
  return pick_isa(kTable)();
}

struct LinearScratch;  // tag of this driver's per-thread buffer

float* worker_scratch(int64_t floats) {
  return reinterpret_cast<float*>(thread_scratch<LinearScratch>(sizeof(float) * floats));
}

}  // namespace

void linear_forward(const LinearParams& p) {
  if (p.m == 0 || p.n == 0) return;
  const LinearTileFn tile = pick_tile();
  const int64_t panels = linear_panels(p.n), scratch = linear_scratch_floats(p.k);
  const int threads = num_threads();
  // Decode batches read each panel once: all rows in one task. With more rows, or too few
  // panels to keep every thread busy, rows are split too (in whole 6-row tiles), panel-major,
  // so a thread's consecutive tasks reuse the panel from cache.
  // Chunks of equal size (whole tiles), so no thread is left waiting on one long last task.
  int64_t chunks = (p.m + kRowChunk - 1) / kRowChunk;
  auto even_rows = [&](int64_t c) { return std::max(kTileRows, ((p.m + c - 1) / c + kTileRows - 1) / kTileRows * kTileRows); };
  while (even_rows(chunks) > kTileRows && panels * chunks < 8 * threads) ++chunks;
  int64_t rows = even_rows(chunks);
  if (p.m <= 2 * kRowChunk && panels >= 8 * threads) rows = p.m;
  chunks = (p.m + rows - 1) / rows;
  const bool inline_call = p.m * p.n * p.k < kInlineMacs || threads == 1;
  // Tasks are taken in order, so a worker's next panel is about `threads` further on.
  const int64_t stride = inline_call ? 1 : threads;
  auto run = [&](int64_t task, int) {
    const int64_t panel = task / chunks, row0 = task % chunks * rows;
    const int64_t next = chunks == 1 && panel + stride < panels ? panel + stride : -1;
    tile(p, panel, row0, std::min(p.m, row0 + rows), next, worker_scratch(scratch));
  };
  if (inline_call) {
    for (int64_t t = 0; t < panels * chunks; ++t) run(t, 0);
    return;
  }
  parallel_for(panels * chunks, run);
}

void linear_pack(const LinearPackParams& p) {
  const int64_t panels = linear_panels(p.n), packed_k = linear_packed_k(p.k, p.dtype);
  parallel_for(panels, [&](int64_t panel, int) {
    for (int c = 0; c < kLinearPanel; ++c) {
      const int64_t row = panel * kLinearPanel + c;
      const bool real = row < p.n;  // rows past n pad the last panel with zeros
      if (p.dtype == DType::kFloat32) {
        float* dst = static_cast<float*>(p.packed) + panel * kLinearPanel * packed_k + c;
        const float* src = real ? static_cast<const float*>(p.w) + row * p.w_row_stride : nullptr;
        for (int64_t k = 0; k < packed_k; ++k) dst[k * kLinearPanel] = real ? src[k] : 0.f;
      } else {
        uint16_t* dst = static_cast<uint16_t*>(p.packed) + panel * kLinearPanel * packed_k + 2 * c;
        const uint16_t* src = real ? static_cast<const uint16_t*>(p.w) + row * p.w_row_stride : nullptr;
        for (int64_t k = 0; k < packed_k; ++k)
          dst[k / 2 * 2 * kLinearPanel + (k & 1)] = real && k < p.k ? src[k] : uint16_t(0);
      }
    }
  });
}

}  // namespace fastinfer::cpu
