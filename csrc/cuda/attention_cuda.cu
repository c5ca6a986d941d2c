// Host side of the CUDA attention: checks what the kernels support, plans a launch
// (prefill or decode kernel shape, split-KV factor, workspace), launches the forward
// kernel and, when the keys were split, the kernel that merges the partial results.
#include <algorithm>
#include <climits>
#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/attention_cuda.h"
#include "cuda/attention_fwd.h"

namespace fastinfer::cuda {
namespace detail {
namespace {

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;
// Rows per (sequence, kv head) up to which the decode shape (16-row blocks whose warps
// split the keys) is used instead of the prefill shape (64-128 rows per block).
constexpr int64_t kDecodeMaxRows = 32;
constexpr int kMaxSplits = 128;

const int kCompiledHeadDims[] = {
#if defined(FASTINFER_CUDA_HDIM_64)
    64,
#endif
#if defined(FASTINFER_CUDA_HDIM_96)
    96,
#endif
#if defined(FASTINFER_CUDA_HDIM_128)
    128,
#endif
#if defined(FASTINFER_CUDA_HDIM_256)
    256,
#endif
    0};

std::string head_dims_str() {
  std::string s;
  for (int d : kCompiledHeadDims)
    if (d) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s.empty() ? "none" : s;
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so that later calls do not report it again
    throw std::runtime_error(std::string("fastinfer CUDA ") + what + ": " + cudaGetErrorString(err));
  }
}

FwdKernel find_kernel(int head_dim, DType dtype, bool decode) {
  switch (head_dim) {
#if defined(FASTINFER_CUDA_HDIM_64)
    case 64: return fwd_kernel_hdim64(dtype, decode);
#endif
#if defined(FASTINFER_CUDA_HDIM_96)
    case 96: return fwd_kernel_hdim96(dtype, decode);
#endif
#if defined(FASTINFER_CUDA_HDIM_128)
    case 128: return fwd_kernel_hdim128(dtype, decode);
#endif
#if defined(FASTINFER_CUDA_HDIM_256)
    case 256: return fwd_kernel_hdim256(dtype, decode);
#endif
    default: return FwdKernel{};
  }
}

void check_supported(const AttentionParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    throw std::invalid_argument("CUDA attention supports float16 and bfloat16 inputs; got float32 (cast q, k, v to "
                                "bfloat16 or float16, or use CPU tensors)");
  if (!find_kernel(p.head_dim, p.dtype, false).fn)
    throw std::invalid_argument("CUDA attention: head_dim " + std::to_string(p.head_dim) +
                                " is not compiled into this build; supported head dims: " + head_dims_str() +
                                " (FASTINFER_CUDA_HEADDIMS)");
  if (p.num_heads <= 0 || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0)
    throw std::invalid_argument("CUDA attention: num_heads must be a positive multiple of num_kv_heads");
  if (p.is_paged() && p.block_size < 1) throw std::invalid_argument("CUDA attention: block_size must be >= 1");
}

int current_device() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

int sm_count_of(int dev) {
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return n;
}

// Raises the kernel's dynamic shared-memory limit (needed above 48 KB) after checking the device has
// it, and returns its blocks per SM. Done once per (kernel, device); later calls read the cache.
int prepare_kernel(const FwdKernel& k, int dev) {
  struct Entry {
    const void* fn;
    int dev, occupancy;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const Entry& e : cache)
      if (e.fn == k.fn && e.dev == dev) return e.occupancy;
  }
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  if (k.smem_bytes > optin)
    throw std::invalid_argument("CUDA attention: this kernel needs " + std::to_string(k.smem_bytes) +
                                " bytes of shared memory per block; the device allows " + std::to_string(optin));
  check_cuda(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem_bytes),
             "cudaFuncSetAttribute");
  int occ = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k.fn, k.threads, k.smem_bytes),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  std::lock_guard<std::mutex> lock(mu);
  cache.push_back({k.fn, dev, std::max(occ, 1)});
  return std::max(occ, 1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// flash-attn 2's choice: the smallest split count whose last wave of blocks is at least 85%
// as full as the best one. Prefill shapes split only when the unsplit grid leaves the GPU
// under 80% busy; decode shapes (memory-bound, tiny partials) may also split to even out a
// ragged last wave (e.g. 512 blocks on 396 slots: 2 splits). Each split keeps >= 2 key tiles.
int splits_heuristic(int64_t blocks, int64_t slots, int64_t n_tiles, int max_splits, bool decode) {
  if (!decode && blocks >= 0.8 * static_cast<double>(slots)) return 1;
  max_splits = static_cast<int>(std::min<int64_t>({max_splits, slots, std::max<int64_t>(1, n_tiles / 2)}));
  auto eligible = [&](int s) { return s == 1 || ceil_div(n_tiles, s) != ceil_div(n_tiles, s - 1); };
  std::vector<double> eff(max_splits + 1, 0.0);
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) {
    if (!eligible(s)) continue;
    const double waves = static_cast<double>(blocks * s) / static_cast<double>(slots);
    eff[s] = waves / std::ceil(waves);
    best = std::max(best, eff[s]);
  }
  for (int s = 1; s <= max_splits; ++s)
    if (eligible(s) && eff[s] >= 0.85 * best) return s;
  return 1;
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

size_t split_workspace_bytes(int64_t ws_rows, const AttentionParams& p, int splits) {
  if (splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(splits) * static_cast<size_t>(ws_rows) * static_cast<size_t>(p.num_heads);
  return 256 + align256(rows * p.head_dim * sizeof(float)) + align256(rows * sizeof(float));  // +256: base alignment
}

struct Plan {
  FwdKernel kernel;
  bool empty = false;  // nothing to compute
  int num_splits = 1;
  int num_m_slots = 1;
  int64_t ws_rows = 0;
  int k_capacity = 0;
  int64_t kv_rows = 0;
  int window_left = -1, window_right = -1;  // p's, normalised (normalize_windows) and clamped to kMaxLen
};

Plan make_plan(const AttentionParams& p, const AttentionExtras& x, int dev, int sm_count) {
  check_supported(p);
  Plan pl;
  const int64_t group = p.num_heads / p.num_kv_heads;
  const bool varlen_q = p.is_varlen_q(), paged = p.is_paged(), varlen_k = p.cu_seqlens_k && !paged;
  const int64_t q_total = varlen_q ? x.q_rows : int64_t(p.batch) * std::max(p.seqlen_q, 0);
  if (p.batch <= 0 || q_total <= 0) {
    pl.empty = true;
    return pl;
  }
  if (x.q_rows < 0 || x.kv_rows < 0 || x.block_table_cols < 0)
    throw std::invalid_argument("CUDA attention: AttentionExtras sizes must be >= 0");
  if (q_total * group >= INT_MAX / 2 || (!varlen_q && int64_t(p.seqlen_q) * group >= INT_MAX / 2))
    throw std::invalid_argument("CUDA attention: too many query rows (seqlen_q * num_heads / num_kv_heads >= 2^30)");

  // Key capacity of one sequence and the bound of device-side key indices.
  int64_t cap_k;
  if (paged) {
    cap_k = x.block_table_cols * p.block_size;
    pl.kv_rows = x.kv_rows;
  } else if (varlen_k) {
    cap_k = x.kv_rows;
    pl.kv_rows = x.kv_rows;
  } else {
    cap_k = std::max(p.seqlen_k, 0);
    pl.kv_rows = p.kv_batch_idx ? x.kv_rows : p.batch;  // without kv_batch_idx, sequence b reads cache entry b
  }
  pl.k_capacity = static_cast<int>(std::min<int64_t>(cap_k, kMaxLen));

  // Windows that exclude no key become -1 (the same launch as the unbounded call). The device
  // lengths are unknown here: their bounds decide (sk <= k_capacity, sq <= seqlen_q or
  // min(q_rows, kMaxLen), as seq_info clamps them). A window left as it is is shorter than that
  // bound, so <= kMaxLen, and the kernel's int32 position arithmetic (|t + sk - sq| <= kMaxLen,
  // plus or minus a window) stays below 2^31; the clamp only restates that.
  AttentionParams w = p;
  normalize_windows(w, varlen_q ? std::min<int64_t>(x.q_rows, kMaxLen) : p.seqlen_q, pl.k_capacity);
  pl.window_left = w.window_left < 0 ? -1 : std::min(w.window_left, kMaxLen);
  pl.window_right = w.window_right < 0 ? -1 : std::min(w.window_right, kMaxLen);

  const int64_t max_q = varlen_q ? (x.max_seqlen_q > 0 ? std::min<int64_t>(x.max_seqlen_q, x.q_rows) : -1) : p.seqlen_q;
  const bool decode = max_q >= 0 && max_q * group <= kDecodeMaxRows;
  pl.kernel = find_kernel(p.head_dim, p.dtype, decode);
  const FwdKernel& k = pl.kernel;
  const int occupancy = prepare_kernel(k, dev);

  // m-blocks per (sequence, kv head): exact for dense q, from the hint (or the mean) for varlen.
  const int64_t rows_est = max_q >= 0 ? max_q * group : ceil_div(q_total, p.batch) * group;
  const int64_t n_mblocks = std::max<int64_t>(1, ceil_div(rows_est, k.block_m));
  int64_t max_k = x.max_seqlen_k > 0 ? std::min<int64_t>(x.max_seqlen_k, pl.k_capacity) : pl.k_capacity;
  if (pl.window_left >= 0 && pl.window_right >= 0)
    max_k = std::min<int64_t>(max_k, int64_t(pl.window_left) + pl.window_right + 1 + ceil_div(k.block_m, group));
  const int64_t n_tiles = std::max<int64_t>(1, ceil_div(max_k, k.block_n));
  const int64_t heads = int64_t(p.batch) * p.num_kv_heads;

  int splits = 1;
  if (p.num_splits > 1) {
    splits = static_cast<int>(std::min<int64_t>({p.num_splits, n_tiles, kMaxSplits}));
  } else if (p.num_splits == 0 && n_tiles > 1) {
    splits = splits_heuristic(heads * n_mblocks, int64_t(sm_count) * occupancy, n_tiles, kMaxSplits, decode);
  }
  // The grid is one dimension of heads * splits * m-slots blocks; m-slots loop over m-blocks.
  if (heads * splits > INT_MAX) splits = 1;
  if (heads > INT_MAX) throw std::invalid_argument("CUDA attention: batch * num_kv_heads exceeds 2^31");
  pl.num_splits = splits;
  pl.num_m_slots = static_cast<int>(std::min<int64_t>(n_mblocks, INT_MAX / (heads * splits)));
  pl.ws_rows = q_total;
  return pl;
}

bool aligned16(const void* ptr, std::initializer_list<int64_t> strides, int esz) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  for (int64_t s : strides)
    if ((s * esz) % 16) return false;
  return true;
}

// ------------------------------------------------------------------ split-KV merge

struct CombineArgs {
  const float* ws_o;
  const float* ws_lse;
  int64_t ws_rows;
  int num_splits, num_heads, head_dim, seqlen_q, num_slots;
  const int32_t* cu_seqlens_q;
  int64_t q_rows;
  void* out;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float* lse;
  int64_t lse_batch_stride, lse_head_stride, lse_row_stride;
};

// One warp per (query row, head): lse-weighted sum of the splits' normalised partials.
template <class T>
__global__ void __launch_bounds__(128) combine_splits_kernel(const CombineArgs c) {
  constexpr int kMaxPerLane = 8;  // head_dim <= 256
  const int b = blockIdx.x / c.num_slots, slot = blockIdx.x % c.num_slots;
  int sq;
  int64_t base;
  if (c.cu_seqlens_q) {
    const int64_t c0 = c.cu_seqlens_q[b], c1 = c.cu_seqlens_q[b + 1];
    base = c0;
    sq = static_cast<int>(min(max(c1 - c0, int64_t(0)), min(c.q_rows, int64_t(kMaxLen))));
  } else {
    base = int64_t(b) * c.seqlen_q;
    sq = c.seqlen_q;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int H = c.num_heads, D = c.head_dim;
  const int64_t items = int64_t(sq) * H;
  for (int64_t it = int64_t(slot) * 4 + warp; it < items; it += int64_t(c.num_slots) * 4) {
    const int t = static_cast<int>(it / H), h = static_cast<int>(it % H);
    const int64_t gr = base + t;
    if (c.cu_seqlens_q && (gr < 0 || gr >= c.q_rows)) continue;
    float mx = -INFINITY;
    bool nan_row = false;  // a split saw a NaN or +inf score
    for (int s = 0; s < c.num_splits; ++s) {
      const float ls = c.ws_lse[(int64_t(s) * c.ws_rows + gr) * H + h];
      nan_row = nan_row || ls != ls;
      mx = fmaxf(mx, ls);
    }
    // -FLT_MAX: a split with visible keys, all scored -inf; as the best of all splits, a NaN row.
    nan_row = nan_row || mx == -FLT_MAX;
    T* dst = static_cast<T*>(c.out) + (c.cu_seqlens_q ? gr * c.o_row_stride : int64_t(b) * c.o_batch_stride + int64_t(t) * c.o_row_stride) +
             int64_t(h) * c.o_head_stride;
    const int64_t lse_at = int64_t(b) * c.lse_batch_stride + int64_t(h) * c.lse_head_stride + (c.cu_seqlens_q ? gr : t) * c.lse_row_stride;
    if (nan_row) {
      const float nan = nan_f();
#pragma unroll
      for (int k = 0; k < kMaxPerLane; ++k)
        if (lane + 32 * k < D) dst[lane + 32 * k] = from_float<T>(nan);
      if (c.lse && lane == 0) c.lse[lse_at] = nan;
      continue;
    }
    float acc[kMaxPerLane];
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) acc[k] = 0.f;
    float total = 0.f;
    if (mx != -INFINITY) {
      for (int s = 0; s < c.num_splits; ++s) {
        const int64_t rec = (int64_t(s) * c.ws_rows + gr) * H + h;
        const float w = fast_exp2(c.ws_lse[rec] - mx);
        if (w == 0.f) continue;
        total += w;
        const float* po = c.ws_o + rec * D;
#pragma unroll
        for (int k = 0; k < kMaxPerLane; ++k)
          if (lane + 32 * k < D) acc[k] += w * po[lane + 32 * k];
      }
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k)
      if (lane + 32 * k < D) dst[lane + 32 * k] = from_float<T>(acc[k] * inv);
    if (c.lse && lane == 0) c.lse[lse_at] = total > 0.f ? (mx + log2f(total)) * kLn2 : INFINITY;
  }
}

}  // namespace
}  // namespace detail

using namespace detail;

size_t attention_workspace_bytes(const AttentionParams& p, const AttentionExtras& x, int device_sm_count) {
  const int dev = current_device();
  const Plan pl = make_plan(p, x, dev, device_sm_count > 0 ? device_sm_count : sm_count_of(dev));
  return pl.empty ? 0 : split_workspace_bytes(pl.ws_rows, p, pl.num_splits);
}

void attention_forward(const AttentionParams& p, const AttentionExtras& x, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  const int dev = current_device();
  Plan pl = make_plan(p, x, dev, sm_count_of(dev));
  if (pl.empty) return;

  // A smaller workspace than planned only lowers the split count.
  if (!workspace) workspace_bytes = 0;
  while (pl.num_splits > 1 && split_workspace_bytes(pl.ws_rows, p, pl.num_splits) > workspace_bytes) --pl.num_splits;

  const int esz = dtype_size(p.dtype);
  FwdArgs a{};
  a.p = p;
  a.group = p.num_heads / p.num_kv_heads;
  a.window_left = a.p.window_left = pl.window_left;
  a.window_right = a.p.window_right = pl.window_right;
  a.q_rows = x.q_rows;
  a.kv_rows = pl.kv_rows;
  a.k_capacity = pl.k_capacity;
  a.seqlens_k_add = x.seqlens_k_add;
  a.block_div = FastDiv(static_cast<uint32_t>(p.is_paged() ? p.block_size : 1));
  if (p.softcap > 0.f) {
    a.score_scale = p.softmax_scale / p.softcap;
    a.softcap_log2 = p.softcap * kLog2e;
  } else {
    a.score_scale = p.softmax_scale * kLog2e;
    a.softcap_log2 = 0.f;
  }
  const bool varlen_q = p.is_varlen_q();
  a.q_aligned = aligned16(p.q, {varlen_q ? 0 : p.q_batch_stride, p.q_row_stride, p.q_head_stride}, esz);
  a.o_aligned = aligned16(p.out, {varlen_q ? 0 : p.o_batch_stride, p.o_row_stride, p.o_head_stride}, esz);
  a.kv_aligned = aligned16(p.k, {p.k_batch_stride, p.k_row_stride, p.k_head_stride}, esz) &&
                 aligned16(p.v, {p.v_batch_stride, p.v_row_stride, p.v_head_stride}, esz);
  a.num_splits = pl.num_splits;
  a.num_m_slots = pl.num_m_slots;
  a.ws_rows = pl.ws_rows;
  if (pl.num_splits > 1) {
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(workspace) + 255) / 256 * 256);
    const size_t rows = static_cast<size_t>(pl.num_splits) * pl.ws_rows * p.num_heads;
    a.ws_o = reinterpret_cast<float*>(base);
    a.ws_lse = reinterpret_cast<float*>(base + align256(rows * p.head_dim * sizeof(float)));
  }

  const int64_t blocks = int64_t(p.batch) * p.num_kv_heads * pl.num_splits * pl.num_m_slots;
#if defined(FASTINFER_CUDA_EMULATE)
  FI_LAUNCH(reinterpret_cast<void (*)(FwdArgs)>(pl.kernel.fn), dim3(static_cast<unsigned>(blocks)),
            dim3(pl.kernel.threads), static_cast<size_t>(pl.kernel.smem_bytes), stream)(a);
#else
  void* args[] = {&a};
  check_cuda(cudaLaunchKernel(pl.kernel.fn, dim3(static_cast<unsigned>(blocks)), dim3(pl.kernel.threads), args,
                              static_cast<size_t>(pl.kernel.smem_bytes), stream),
             "attention kernel launch");
#endif

  if (pl.num_splits > 1) {
    CombineArgs c{};
    c.ws_o = a.ws_o;
    c.ws_lse = a.ws_lse;
    c.ws_rows = pl.ws_rows;
    c.num_splits = pl.num_splits;
    c.num_heads = p.num_heads;
    c.head_dim = p.head_dim;
    c.seqlen_q = p.seqlen_q;
    c.cu_seqlens_q = p.cu_seqlens_q;
    c.q_rows = x.q_rows;
    c.out = p.out;
    c.o_batch_stride = p.o_batch_stride;
    c.o_row_stride = p.o_row_stride;
    c.o_head_stride = p.o_head_stride;
    c.lse = p.lse;
    c.lse_batch_stride = p.lse_batch_stride;
    c.lse_head_stride = p.lse_head_stride;
    c.lse_row_stride = p.lse_row_stride;
    const int64_t max_q = varlen_q ? (x.max_seqlen_q > 0 ? std::min<int64_t>(x.max_seqlen_q, x.q_rows)
                                                          : ceil_div(x.q_rows, p.batch))
                                   : p.seqlen_q;
    c.num_slots = static_cast<int>(std::clamp<int64_t>(ceil_div(max_q * p.num_heads, 4), 1, INT_MAX / p.batch));
    const dim3 grid(static_cast<unsigned>(int64_t(p.batch) * c.num_slots));
    if (p.dtype == DType::kFloat16) FI_LAUNCH(combine_splits_kernel<__half>, grid, 128, 0, stream)(c);
    else FI_LAUNCH(combine_splits_kernel<__nv_bfloat16>, grid, 128, 0, stream)(c);
    check_cuda(cudaGetLastError(), "split-KV combine kernel launch");
  }
}

namespace {
AttentionExtras extras_without_device_indices(const AttentionParams& p) {
  if (p.cu_seqlens_q || p.cu_seqlens_k || p.block_table || p.kv_batch_idx)
    throw std::invalid_argument(
        "CUDA attention: varlen, paged and kv_batch_idx calls index tensors through device arrays; pass "
        "AttentionExtras with the tensor sizes (q_rows, kv_rows, block_table_cols)");
  return AttentionExtras{};
}
}  // namespace

size_t attention_workspace_bytes(const AttentionParams& p, int device_sm_count) {
  return attention_workspace_bytes(p, extras_without_device_indices(p), device_sm_count);
}

void attention_forward(const AttentionParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  attention_forward(p, extras_without_device_indices(p), workspace, workspace_bytes, stream);
}

const char* compiled_head_dims() {
  static const std::string s = [] {
    std::string r;
    for (int d : kCompiledHeadDims)
      if (d) r += (r.empty() ? "" : ",") + std::to_string(d);
    return r;
  }();
  return s.c_str();
}

}  // namespace fastinfer::cuda
