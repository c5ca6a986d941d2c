// The fastinfer._C module: registers every op family (csrc/bindings/*.cpp), build_info,
// CUDA device queries, and the CPU backend's SIMD level and thread count.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "bindings/bindings.h"
#include "bindings/checks.h"
#include "fastinfer/cpu.h"
#include "fastinfer/cuda.h"

namespace fastinfer::bindings {

namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = FASTINFER_VERSION;
  d["compiler"] = FASTINFER_CXX_COMPILER;
  d["cuda_archs"] = std::string(FASTINFER_CUDA_ARCHS_STR);
#if defined(FASTINFER_WITH_CUDA)
  d["cuda_compiled"] = true;
  d["cuda_runtime_version"] = cuda::runtime_version();
  d["cuda_head_dims"] = std::string(cuda::compiled_head_dims());
#else
  d["cuda_compiled"] = false;
  d["cuda_runtime_version"] = py::none();
  d["cuda_head_dims"] = std::string();
#endif
  d["cpu_isa"] = cpu::active_isa_name();
  d["cpu_isa_best"] = cpu::best_isa_name();
  d["num_threads"] = cpu::num_threads();
  return d;
}

int cuda_device_count() {
#if defined(FASTINFER_WITH_CUDA)
  return cuda::device_count();
#else
  return 0;
#endif
}

// build_info, CUDA device queries, the CPU SIMD level and thread count.
void bind_runtime(py::module_& m) {
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &cuda_device_count, "Number of usable CUDA devices (0 without a driver or GPU).");
#if defined(FASTINFER_WITH_CUDA)
  m.def("cuda_probe_arch", [] {
    try {
      return fastinfer::cuda::probe_arch();
    } catch (const std::runtime_error& e) {
      throw py::value_error(e.what());
    }
  }, "Launch a trivial kernel; returns the __CUDA_ARCH__ of the code that ran.");
#endif
  m.def("cpu_isa", [] { return std::string(cpu::active_isa_name()); });
  m.def("set_cpu_isa", [](const std::string& name) {
    try {
      cpu::set_isa(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("name"));
  m.def("num_threads", &cpu::num_threads);
  m.def("set_num_threads", [](const py::object& n) {
    cpu::set_num_threads(static_cast<int>(int_arg(n, "n", std::numeric_limits<int32_t>::min(), cpu::kMaxThreads)));
  }, py::arg("n"), "Threads of the CPU kernels (at most kMaxThreads); n <= 0 restores the default.");
}

}  // namespace

}  // namespace fastinfer::bindings

PYBIND11_MODULE(_C, m) {
  using namespace fastinfer::bindings;
  m.doc() = "fastinfer native kernels (DLPack in, no libtorch)";
  bind_attention(m);
  bind_backward(m);
  bind_kv_cache(m);
  bind_linear(m);
  bind_pointwise(m);
  bind_decoder(m);
  bind_cuda_device(m);
  bind_runtime(m);
}
