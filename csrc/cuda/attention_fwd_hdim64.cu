// Forward attention kernels for head_dim 64 (fp16 and bf16, prefill and decode shapes).
// One file per head dim keeps each translation unit small and lets the build run them in parallel.
// All configurations stay under 99 KB of shared memory, the limit of sm_86/sm_89 parts that run sm_80 code.
#include "cuda/attention_fwd_kernel.cuh"

namespace fastinfer::cuda::detail {
namespace {
using Prefill = FwdConfig<64, 8, 1, 64, 3, 1>;  // 128 rows x 64 keys, 8 warps, 3 stages: 64 KB
using Decode = FwdConfig<64, 1, 4, 64, 3, 4>;   // 16 rows x 64 keys (4 warps x 16 keys), 3 stages: 50 KB
static_assert(Prefill::kSmemBytes <= 99 * 1024 && Decode::kSmemBytes <= 99 * 1024, "shared memory over 99 KB");
}  // namespace

FwdKernel fwd_kernel_hdim64(DType dtype, bool decode) {
  if (dtype == DType::kFloat16) return decode ? make_fwd_kernel<Decode, __half>() : make_fwd_kernel<Prefill, __half>();
  return decode ? make_fwd_kernel<Decode, __nv_bfloat16>() : make_fwd_kernel<Prefill, __nv_bfloat16>();
}

}  // namespace fastinfer::cuda::detail
