// A small CUDA emulator for checking fastinfer's kernels on a machine without a GPU.
//
// The kernel sources are compiled as host C++ (FASTINFER_CUDA_EMULATE swaps the PTX wrappers of
// cuda_utils.cuh for the functions below). Each CUDA thread of a block is a fiber (ucontext); fibers
// run until __syncthreads, __syncwarp or a warp-collective operation (ldmatrix, mma, shuffle), where
// they wait for the other participants. Blocks run one after another.
// What it checks beyond the numbers: barriers that not every thread reaches (deadlock report), warp
// collectives not executed by all 32 lanes in step, shared-memory accesses out of the block's dynamic
// allocation (explicitly in the emulated operations, and with AddressSanitizer poisoning for plain
// loads/stores), misaligned cp.async / ldmatrix / vector accesses, cp.async data used before its group
// was waited for (shared memory starts filled with 0xFF = NaN), a thread that exits with copies it never
// waited for, and the launch contract (grid and block limits, __launch_bounds__, dynamic shared memory
// against the target's opt-in limit and the kernel's cudaFuncSetAttribute opt-in).
// Schedules (environment, read once): FI_EMU_SCHED=index (threads in index order, each until it
// blocks; the default) | warp (one warp as far as it goes before the next) | warp-reverse (the same,
// last warp first); FI_EMU_CPASYNC=wait (copies land at cp.async.wait_group; the default) | issue
// (they land when issued). FI_EMU_ARCH=sm_80 (default) | sm_86 | sm_89 | sm_90: the opt-in limit.
// The race build (emu_race.cpp, FI_EMU_RACE=1) adds the shared-memory race checker.
#include <dlfcn.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_runtime.h"
#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FI_ASAN 1
#endif

namespace fastinfer::cuda::detail {
// The kernels' `extern __shared__ unsigned char smem_raw[]` (block-scope extern in this namespace).
alignas(128) unsigned char smem_raw[kEmuSmemBytes];
}  // namespace fastinfer::cuda::detail

namespace fastinfer::emu {

void fail(const std::string& msg) {
  std::fprintf(stderr, "\n[cuda-emu] ERROR: %s\n", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

// "file:line" of a code address (inlined frames joined by " <- "), from the debug info via addr2line.
std::string symbolize(const void* pc) {
  static std::mutex mu;
  static std::map<const void*, std::string> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(pc);
  if (it != cache.end()) return it->second;
  std::string out;
  Dl_info info{};
  if (pc && dladdr(pc, &info) && info.dli_fname) {
    char cmd[1024];
    std::snprintf(cmd, sizeof cmd, "addr2line -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                  static_cast<unsigned long>(static_cast<const char*>(pc) - static_cast<const char*>(info.dli_fbase)));
    if (FILE* f = popen(cmd, "r")) {
      char line[1024];
      while (std::fgets(line, sizeof line, f)) {
        std::string s(line);
        while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
        const size_t cut = s.find(" (discriminator");
        if (cut != std::string::npos) s.resize(cut);
        const size_t slash = s.rfind('/');
        if (slash != std::string::npos) s = s.substr(slash + 1);
        out += (out.empty() ? "" : " <- ") + s;
      }
      pclose(f);
    }
  }
  char addr[32];
  std::snprintf(addr, sizeof addr, "%p", pc);
  out = out.empty() || out == "??:0" ? std::string(addr) : out + " [" + addr + "]";
  cache[pc] = out;
  return out;
}

namespace {

constexpr size_t kStackBytes = 1 << 19;
constexpr size_t kDefaultSmemBytes = 48 * 1024;  // dynamic shared memory without the opt-in

struct Copy {
  uint32_t dst;
  const void* pc;
  unsigned char data[16];
};

enum class Wait { kNone, kBlock, kWarp };
enum class Sched { kIndex, kWarp, kWarpReverse };

// Schedule and target, from the environment once; an unknown value is an error, never a default.
struct Modes {
  Sched sched = Sched::kIndex;
  bool land_at_issue = false;
  int arch = 80;
  size_t optin_limit = 166912;  // sm_80: 163 KB
};

const Modes& modes() {
  static const Modes m = [] {
    Modes r;
    if (const char* s = std::getenv("FI_EMU_SCHED")) {
      const std::string v(s);
      if (v == "index") r.sched = Sched::kIndex;
      else if (v == "warp") r.sched = Sched::kWarp;
      else if (v == "warp-reverse") r.sched = Sched::kWarpReverse;
      else fail("FI_EMU_SCHED=" + v + ": expected index, warp or warp-reverse");
    }
    if (const char* s = std::getenv("FI_EMU_CPASYNC")) {
      const std::string v(s);
      if (v == "wait") r.land_at_issue = false;
      else if (v == "issue") r.land_at_issue = true;
      else fail("FI_EMU_CPASYNC=" + v + ": expected wait or issue");
    }
    if (const char* s = std::getenv("FI_EMU_ARCH")) {
      const std::string v(s);
      // Opt-in dynamic shared memory per block (CUDA C++ Programming Guide, compute capability table).
      if (v == "sm_80") r.arch = 80, r.optin_limit = 163 * 1024;
      else if (v == "sm_86") r.arch = 86, r.optin_limit = 99 * 1024;
      else if (v == "sm_89") r.arch = 89, r.optin_limit = 99 * 1024;
      else if (v == "sm_90") r.arch = 90, r.optin_limit = 227 * 1024;
      else fail("FI_EMU_ARCH=" + v + ": expected sm_80, sm_86, sm_89 or sm_90");
    }
    return r;
  }();
  return m;
}

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
  const char* kernel = "";
  bool bounds_checked = false;
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
  ThreadState& t = g_block->threads[g_block->cur];
  // A thread must not exit with copies in flight: they may land after the block's shared memory
  // went to the next block.
  size_t pending = t.open_group.size();
  for (const auto& g : t.groups) pending += g.size();
  if (pending)
    fail("thread " + std::to_string(g_block->cur) + " of block " + current_block_str() + " exited with " +
         std::to_string(pending) + " cp.async copies it never waited for (" +
         (t.open_group.empty() ? "committed, no cp.async.wait_group covers them" : "never committed") + "), in " +
         g_block->kernel);
  t.done = true;
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

enum Op { kShfl = 1, kLdm = 2, kLdmT = 3, kMmaH = 4, kMmaB = 5, kSyncWarp = 6 };

// All 32 lanes deposit, meet, compute from the deposits, meet again (so that no lane
// overwrites the exchange buffers while another still reads them). Returns true in the last lane to arrive.
bool warp_meet(WarpState& w) {
  const uint64_t g = w.gen;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.gen;
    return true;
  }
  wait_for(Wait::kWarp, g);
  return false;
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

// Per kernel: the cudaFuncAttributeMaxDynamicSharedMemorySize the host code set (default 48 KB).
std::map<const void*, int>& smem_optins() {
  static std::map<const void*, int> m;
  return m;
}

}  // namespace

int current_thread() { return g_block ? g_block->cur : -1; }
std::string current_block_str() {
  if (!g_block) return "(none)";
  return "(" + std::to_string(g_block->bidx.x) + "," + std::to_string(g_block->bidx.y) + "," +
         std::to_string(g_block->bidx.z) + ")";
}

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
    race::barrier();
  } else {
    wait_for(Wait::kBlock, g);
  }
}

void syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) fail("__syncwarp with a partial mask is not emulated (mask " + std::to_string(mask) + ")");
  WarpState& w = my_warp(kSyncWarp);
  const int warp = my_index() / 32;
  if (warp_meet(w)) race::warp_barrier(warp);
  check_same_op(w, kSyncWarp, "__syncwarp");
  warp_meet(w);
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
  const void* pc = __builtin_return_address(0);
  if (dst % 16) fail("cp.async: shared destination not 16-byte aligned");
  unsigned char* d = smem_ptr(dst, 16, "cp.async");
  if (reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async: global source not 16-byte aligned");
  Copy c;
  c.dst = dst;
  c.pc = pc;
  if (valid) std::memcpy(c.data, src, 16);
  else std::memset(c.data, 0, 16);
  race::async_issue(my_index(), dst, 16, pc);
  if (modes().land_at_issue) std::memcpy(d, c.data, 16);
  me().open_group.push_back(c);
}

void cp_async_commit() {
  ThreadState& t = me();
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void cp_async_wait(int pending_allowed) {
  const void* pc = __builtin_return_address(0);
  ThreadState& t = me();
  while (static_cast<int>(t.groups.size()) > pending_allowed) {
    for (const Copy& c : t.groups.front()) {
      if (!modes().land_at_issue) std::memcpy(smem_ptr(c.dst, 16, "cp.async"), c.data, 16);
      race::async_land(my_index(), c.dst, 16, pc);
    }
    t.groups.pop_front();
  }
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  const int op = trans ? kLdmT : kLdm;
  WarpState& w = my_warp(op);
  const int lane = my_index() % 32;
  if (addr % 16) fail("ldmatrix: row address not 16-byte aligned");
  smem_ptr(addr, 16, trans ? "ldmatrix.trans" : "ldmatrix");
  race::access(my_index(), addr, 16, false, __builtin_return_address(0));  // this lane's row
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

void check_launch_bounds(int max_threads) {
  Block& b = *g_block;
  if (b.bounds_checked) return;
  b.bounds_checked = true;
  if (b.nthreads > max_threads)
    fail(std::string("launch of ") + b.kernel + " with " + std::to_string(b.nthreads) +
         " threads per block, over its __launch_bounds__(" + std::to_string(max_threads) +
         ") (the launch fails on a GPU: too many resources requested)");
}

namespace {

// The launch contract a GPU enforces (CUDA C++ Programming Guide, "Features and Technical
// Specifications"); a violation makes the launch fail there, so it is an error here too.
void check_launch(const void* fn, const char* kernel, dim3 grid, dim3 block, size_t smem_bytes) {
  const std::string k = std::string("launch of ") + kernel + ": ";
  if (grid.x < 1 || grid.y < 1 || grid.z < 1)
    fail(k + "a grid dimension is 0 (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
         std::to_string(grid.z) + "): invalid configuration");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    fail(k + "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
         ") over the limits (x <= 2^31-1, y and z <= 65535)");
  const uint64_t n = uint64_t(block.x) * block.y * block.z;
  if (block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 || block.z > 64 || n > 1024)
    fail(k + "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
         ") over the limits (x, y <= 1024, z <= 64, x*y*z <= 1024)");
  const Modes& m = modes();
  if (smem_bytes > m.optin_limit)
    fail(k + std::to_string(smem_bytes) + " bytes of dynamic shared memory, over the sm_" + std::to_string(m.arch) +
         " opt-in limit of " + std::to_string(m.optin_limit));
  if (smem_bytes > kDefaultSmemBytes) {
    auto it = smem_optins().find(fn);
    const int optin = it == smem_optins().end() ? static_cast<int>(kDefaultSmemBytes) : it->second;
    if (smem_bytes > static_cast<size_t>(optin))
      fail(k + std::to_string(smem_bytes) + " bytes of dynamic shared memory, but the kernel's "
               "cudaFuncAttributeMaxDynamicSharedMemorySize is " + std::to_string(optin) +
               " (above 48 KB the host must opt in with cudaFuncSetAttribute first)");
  }
}

std::string kernel_name(const void* fn) {
  // addr2line -f names the function; fall back to the address.
  Dl_info info{};
  if (!fn || !dladdr(fn, &info) || !info.dli_fname) return "kernel";
  char cmd[1024];
  std::snprintf(cmd, sizeof cmd, "addr2line -f -C -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                static_cast<unsigned long>(static_cast<const char*>(fn) - static_cast<const char*>(info.dli_fbase)));
  std::string name;
  if (FILE* f = popen(cmd, "r")) {
    char line[4096];
    if (std::fgets(line, sizeof line, f)) name = line;
    pclose(f);
  }
  while (!name.empty() && name.back() == '\n') name.pop_back();
  if (name.empty() || name == "??") return "kernel";
  return name;
}

const char* cached_kernel_name(const void* fn) {
  static std::map<const void*, std::string> names;
  auto it = names.find(fn);
  if (it == names.end()) it = names.emplace(fn, kernel_name(fn)).first;
  return it->second.c_str();
}

}  // namespace

void run_grid(const void* fn, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const char* kname = cached_kernel_name(fn);
  check_launch(fn, kname, grid, block, smem_bytes);
  const int n = static_cast<int>(block.x * block.y * block.z);
  const Modes& mode = modes();
  Block b;
  b.nthreads = n;
  b.bdim = block;
  b.gdim = grid;
  b.smem_bytes = smem_bytes;
  b.body = &body;
  b.kernel = kname;
  b.threads.resize(n);
  b.warps.resize((n + 31) / 32);
  for (int i = 0; i < n; ++i) {
    void* st = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (st == MAP_FAILED) fail("mmap of a fiber stack failed");
    b.threads[i].stack = static_cast<char*>(st);
  }
  // Warps in the order the warp schedules run them.
  std::vector<int> warp_order(b.warps.size());
  for (size_t w = 0; w < warp_order.size(); ++w)
    warp_order[w] = mode.sched == Sched::kWarpReverse ? static_cast<int>(warp_order.size() - 1 - w) : static_cast<int>(w);
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
        race::block_start(n);
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
        auto step = [&](int i) {  // runs thread i if it can; true when it did
          ThreadState& t = b.threads[i];
          if (t.done || !runnable(t, b, i)) return false;
          resume(b, i);
          if (t.done) --live;
          return true;
        };
        while (live > 0) {
          bool progressed = false;
          if (mode.sched == Sched::kIndex) {
            for (int i = 0; i < n; ++i) progressed |= step(i);
          } else {
            for (int w : warp_order)
              for (bool again = true; again;) {  // this warp as far as it goes
                again = false;
                for (int i = 32 * w; i < std::min(n, 32 * w + 32); ++i) again |= step(i);
                progressed |= again;
              }
          }
          if (!progressed) {
            int at_barrier = 0, at_warp = 0, finished = 0;
            for (auto& t : b.threads) {
              finished += t.done;
              at_barrier += !t.done && t.wait == Wait::kBlock;
              at_warp += !t.done && t.wait == Wait::kWarp;
            }
            fail("deadlock in block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) +
                 ") of " + kname + ": " + std::to_string(at_barrier) + " threads wait at __syncthreads, " +
                 std::to_string(at_warp) + " at a warp collective, " + std::to_string(finished) +
                 " have exited (a barrier or collective not reached by every thread)");
          }
        }
      }
#if defined(FI_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(smem, fastinfer::cuda::detail::kEmuSmemBytes);
#endif
  for (auto& t : b.threads) munmap(t.stack, kStackBytes);
  g_block = outer;
  race::launch_end(kname);
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
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(fastinfer::emu::modes().optin_limit); break;
    case cudaDevAttrComputeCapabilityMajor: *v = fastinfer::emu::modes().arch / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *v = fastinfer::emu::modes().arch % 10; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* fn, cudaFuncAttribute a, int v) {
  // As on a GPU: a value over the device's opt-in limit is refused, and the kernel keeps its old one.
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 ||
      static_cast<size_t>(v) > fastinfer::emu::modes().optin_limit)
    return g_last = cudaErrorInvalidValue;
  fastinfer::emu::smem_optins()[fn] = v;
  return cudaSuccess;
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
