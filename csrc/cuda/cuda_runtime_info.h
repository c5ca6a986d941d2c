#pragma once
#include <string>

namespace fastinfer::cuda {
// Both return gracefully (0 / a message) on machines without a driver or GPU.
int device_count();
std::string runtime_version();
// Runs a one-thread kernel and returns the __CUDA_ARCH__ it was compiled for (throws without a GPU).
int probe_arch();
}  // namespace fastinfer::cuda
