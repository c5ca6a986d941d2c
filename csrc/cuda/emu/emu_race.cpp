// Shared-memory race checker of the CUDA emulator (the "race" build of emu_build.sh).
//
// The kernel sources are compiled with GCC's -fsanitize=thread instrumentation but linked without
// its runtime: every load and store of the instrumented code calls a __tsan_readN / __tsan_writeN
// hook, defined below. Accesses to the block's shared memory are checked against a shadow of each
// byte: its last writer, up to two readers since then, and a cp.async copy still in flight. Two
// accesses by different threads conflict unless a __syncthreads (or, within one warp, a __syncwarp)
// completed between them, whatever order the emulator's scheduler happened to run them in, so a
// missing barrier is reported even when this schedule gives the right numbers. A cp.async copy
// counts as a write by its thread that lands at the thread's cp.async.wait_group; any access to
// its destination before then is a race, the issuing thread's own included. The operations that
// emu.cpp emulates (ldmatrix, cp.async) report their accesses explicitly.
//
// Built without FI_EMU_RACE (the ASan build), every entry point is a no-op: the two instrumentations
// cannot share a build.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "emu_internal.h"

namespace fastinfer::emu {

std::string symbolize(const void* pc);

namespace race {

#if FI_EMU_RACE
namespace {

// One access: thread, the barrier interval (global count of completed block barriers) and the
// thread's warp's __syncwarp count at the time, and where in the code. epoch 0: none.
struct Acc {
  uint64_t epoch = 0;
  uint64_t wepoch = 0;
  const void* pc = nullptr;
  int tid = -1;
};

struct Shadow {
  Acc w;                   // last write
  Acc r[2];                // reads since that write (two distinct threads are enough to convict any writer)
  Acc inflight;            // cp.async issued and not yet landed ...
  uint64_t inflight_blk = 0;  // ... in this block (serial number)
};

std::vector<Shadow> g_shadow;
std::vector<uint64_t> g_wepoch;
uint64_t g_epoch = 0, g_wcounter = 0, g_block_serial = 0;
int g_nthreads = 0;

struct Key {
  int kind;
  const void* a;
  const void* b;
  bool operator<(const Key& o) const { return std::tie(kind, a, b) < std::tie(o.kind, o.a, o.b); }
};
std::set<Key> g_seen;
long g_reports = 0;
constexpr int kPrintLimit = 20;

enum Kind { kRAW, kWAR, kWAW, kInflight };
const char* kind_name(int k) {
  switch (k) {
    case kRAW: return "read-after-write";
    case kWAR: return "write-after-read";
    case kWAW: return "write-after-write";
    default: return "access to a cp.async destination still in flight";
  }
}

// prev happens before an access by `tid` now: a block barrier completed since, or it is the same
// thread (program order), or a __syncwarp of their common warp completed since.
bool ordered(const Acc& prev, int tid) {
  if (prev.epoch != g_epoch) return true;
  if (prev.tid == tid) return true;
  return prev.tid / 32 == tid / 32 && prev.wepoch != g_wepoch[tid / 32];
}

void report(int kind, uint32_t off, const Acc& prev, int tid, const void* pc, bool now_write) {
  ++g_reports;
  if (!g_seen.insert(Key{kind, prev.pc, pc}).second || static_cast<int>(g_seen.size()) > kPrintLimit) return;
  std::fprintf(stderr,
               "\n[cuda-emu race] %s on shared-memory byte %u in block %s:\n"
               "  thread %d (warp %d) %s at %s\n"
               "  thread %d (warp %d) %s at %s\n"
               "  with no barrier between them\n",
               kind_name(kind), off, current_block_str().c_str(), tid, tid / 32, now_write ? "writes" : "reads",
               symbolize(pc).c_str(), prev.tid, prev.tid / 32,
               kind == kInflight ? "issued the cp.async" : (kind == kWAR ? "read it" : "wrote it"),
               symbolize(prev.pc).c_str());
}

Acc make(int tid, const void* pc) {
  Acc a;
  a.epoch = g_epoch;
  a.wepoch = g_wepoch[tid / 32];
  a.pc = pc;
  a.tid = tid;
  return a;
}

void check_write(Shadow& s, uint32_t off, int tid, const void* pc) {
  if (s.inflight_blk == g_block_serial) report(kInflight, off, s.inflight, tid, pc, true);
  else if (s.w.epoch && !ordered(s.w, tid)) report(kWAW, off, s.w, tid, pc, true);
  for (const Acc& r : s.r)
    if (r.epoch && !ordered(r, tid)) {
      report(kWAR, off, r, tid, pc, true);
      break;
    }
}

void note_read(Shadow& s, const Acc& a) {
  if (s.r[0].epoch != a.epoch || s.r[0].tid == a.tid) {  // stale (an earlier interval) or the same thread again
    if (s.r[0].epoch != a.epoch) s.r[1] = Acc{};
    s.r[0] = a;
  } else if (s.r[1].epoch != a.epoch || s.r[1].tid == a.tid) {
    s.r[1] = a;
  }
}

}  // namespace

bool enabled() { return true; }

void block_start(int nthreads) {
  if (g_shadow.empty()) g_shadow.resize(fastinfer::cuda::detail::kEmuSmemBytes);
  ++g_epoch;
  ++g_block_serial;
  g_nthreads = nthreads;
  g_wepoch.assign((nthreads + 31) / 32, 0);
  for (auto& w : g_wepoch) w = ++g_wcounter;
}

void barrier() { ++g_epoch; }
void warp_barrier(int w) { g_wepoch[w] = ++g_wcounter; }

void access(int tid, uint32_t off, int n, bool write, const void* pc) {
  if (off + static_cast<uint64_t>(n) > g_shadow.size()) return;  // bounds are emu.cpp's and ASan's business
  const Acc a = make(tid, pc);
  for (int i = 0; i < n; ++i) {
    Shadow& s = g_shadow[off + i];
    if (write) {
      check_write(s, off + i, tid, pc);
      s.w = a;
      s.r[0] = s.r[1] = Acc{};
    } else {
      if (s.inflight_blk == g_block_serial) report(kInflight, off + i, s.inflight, tid, pc, false);
      else if (s.w.epoch && !ordered(s.w, tid)) report(kRAW, off + i, s.w, tid, pc, false);
      note_read(s, a);
    }
  }
}

void async_issue(int tid, uint32_t off, int n, const void* pc) {
  const Acc a = make(tid, pc);
  for (int i = 0; i < n; ++i) {
    Shadow& s = g_shadow[off + i];
    check_write(s, off + i, tid, pc);
    s.inflight = a;
    s.inflight_blk = g_block_serial;
    s.r[0] = s.r[1] = Acc{};
  }
}

void async_land(int tid, uint32_t off, int n, const void* pc) {
  const Acc a = make(tid, pc);
  for (int i = 0; i < n; ++i) {
    Shadow& s = g_shadow[off + i];
    s.inflight_blk = 0;
    s.w = a;
    s.r[0] = s.r[1] = Acc{};
  }
}

void launch_end(const char* kernel) {
  if (g_reports == 0) return;
  const long n = g_reports;
  g_reports = 0;
  fail(std::to_string(n) + " shared-memory race(s) (" + std::to_string(g_seen.size()) +
       " distinct pairs of code locations, listed above) in a launch of " + kernel);
}

#else   // !FI_EMU_RACE
bool enabled() { return false; }
void block_start(int) {}
void barrier() {}
void warp_barrier(int) {}
void access(int, uint32_t, int, bool, const void*) {}
void async_issue(int, uint32_t, int, const void*) {}
void async_land(int, uint32_t, int, const void*) {}
void launch_end(const char*) {}
#endif  // FI_EMU_RACE

}  // namespace race
}  // namespace fastinfer::emu

#if FI_EMU_RACE
// ------------------------------------------------------------------ -fsanitize=thread hooks
// GCC calls these for every memory access of the instrumented translation units (the kernel sources).
// Only accesses to the dynamic shared memory of the running block are checked; the rest return at once.
namespace {
inline void hook(const void* p, int n, bool write, const void* pc) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = fastinfer::cuda::detail::smem_raw;
  if (c < base || c >= base + fastinfer::cuda::detail::kEmuSmemBytes) return;
  const int tid = fastinfer::emu::current_thread();
  if (tid < 0) return;
  // pc - 1: inside the call instruction, so that addr2line names the access's own line.
  fastinfer::emu::race::access(tid, static_cast<uint32_t>(c - base), n, write,
                               static_cast<const char*>(pc) - 1);
}
template <class T>
T atomic_rmw(volatile T* a, T v, int op) {
  switch (op) {
    case 0: return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
    case 1: return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);
    case 2: return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);
    case 3: return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);
    case 4: return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);
    case 5: return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);
    default: return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);
  }
}
}  // namespace

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* p, unsigned long n) { hook(p, static_cast<int>(n), false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { hook(p, static_cast<int>(n), true, __builtin_return_address(0)); }
#define FI_TSAN_ACCESS(N)                                                                                     \
  void __tsan_read##N(void* p) { hook(p, N, false, __builtin_return_address(0)); }                           \
  void __tsan_write##N(void* p) { hook(p, N, true, __builtin_return_address(0)); }                           \
  void __tsan_unaligned_read##N(void* p) { hook(p, N, false, __builtin_return_address(0)); }                 \
  void __tsan_unaligned_write##N(void* p) { hook(p, N, true, __builtin_return_address(0)); }                 \
  void __tsan_volatile_read##N(void* p) { hook(p, N, false, __builtin_return_address(0)); }                  \
  void __tsan_volatile_write##N(void* p) { hook(p, N, true, __builtin_return_address(0)); }                  \
  void __tsan_unaligned_volatile_read##N(void* p) { hook(p, N, false, __builtin_return_address(0)); }        \
  void __tsan_unaligned_volatile_write##N(void* p) { hook(p, N, true, __builtin_return_address(0)); }
FI_TSAN_ACCESS(1)
FI_TSAN_ACCESS(2)
FI_TSAN_ACCESS(4)
FI_TSAN_ACCESS(8)
FI_TSAN_ACCESS(16)
#undef FI_TSAN_ACCESS

// Atomics of the host code in the instrumented units (static-local guards, std::mutex-free caches):
// performed as sequentially consistent atomics. The kernels use none.
#define FI_TSAN_ATOMIC(N, T)                                                                                   \
  T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }       \
  void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }       \
  T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) { return atomic_rmw(a, v, 0); }                    \
  T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) { return atomic_rmw(a, v, 1); }                    \
  T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) { return atomic_rmw(a, v, 2); }                    \
  T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) { return atomic_rmw(a, v, 3); }                     \
  T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) { return atomic_rmw(a, v, 4); }                    \
  T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) { return atomic_rmw(a, v, 5); }                   \
  T __tsan_atomic##N##_exchange(volatile T* a, T v, int) { return atomic_rmw(a, v, 6); }                     \
  int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                       \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                         \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                          \
  T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                             \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
    return c;                                                                                                \
  }
FI_TSAN_ATOMIC(8, unsigned char)
FI_TSAN_ATOMIC(16, unsigned short)
FI_TSAN_ATOMIC(32, unsigned int)
FI_TSAN_ATOMIC(64, unsigned long long)
#undef FI_TSAN_ATOMIC
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}  // extern "C"
#endif  // FI_EMU_RACE
