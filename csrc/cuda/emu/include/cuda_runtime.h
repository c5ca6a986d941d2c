// CPU emulation of the parts of the CUDA runtime and device built-ins that fastinfer's kernels use.
// Shadows the real <cuda_runtime.h> when csrc/cuda is compiled with a host compiler and
// -DFASTINFER_CUDA_EMULATE (see csrc/cuda/emu/run_emulated_selftest.sh). Not part of any build.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
// __launch_bounds__ is rewritten by emu/prepare_sources.py into a check at kernel entry
// (FI_EMU_LAUNCH_BOUNDS); left anywhere else, it means nothing.
#define __launch_bounds__(...)
#define FI_EMU_LAUNCH_BOUNDS(max_threads, ...) ::fastinfer::emu::check_launch_bounds(max_threads)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorEmulated = 999 };
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef struct CUstream_st* cudaStream_t;

const char* cudaGetErrorString(cudaError_t);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int*);
cudaError_t cudaGetDeviceCount(int*);
cudaError_t cudaDeviceGetAttribute(int*, cudaDeviceAttr, int);
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int*, const void*, int, size_t);
cudaError_t cudaMalloc(void**, size_t);
cudaError_t cudaFree(void*);
cudaError_t cudaMemcpy(void*, const void*, size_t, cudaMemcpyKind);
cudaError_t cudaDeviceSynchronize();
template <class T>
cudaError_t cudaMalloc(T** p, size_t n) {
  return cudaMalloc(reinterpret_cast<void**>(p), n);
}
template <class T>
cudaError_t cudaFuncSetAttribute(T* f, cudaFuncAttribute a, int v) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}

namespace fastinfer::emu {
struct ThreadState;
ThreadState* current();
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();
void syncwarp(unsigned mask);
void check_launch_bounds(int max_threads);
float shfl_xor(float v, int lane_mask);
uint32_t smem_offset(const void* p);
}  // namespace fastinfer::emu

#define threadIdx (::fastinfer::emu::thread_idx())
#define blockIdx (::fastinfer::emu::block_idx())
#define blockDim (::fastinfer::emu::block_dim())
#define gridDim (::fastinfer::emu::grid_dim())
inline void __syncthreads() { ::fastinfer::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::fastinfer::emu::syncwarp(mask); }
inline float __shfl_xor_sync(unsigned, float v, int m) { return ::fastinfer::emu::shfl_xor(v, m); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline size_t __cvta_generic_to_shared(const void* p) { return ::fastinfer::emu::smem_offset(p); }

// Device min/max overloads (CUDA's math headers provide them for int, long long, ...).
template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

#include "emu_launch.h"
