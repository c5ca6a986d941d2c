// Small kernels with known synchronisation and launch-contract bugs, one per name, to check that the
// emulator's modes report what they claim (tests/test_cuda_emulator.py) - and a correct one that
// every mode must pass. Built by emu_build.sh (target "checks"); run as
//   emu_checks NAME        exit 0: the kernel ran and its result is right; 1: wrong result; abort: emulator report
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/cuda_utils.cuh"

// In fastinfer::cuda::detail itself (not an anonymous namespace): the kernels' block-scope
// `extern __shared__ smem_raw` must name the emulator's array there.
namespace fastinfer::cuda::detail {

constexpr int kN = 64;  // threads: two warps

// Correct: barriers, a cp.async pipeline, ldmatrix and __syncwarp used as intended.
__global__ void __launch_bounds__(kN) good_kernel(const uint4* src, uint4* out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint4* s = reinterpret_cast<uint4*>(smem_raw);
  const int t = threadIdx.x;
  cp_async_16(smem_addr(s + t), src + t, true);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t r[4];
  ldmatrix_x4(r, smem_addr(s + (t % 32)));  // every lane reads rows written by other threads
  const uint4 v = s[(t + 1) % kN];
  __syncthreads();
  s[t] = make_uint4(v.x + r[0] * 0u, v.y, v.z, v.w);
  __syncwarp();
  out[t] = s[t ^ 1];
}

// Write-after-read within a warp: lane l reads lane l + 1's chunk, then overwrites its own with no
// __syncwarp between. A shuffle between the two makes every lane read before any lane writes, whatever
// the schedule, so the numbers are always right: only the race mode sees the bug (the shuffle orders
// execution, not memory: CUDA requires __syncwarp for that).
__global__ void __launch_bounds__(kN) war_kernel(const uint4* src, uint4* out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint4* s = reinterpret_cast<uint4*>(smem_raw);
  const int t = threadIdx.x;
  s[t] = src[t];
  __syncthreads();
  const uint4 v = s[(t & ~31) + ((t + 1) & 31)];
  const float x = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  s[t] = make_uint4(0u, 0u, 0u, static_cast<unsigned>(x));  // the bug: no __syncwarp before this store
  out[t] = v;
}

// cp.async into chunk t while thread t - 1 still reads it: right when copies land at the wait (the
// emulator's default), wrong when they land at issue or when a warp runs ahead.
__global__ void __launch_bounds__(kN) cpasync_war_kernel(const uint4* src, uint4* out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint4* s = reinterpret_cast<uint4*>(smem_raw);
  const int t = threadIdx.x;
  s[t] = src[t];
  __syncthreads();
  cp_async_16(smem_addr(s + t), src + kN + t, true);  // the bug: chunk t + 1 is read below by thread t
  cp_async_commit();
  const uint4 v = s[(t + 1) % kN];
  float x = __shfl_xor_sync(0xffffffffu, 1.f, 1);  // a warp collective between the read and the wait
  cp_async_wait<0>();
  out[t] = make_uint4(v.x, v.y, v.z, v.w + static_cast<unsigned>(x) - 1u);
}

// A thread exits with a committed cp.async group it never waited for.
__global__ void __launch_bounds__(kN) cpasync_exit_kernel(const uint4* src, uint4* out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint4* s = reinterpret_cast<uint4*>(smem_raw);
  const int t = threadIdx.x;
  cp_async_16(smem_addr(s + t), src + t, true);
  cp_async_commit();
  out[t] = src[t];
}

// Lanes exchange through shared memory: right only with the __syncwarp (the race mode sees the difference).
template <bool kSync>
__global__ void __launch_bounds__(kN) warp_exchange_kernel(const uint4* src, uint4* out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint4* s = reinterpret_cast<uint4*>(smem_raw);
  const int t = threadIdx.x;
  s[t] = src[t];
  if (kSync) __syncwarp();
  out[t] = s[t ^ 1];
}

__global__ void __launch_bounds__(32) bounded_kernel(const uint4* src, uint4* out) { out[threadIdx.x] = src[threadIdx.x]; }
__global__ void plain_kernel(const uint4* src, uint4* out) {
  out[blockIdx.y * blockDim.x + threadIdx.x] = src[threadIdx.x];
}

}  // namespace fastinfer::cuda::detail

using namespace fastinfer::cuda::detail;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: emu_checks NAME\n");
    return 2;
  }
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // an emulator report aborts: what was printed must be out
  const std::string name = argv[1];
  std::vector<uint4> host(2 * kN);
  for (int i = 0; i < 2 * kN; ++i) host[i] = make_uint4(i, 3 * i, 5 * i, 7 * i);
  uint4 *src = nullptr, *out = nullptr;
  cudaMalloc(&src, host.size() * sizeof(uint4));
  cudaMalloc(&out, host.size() * sizeof(uint4));
  cudaMemcpy(src, host.data(), host.size() * sizeof(uint4), cudaMemcpyHostToDevice);
  std::vector<uint4> want(kN);
  const size_t smem = kN * sizeof(uint4);
  if (name == "good") {
    FI_LAUNCH(good_kernel, dim3(2), dim3(kN), smem, nullptr)(src, out);
    for (int t = 0; t < kN; ++t) want[t] = host[((t ^ 1) + 1) % kN];
  } else if (name == "war") {
    FI_LAUNCH(war_kernel, dim3(1), dim3(kN), smem, nullptr)(src, out);
    for (int t = 0; t < kN; ++t) want[t] = host[(t & ~31) + ((t + 1) & 31)];
  } else if (name == "cpasync_war") {
    FI_LAUNCH(cpasync_war_kernel, dim3(1), dim3(kN), smem, nullptr)(src, out);
    for (int t = 0; t < kN; ++t) want[t] = host[(t + 1) % kN];
  } else if (name == "cpasync_exit") {
    FI_LAUNCH(cpasync_exit_kernel, dim3(1), dim3(kN), smem, nullptr)(src, out);
    for (int t = 0; t < kN; ++t) want[t] = host[t];
  } else if (name == "syncwarp" || name == "syncwarp_missing") {
    if (name == "syncwarp") FI_LAUNCH(warp_exchange_kernel<true>, dim3(1), dim3(kN), smem, nullptr)(src, out);
    else FI_LAUNCH(warp_exchange_kernel<false>, dim3(1), dim3(kN), smem, nullptr)(src, out);
    for (int t = 0; t < kN; ++t) want[t] = host[t ^ 1];
  } else if (name == "launch_bounds") {  // 64 threads for a kernel bounded at 32
    FI_LAUNCH(bounded_kernel, dim3(1), dim3(kN), 0, nullptr)(src, out);
    for (int t = 0; t < kN; ++t) want[t] = host[t];
  } else if (name == "grid_y") {  // grid y over 65535
    FI_LAUNCH(plain_kernel, dim3(1, 65536), dim3(1), 0, nullptr)(src, out);
    return 0;
  } else if (name == "smem_no_optin" || name == "smem_optin") {  // 64 KB: above 48 KB needs the opt-in
    const int bytes = 64 * 1024;
    if (name == "smem_optin" &&
        cudaFuncSetAttribute(good_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess) {
      std::printf("cudaFuncSetAttribute refused %d bytes\n", bytes);
      return 1;
    }
    FI_LAUNCH(good_kernel, dim3(1), dim3(kN), bytes, nullptr)(src, out);
    for (int t = 0; t < kN; ++t) want[t] = host[((t ^ 1) + 1) % kN];
  } else if (name == "smem_200k") {  // over sm_80's 163 KB, under sm_90's 227 KB
    const int bytes = 200 * 1024;
    const cudaError_t e = cudaFuncSetAttribute(good_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    std::printf("cudaFuncSetAttribute(%d): %s\n", bytes, e == cudaSuccess ? "accepted" : "refused");
    FI_LAUNCH(good_kernel, dim3(1), dim3(kN), bytes, nullptr)(src, out);
    for (int t = 0; t < kN; ++t) want[t] = host[((t ^ 1) + 1) % kN];
  } else {
    std::fprintf(stderr, "emu_checks: unknown check '%s'\n", name.c_str());
    return 2;
  }
  std::vector<uint4> got(kN);
  cudaMemcpy(got.data(), out, kN * sizeof(uint4), cudaMemcpyDeviceToHost);
  for (int t = 0; t < kN; ++t)
    if (std::memcmp(&got[t], &want[t], sizeof(uint4))) {
      std::printf("wrong result at thread %d\n", t);
      return 1;
    }
  std::printf("ok %s\n", name.c_str());
  return 0;
}
