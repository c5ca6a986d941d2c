// Host side of the CUDA attention backward: checks, launch shapes, and the kernel
// instantiations for the compiled head dims (two kernels per head dim and dtype).
#include <algorithm>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "cuda/attention_bwd.h"
#include "cuda/attention_bwd_kernel.cuh"

namespace fastinfer::cuda {
namespace {
using namespace detail;

// Launch shapes per head dim: dK/dV rows per tile (BM), dQ warps (W) and keys per tile (BN).
// All stay under 99 KB of shared memory (sm_86/sm_89 run the sm_80 code too).
template <int D>
struct BwdShape {
  static constexpr int BM = D <= 64 ? 64 : D <= 128 ? 32 : 16;
  static constexpr int W = D <= 128 ? 4 : 2;
  static constexpr int BN = D <= 128 ? 64 : 32;
  static_assert(DkdvConfig<D, BM>::kSmemBytes <= 99 * 1024 && DqConfig<D, W, BN>::kSmemBytes <= 99 * 1024,
                "shared memory over 99 KB");
};

void check_launch(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA attention backward: ") + what + ": " + cudaGetErrorString(e));
}

template <class K>
void set_smem(K kernel, int bytes) {
  if (bytes > 48 * 1024)
    check_launch(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "shared memory opt-in");
}

template <int D, class T>
void launch(const BwdArgs& a, int max_sq, int max_sk, cudaStream_t stream) {
  using Shape = BwdShape<D>;
  using Dkdv = DkdvConfig<D, Shape::BM>;
  using Dq = DqConfig<D, Shape::W, Shape::BN>;
  const AttentionParams& p = a.bp.fwd;
  const int64_t delta_n = a.delta_rows * p.num_heads;
  if (delta_n > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>((delta_n + 255) / 256, 65535));
    FI_LAUNCH(attention_bwd_delta_kernel<T>, dim3(blocks), dim3(256), 0, stream)(a);
    check_launch(cudaGetLastError(), "delta kernel");
  }
  const dim3 kv_grid((max_sk + Dkdv::BN - 1) / Dkdv::BN, p.num_kv_heads, p.batch);
  if (kv_grid.x > 0) {
    auto* k = &attention_bwd_dkdv_kernel<D, Shape::BM, T>;
    set_smem(k, Dkdv::kSmemBytes);
    FI_LAUNCH(k, kv_grid, dim3(Dkdv::kThreads), Dkdv::kSmemBytes, stream)(a);
    check_launch(cudaGetLastError(), "dK/dV kernel");
  }
  const int64_t rows = int64_t(max_sq) * a.group;
  const dim3 q_grid(static_cast<unsigned>((rows + Dq::BM - 1) / Dq::BM), p.num_kv_heads, p.batch);
  if (q_grid.x > 0) {
    auto* k = &attention_bwd_dq_kernel<D, Shape::W, Shape::BN, T>;
    set_smem(k, Dq::kSmemBytes);
    FI_LAUNCH(k, q_grid, dim3(Dq::kThreads), Dq::kSmemBytes, stream)(a);
    check_launch(cudaGetLastError(), "dQ kernel");
  }
  if (p.cu_seqlens_q) {
    FI_LAUNCH(attention_bwd_zero_outside_kernel<T>, dim3(64), dim3(256), 0, stream)(a);
    check_launch(cudaGetLastError(), "zero kernel");
  }
}

template <class T>
void dispatch(const BwdArgs& a, int max_sq, int max_sk, cudaStream_t stream) {
  switch (a.bp.fwd.head_dim) {
#if defined(FASTINFER_CUDA_HDIM_64)
    case 64: return launch<64, T>(a, max_sq, max_sk, stream);
#endif
#if defined(FASTINFER_CUDA_HDIM_96)
    case 96: return launch<96, T>(a, max_sq, max_sk, stream);
#endif
#if defined(FASTINFER_CUDA_HDIM_128)
    case 128: return launch<128, T>(a, max_sq, max_sk, stream);
#endif
#if defined(FASTINFER_CUDA_HDIM_256)
    case 256: return launch<256, T>(a, max_sq, max_sk, stream);
#endif
    default:
      throw std::invalid_argument("CUDA attention backward: head_dim " + std::to_string(a.bp.fwd.head_dim) +
                                  " is not compiled in (compiled: " + compiled_head_dims() + ")");
  }
}

bool aligned16(const void* ptr, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  for (int64_t s : strides)
    if (s % 8) return false;
  return true;
}

int64_t delta_rows(const AttentionBackwardParams& bp, const AttentionExtras& x) {
  return bp.fwd.cu_seqlens_q ? x.q_rows : int64_t(bp.fwd.batch) * bp.fwd.seqlen_q;
}

}  // namespace

size_t attention_backward_workspace_bytes(const AttentionBackwardParams& bp, const AttentionExtras& x) {
  const size_t n = static_cast<size_t>(delta_rows(bp, x)) * bp.fwd.num_heads * sizeof(float);
  return (n + 255) / 256 * 256;
}

void attention_backward(const AttentionBackwardParams& bp, const AttentionExtras& x, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  if (p.dtype == DType::kFloat32)
    throw std::invalid_argument("CUDA attention backward supports float16 and bfloat16 inputs; got float32");
  if (p.block_table || p.kv_batch_idx || p.seqlens_k)
    throw std::invalid_argument("CUDA attention backward: paged caches, kv_batch_idx and seqlens_k are not supported");
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr))
    throw std::invalid_argument("CUDA attention backward: cu_seqlens_q and cu_seqlens_k go together");
  if (p.lse == nullptr) throw std::invalid_argument("CUDA attention backward: lse is required");
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads) 
    throw std::invalid_argument("CUDA attention backward: num_heads must be a positive multiple of num_kv_heads");
  if (workspace_bytes < attention_backward_workspace_bytes(bp, x))
    throw std::invalid_argument("CUDA attention backward: workspace smaller than attention_backward_workspace_bytes");
  if (p.batch <= 0) return;
  if (p.batch > 65535 || p.num_kv_heads > 65535)
    throw std::invalid_argument("CUDA attention backward: batch and num_kv_heads must be <= 65535 (grid y/z)");
  // Grid sizes from tensor shapes, not from the max_seqlen hints: every key/row block of every
  // sequence must run (dK/dV rows no query sees are written as zeros). Blocks past a sequence exit at once.
  const int64_t max_sq = p.cu_seqlens_q ? x.q_rows : p.seqlen_q;
  const int64_t max_sk = p.cu_seqlens_k ? x.kv_rows : p.seqlen_k;
  if (max_sq * (p.num_heads / p.num_kv_heads) >= (int64_t(1) << 30) || max_sk >= (int64_t(1) << 30))
    throw std::invalid_argument("CUDA attention backward: sequences too long (>= 2^30 packed rows)");
  BwdArgs a{};
  a.bp = bp;
  a.group = p.num_heads / p.num_kv_heads;
  // Windows that exclude no key become -1, from the bounds of the lengths (bwd_seq clamps sq to
  // q_rows and sk to kv_rows; dense: exact, so the launch is the unbounded call's). A window left
  // as it is is below 2^30, like every position, so the kernels' int32 position arithmetic
  // (position +- window) stays below 2^31.
  normalize_windows(a.bp.fwd, max_sq, max_sk);
  a.window_left = a.bp.fwd.window_left;
  a.window_right = a.bp.fwd.window_right;
  a.q_rows = x.q_rows;
  a.kv_rows = x.kv_rows;
  a.delta = static_cast<float*>(workspace);
  a.delta_rows = delta_rows(bp, x);
  a.aligned = aligned16(p.q, {p.q_batch_stride, p.q_row_stride, p.q_head_stride}) &&
              aligned16(p.k, {p.k_batch_stride, p.k_row_stride, p.k_head_stride}) &&
              aligned16(p.v, {p.v_batch_stride, p.v_row_stride, p.v_head_stride}) &&
              aligned16(bp.dout, {bp.do_batch_stride, bp.do_row_stride, bp.do_head_stride}) &&
              aligned16(bp.dq, {bp.dq_batch_stride, bp.dq_row_stride, bp.dq_head_stride}) &&
              aligned16(bp.dk, {bp.dk_batch_stride, bp.dk_row_stride, bp.dk_head_stride}) &&
              aligned16(bp.dv, {bp.dv_batch_stride, bp.dv_row_stride, bp.dv_head_stride});
  if (p.dtype == DType::kFloat16) return dispatch<__half>(a, static_cast<int>(max_sq), static_cast<int>(max_sk), stream);
  return dispatch<__nv_bfloat16>(a, static_cast<int>(max_sq), static_cast<int>(max_sk), stream);
}

}  // namespace fastinfer::cuda
