// CUDA plumbing: probing the runtime without requiring a GPU, and a trivial kernel
// that proves device code is compiled and linked for every architecture in the build.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/cuda_runtime_info.h"

namespace fastinfer::cuda {

__global__ void probe_kernel(int* out) {
#if defined(__CUDA_ARCH__)
  if (threadIdx.x == 0 && blockIdx.x == 0) *out = __CUDA_ARCH__;
#endif
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

int probe_arch() {
  if (device_count() == 0) throw std::runtime_error("no CUDA device is available");
  int* d = nullptr;
  int h = -1;
  cudaError_t err = cudaMalloc(&d, sizeof(int));
  if (err == cudaSuccess) {
    probe_kernel<<<1, 32>>>(d);
    err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost);
    cudaFree(d);
  }
  if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA probe kernel failed: ") + cudaGetErrorString(err));
  return h;
}

DeviceInfo device_info(int device) {
  cudaDeviceProp prop{};
  const cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("cannot read the properties of CUDA device " + std::to_string(device) + ": " +
                             cudaGetErrorString(err));
  }
  return DeviceInfo{prop.name, prop.major, prop.minor};
}

}  // namespace fastinfer::cuda
