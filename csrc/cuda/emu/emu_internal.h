// Interface between the emulator's scheduler (emu.cpp) and its race checker (emu_race.cpp).
// Not seen by the kernel sources.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace fastinfer::cuda::detail {
constexpr size_t kEmuSmemBytes = 232448;  // the largest opt-in limit of any target (sm_90: 227 KB)
extern unsigned char smem_raw[kEmuSmemBytes];
}  // namespace fastinfer::cuda::detail

namespace fastinfer::emu {

[[noreturn]] void fail(const std::string& msg);

// The running CUDA thread: its linear index in the block (-1 outside a kernel) and the block's index.
int current_thread();
std::string current_block_str();

// Shared-memory race checker (the race build: emu_race.cpp with FI_EMU_RACE=1; otherwise every call is a
// no-op). Offsets are bytes from the start of the block's dynamic shared memory; pc is the code address
// that made the access (symbolised in reports).
namespace race {
bool enabled();
void block_start(int nthreads);
void barrier();            // every thread of the block passed a __syncthreads
void warp_barrier(int w);  // every lane of warp w passed a __syncwarp
void access(int tid, uint32_t off, int n, bool write, const void* pc);
void async_issue(int tid, uint32_t off, int n, const void* pc);  // cp.async issued: in flight until it lands
void async_land(int tid, uint32_t off, int n, const void* pc);   // ... landed at this thread's wait_group
// Called at the end of each launch: aborts with a summary when any race was reported.
void launch_end(const char* kernel);
}  // namespace race

}  // namespace fastinfer::emu
