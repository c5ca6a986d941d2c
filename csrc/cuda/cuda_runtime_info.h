#pragma once
#include <string>

namespace fastinfer::cuda {
// Both return gracefully (0 / a message) on machines without a driver or GPU.
int device_count();
std::string runtime_version();
// Runs a one-thread kernel and returns the __CUDA_ARCH__ it was compiled for (throws without a GPU).
int probe_arch();

// Name and compute capability of a device (cudaGetDeviceProperties); throws std::runtime_error
// when the runtime cannot read them.
struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0;
};
DeviceInfo device_info(int device);
}  // namespace fastinfer::cuda
