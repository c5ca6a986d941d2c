// CPU emulation: kernel launches and the PTX-level operations of cuda_utils.cuh.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

namespace fastinfer::emu {

// Checks the launch contract (grid and block limits, dynamic shared memory against the target's
// opt-in limit and the kernel's opt-in), then runs every block of the grid in turn; each block's
// threads are fibers scheduled cooperatively, switching at barriers and warp-collective operations.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A... args) {
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, [&] { kernel(args...); });
}
template <class K>
struct Launcher {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A... args) const { launch(kernel, grid, block, smem, args...); }
};
template <class K>
Launcher<K> make_launcher(K kernel, dim3 grid, dim3 block, size_t smem) { return Launcher<K>{kernel, grid, block, smem}; }

// PTX semantics (sm_80): cp.async groups complete only at wait_group; ldmatrix and mma are warp
// collectives whose fragments follow the PTX ISA layouts. Each checks its operands (alignment,
// shared-memory bounds, all 32 lanes present) and aborts with a message on a violation.
void cp_async_16(uint32_t smem_dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending_allowed);
void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr, bool trans);
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void check_aligned(const void* p, int bytes, const char* what);

}  // namespace fastinfer::emu
