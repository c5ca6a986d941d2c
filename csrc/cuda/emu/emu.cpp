// A small CUDA emulator for checking fastinfer's kernels on a machine without a GPU.
//
// The kernel sources are compiled unchanged as host C++ (FASTINFER_CUDA_EMULATE swaps the PTX
// wrappers of cuda_utils.cuh for the functions below). Each CUDA thread of a block is a fiber
// (ucontext); fibers run until __syncthreads or a warp-collective operation (ldmatrix, mma,
// shuffle), where they wait for the other participants. Blocks run one after another.
// What it checks beyond the numbers: barriers that not every thread reaches (deadlock report),
// warp collectives not executed by all 32 lanes in step, shared-memory accesses out of the
// block's dynamic allocation (explicitly in the emulated operations, and with AddressSanitizer
// poisoning for plain loads/stores), misaligned cp.async / ldmatrix / vector accesses, and
// cp.async data used before its group was waited for (the copy lands only at cp.async.wait_group,
// shared memory starts filled with 0xFF = NaN).
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <new>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FI_ASAN 1
#endif

namespace fastinfer::cuda::detail {
// The kernels' `extern __shared__ unsigned char smem_raw[]` (block-scope extern in this namespace).
constexpr size_t kEmuSmemBytes = 232448;
alignas(128) unsigned char smem_raw[kEmuSmemBytes];
}  // namespace fastinfer::cuda::detail

namespace fastinfer::emu {
namespace {

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "\n[cuda-emu] ERROR: %s\n", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

constexpr size_t kStackBytes = 1 << 19;

struct Copy {
  uint32_t dst;
  unsigned char data[16];
};

enum class Wait { kNone, kBlock, kWarp };

}  // namespace

struct ThreadState {
  uint3 tid{};
  ucontext_t ctx{};  // first entry only; later switches use _setjmp/_longjmp (no signal-mask syscalls)
  jmp_buf jb;
  bool started = false;
  char* stack = nullptr;
  Wait wait = Wait::kNone;
  uint64_t wait_gen = 0;
  bool done = false;
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> groups;
};

namespace {

struct WarpState {
  int arrived = 0;
  uint64_t gen = 0;
  int op[32];
  uint32_t addr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float f[32];
};

struct Block {
  std::vector<ThreadState> threads;
  std::vector<WarpState> warps;
  int nthreads = 0;
  int arrived = 0;
  uint64_t gen = 0;
  uint3 bidx{};
  dim3 bdim, gdim;
  size_t smem_bytes = 0;
  ucontext_t sched{};
  jmp_buf sched_jb;
  int cur = -1;
  const std::function<void()>* body = nullptr;
};

Block* g_block = nullptr;

ThreadState& me() {
  if (!g_block || g_block->cur < 0) fail("device function called outside a kernel");
  return g_block->threads[g_block->cur];
}
int my_index() { return g_block->cur; }

void wait_for(Wait w, uint64_t gen) {
  ThreadState& t = me();
  t.wait = w;
  t.wait_gen = gen;
  if (!_setjmp(t.jb)) _longjmp(g_block->sched_jb, 1);
  t.wait = Wait::kNone;
}

bool runnable(const ThreadState& t, const Block& b, int idx) {
  switch (t.wait) {
    case Wait::kNone: return true;
    case Wait::kBlock: return b.gen > t.wait_gen;
    case Wait::kWarp: return b.warps[idx / 32].gen > t.wait_gen;
  }
  return false;
}

void fiber_main(int idx) {
  (void)idx;
  (*g_block->body)();
  g_block->threads[g_block->cur].done = true;
  _longjmp(g_block->sched_jb, 1);
}

// Runs fiber i until it waits or finishes.
void resume(Block& b, int i) {
  ThreadState& t = b.threads[i];
  b.cur = i;
  if (!_setjmp(b.sched_jb)) {
    if (!t.started) {
      t.started = true;
      swapcontext(&b.sched, &t.ctx);
    } else {
      _longjmp(t.jb, 1);
    }
  }
  b.cur = -1;
}

enum Op { kShfl = 1, kLdm = 2, kLdmT = 3, kMmaH = 4, kMmaB = 5 };

// All 32 lanes deposit, meet, compute from the deposits, meet again (so that no lane
// overwrites the exchange buffers while another still reads them).
void warp_meet(WarpState& w) {
  const uint64_t g = w.gen;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.gen;
  } else {
    wait_for(Wait::kWarp, g);
  }
}

WarpState& my_warp(int op) {
  const int idx = my_index();
  if (g_block->nthreads % 32) fail("block size is not a multiple of 32");
  WarpState& w = g_block->warps[idx / 32];
  w.op[idx % 32] = op;
  return w;
}

void check_same_op(const WarpState& w, int op, const char* what) {
  for (int l = 0; l < 32; ++l)
    if (w.op[l] != op) fail(std::string(what) + ": lanes of one warp reached different collective operations");
}

unsigned char* smem_ptr(uint32_t addr, int bytes, const char* what) {
  if (static_cast<size_t>(addr) + bytes > g_block->smem_bytes)
    fail(std::string(what) + ": shared-memory address " + std::to_string(addr) + " + " + std::to_string(bytes) +
         " is past the block's " + std::to_string(g_block->smem_bytes) + " bytes of dynamic shared memory");
  return fastinfer::cuda::detail::smem_raw + addr;
}

float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) return __bfloat162float(__nv_bfloat16{h});
  return __half2float(__half{h});
}

}  // namespace

ThreadState* current() { return &me(); }
const uint3& thread_idx() { return me().tid; }
const uint3& block_idx() { return g_block->bidx; }
const dim3& block_dim() { return g_block->bdim; }
const dim3& grid_dim() { return g_block->gdim; }

uint32_t smem_offset(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  const auto* base = fastinfer::cuda::detail::smem_raw;
  if (c < base || c >= base + fastinfer::cuda::detail::kEmuSmemBytes) fail("__cvta_generic_to_shared on a non-shared pointer");
  return static_cast<uint32_t>(c - base);
}

void syncthreads() {
  Block& b = *g_block;
  const uint64_t g = b.gen;
  if (++b.arrived == b.nthreads) {
    b.arrived = 0;
    ++b.gen;
  } else {
    wait_for(Wait::kBlock, g);
  }
}

float shfl_xor(float v, int lane_mask) {
  WarpState& w = my_warp(kShfl);
  const int lane = my_index() % 32;
  w.f[lane] = v;
  warp_meet(w);
  check_same_op(w, kShfl, "__shfl_xor_sync");
  const float r = w.f[(lane ^ lane_mask) & 31];
  warp_meet(w);
  return r;
}

void cp_async_16(uint32_t dst, const void* src, bool valid) {
  if (dst % 16) fail("cp.async: shared destination not 16-byte aligned");
  smem_ptr(dst, 16, "cp.async");
  if (reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async: global source not 16-byte aligned");
  Copy c;
  c.dst = dst;
  if (valid) std::memcpy(c.data, src, 16);
  else std::memset(c.data, 0, 16);
  me().open_group.push_back(c);
}

void cp_async_commit() {
  ThreadState& t = me();
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void cp_async_wait(int pending_allowed) {
  ThreadState& t = me();
  while (static_cast<int>(t.groups.size()) > pending_allowed) {
    for (const Copy& c : t.groups.front()) std::memcpy(smem_ptr(c.dst, 16, "cp.async"), c.data, 16);
    t.groups.pop_front();
  }
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  const int op = trans ? kLdmT : kLdm;
  WarpState& w = my_warp(op);
  const int lane = my_index() % 32;
  if (addr % 16) fail("ldmatrix: row address not 16-byte aligned");
  w.addr[lane] = addr;
  warp_meet(w);
  check_same_op(w, op, "ldmatrix");
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {  // lane gets row lane/4, columns 2*(lane%4), +1 of matrix m
      const unsigned char* row = smem_ptr(w.addr[8 * m + lane / 4], 16, "ldmatrix");
      std::memcpy(&lo, row + 4 * (lane % 4), 2);
      std::memcpy(&hi, row + 4 * (lane % 4) + 2, 2);
    } else {  // lane gets rows 2*(lane%4), +1 at column lane/4 of matrix m
      const unsigned char* r0 = smem_ptr(w.addr[8 * m + 2 * (lane % 4)], 16, "ldmatrix.trans");
      const unsigned char* r1 = smem_ptr(w.addr[8 * m + 2 * (lane % 4) + 1], 16, "ldmatrix.trans");
      std::memcpy(&lo, r0 + 2 * (lane / 4), 2);
      std::memcpy(&hi, r1 + 2 * (lane / 4), 2);
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  warp_meet(w);
}

void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const int op = bf16 ? kMmaB : kMmaH;
  WarpState& w = my_warp(op);
  const int lane = my_index() % 32;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  warp_meet(w);
  check_same_op(w, op, "mma.sync");
  // Rebuild A (16x16, row-major) and B (16x8, k x n) from the fragments (PTX ISA, m16n8k16 layouts).
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
      A[row][col] = half_bits_to_float(static_cast<uint16_t>(w.a[l][i] & 0xffff), bf16);
      A[row][col + 1] = half_bits_to_float(static_cast<uint16_t>(w.a[l][i] >> 16), bf16);
    }
    for (int i = 0; i < 2; ++i) {
      const int k = 2 * t + 8 * i;
      B[k][g] = half_bits_to_float(static_cast<uint16_t>(w.b[l][i] & 0xffff), bf16);
      B[k + 1][g] = half_bits_to_float(static_cast<uint16_t>(w.b[l][i] >> 16), bf16);
    }
  }
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
    d[i] = static_cast<float>(acc);
  }
  warp_meet(w);
}

void check_aligned(const void* p, int bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes)
    fail(std::string(what) + ": address not " + std::to_string(bytes) + "-byte aligned (would fault on a GPU)");
}

void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) fail("bad block size " + std::to_string(n));
  if (smem_bytes > fastinfer::cuda::detail::kEmuSmemBytes) fail("dynamic shared memory over 227 KB");
  Block b;
  b.nthreads = n;
  b.bdim = block;
  b.gdim = grid;
  b.smem_bytes = smem_bytes;
  b.body = &body;
  b.threads.resize(n);
  b.warps.resize((n + 31) / 32);
  for (int i = 0; i < n; ++i) {
    void* st = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (st == MAP_FAILED) fail("mmap of a fiber stack failed");
    b.threads[i].stack = static_cast<char*>(st);
  }
  Block* outer = g_block;
  g_block = &b;
  unsigned char* smem = fastinfer::cuda::detail::smem_raw;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.bidx = uint3{bx, by, bz};
        b.arrived = 0;
        b.gen = 0;
        for (auto& w : b.warps) w = WarpState{};
#if defined(FI_ASAN)
        ASAN_UNPOISON_MEMORY_REGION(smem, fastinfer::cuda::detail::kEmuSmemBytes);
#endif
        std::memset(smem, 0xff, fastinfer::cuda::detail::kEmuSmemBytes);  // NaN in every float type
#if defined(FI_ASAN)
        ASAN_POISON_MEMORY_REGION(smem + smem_bytes, fastinfer::cuda::detail::kEmuSmemBytes - smem_bytes);
#endif
        for (int i = 0; i < n; ++i) {
          ThreadState& t = b.threads[i];
          t.tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                        static_cast<unsigned>(i / (block.x * block.y))};
          t.done = false;
          t.started = false;
          t.wait = Wait::kNone;
          t.open_group.clear();
          t.groups.clear();
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = t.stack;
          t.ctx.uc_stack.ss_size = kStackBytes;
          t.ctx.uc_link = &b.sched;
          makecontext(&t.ctx, reinterpret_cast<void (*)()>(fiber_main), 1, i);
        }
        int live = n;
        while (live > 0) {
          bool progressed = false;
          for (int i = 0; i < n; ++i) {
            ThreadState& t = b.threads[i];
            if (t.done || !runnable(t, b, i)) continue;
            resume(b, i);
            progressed = true;
            if (t.done) --live;
          }
          if (!progressed) {
            int at_barrier = 0, at_warp = 0, finished = 0;
            for (auto& t : b.threads) {
              finished += t.done;
              at_barrier += !t.done && t.wait == Wait::kBlock;
              at_warp += !t.done && t.wait == Wait::kWarp;
            }
            fail("deadlock in block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) +
                 "): " + std::to_string(at_barrier) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
                 " at a warp collective, " + std::to_string(finished) + " have exited (a barrier or collective not "
                 "reached by every thread)");
          }
        }
        for (auto& t : b.threads)
          if (!t.open_group.empty()) fail("cp.async issued but never committed");
      }
#if defined(FI_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(smem, fastinfer::cuda::detail::kEmuSmemBytes);
#endif
  for (auto& t : b.threads) munmap(t.stack, kStackBytes);
  g_block = outer;
}

}  // namespace fastinfer::emu

// ------------------------------------------------------------------ runtime API
namespace {
cudaError_t g_last = cudaSuccess;
int env_int(const char* name, int def) {
  const char* s = std::getenv(name);
  return s ? std::atoi(s) : def;
}
}  // namespace

const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = env_int("FI_EMU_SMS", 132); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 232448; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int v) {
  return v <= 232448 ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) {
  *n = env_int("FI_EMU_OCCUPANCY", 2);
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** p, size_t n) {
  // Exactly n bytes (AddressSanitizer then sees any read past the end), 256-byte aligned like cudaMalloc.
  return posix_memalign(p, 256, std::max<size_t>(n, 1)) == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
