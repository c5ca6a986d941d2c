// Forward attention kernels for head_dim 256 (fp16 and bf16, prefill and decode shapes).
// One file per head dim keeps each translation unit small and lets the build run them in parallel.
// All configurations stay under 99 KB of shared memory, the limit of sm_86/sm_89 parts that run sm_80 code.
#include "cuda/attention_fwd_kernel.cuh"

namespace fastinfer::cuda::detail {
namespace {
using Prefill = FwdConfig<256, 4, 1, 32, 2, 1>;  // 64 rows x 32 keys, 4 warps, 2 stages: 96 KB
using Decode = FwdConfig<256, 1, 2, 32, 2, 3>;   // 16 rows x 32 keys (2 warps x 16 keys), 2 stages: 72 KB
static_assert(Prefill::kSmemBytes <= 99 * 1024 && Decode::kSmemBytes <= 99 * 1024, "shared memory over 99 KB");
}  // namespace

FwdKernel fwd_kernel_hdim256(DType dtype, bool decode) {
  if (dtype == DType::kFloat16) return decode ? make_fwd_kernel<Decode, __half>() : make_fwd_kernel<Prefill, __half>();
  return decode ? make_fwd_kernel<Decode, __nv_bfloat16>() : make_fwd_kernel<Prefill, __nv_bfloat16>();
}

}  // namespace fastinfer::cuda::detail
